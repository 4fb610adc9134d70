"""Class 5, config and options: everything is validated before the first tensor byte is read;
exit 2 (usage) or 3 (input), one line, nothing written."""

import os
import time

import pytest

from dppa_stream.config import parse_config, parse_size
from dppa_stream.errors import UsageError

from .test_hostile_cli import config, one_line_error, run, tensors, tiny_pair, write_model

SRC = "cfg.yml"


def usage(text, *needles) -> str:
    with pytest.raises(UsageError) as e:
        parse_config(text, SRC)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 2000 and msg.startswith(SRC), msg[:300]
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def dppa(params="", model_params=""):
    mp = f"\n    parameters: {{{model_params}}}" if model_params else ""
    return (f"merge_method: dppa\nbase_model: /m/base\nmodels:\n  - model: /m/a{mp}\n"
            + (f"parameters: {{{params}}}\n" if params else ""))


@pytest.mark.parametrize("params,model_params", [
    ("pruning_rates: [0.9, 0.8], amplification: [1.8]", ""),
    ("pruning_rates: [0.9, 0.8, 0.7]", "amplification: [1.8, 1.0]"),
    ("", "amplification: [1.8, 1.0, 0.5]"),
])
def test_amplification_must_match_pruning_rates(params, model_params):
    usage(dppa(params, model_params), "amplification", "pruning_rates", "one factor per pruning rate")


def test_linear_filter_without_a_group_is_accepted():
    """Without a group, each matched tensor's block comes from its detected stack (dppa_stream.blocks)."""
    assert parse_config(dppa(r"linear_filter: 'layers\.\d+\.'"), SRC).parameters["linear_filter"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "9" * 5000, "1e300", "[1.8, .nan]", "[.inf, 0]"])
def test_non_finite_or_absurd_numbers_are_refused(value):
    key = "amplification" if value.startswith("[") else "weight"
    msg = usage(dppa("", f"{key}: {value}"))
    assert (key in msg or f"{SRC}:5:" in msg) and len(msg) < 400


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    bomb = "\n".join(lines) + "\nmerge_method: *j\nmodels: [/m/a]\n"
    t0 = time.monotonic()
    msg = usage(bomb)
    assert time.monotonic() - t0 < 5 and len(msg) < 500


def test_alias_bomb_in_a_parameter_value():
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 8):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 8) + "]")
    text = "\n".join(lines) + "\nmerge_method: ties\nbase_model: /m/b\nmodels:\n  - model: /m/a\n    parameters: {weight: *l7}\n"
    assert len(usage(text)) < 500


@pytest.mark.parametrize("text", ["a: " + "[" * 100_000 + "]" * 100_000 + "\n", "a: " + "{b: " * 20_000 + "1" + "}" * 20_000,
                                  "- " * 50_000 + "x\n"], ids=["flow-lists", "flow-maps", "block-lists"])
def test_deep_yaml_is_a_usage_error(text):
    usage(text)


@pytest.mark.parametrize("text", ["? !!set {a}\n: 1\n", "merge_method: !!binary aGVsbG8=\nmodels: [/m/a]\n",
                                  "merge_method: ties\nbase_model: \"/m/\\0base\"\nmodels: [/m/a]\n",
                                  "merge_method: ties\nbase_model: /m/base\nmodels: [\"/m/\\ud800\"]\n"],
                         ids=["set-key", "binary-value", "nul-in-path", "surrogate-in-path"])
def test_strange_yaml_values(text):
    usage(text)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "huge", "binary"])
def test_config_path_that_is_not_a_config(tmp_path, kind):
    path = tmp_path / "c.yml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "folder":
        os.makedirs(path)
    elif kind == "huge":
        path.write_text("# " + "x" * (2 << 20) + "\n")
    else:
        path.write_bytes(b"\xff\xfe\0\0garbage")
    t0 = time.monotonic()
    code, lines, _ = run("merge", path, tmp_path / "out", "-q")
    one_line_error(code, lines, 2)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("text", ["1" + "0" * 400, "9" * 5000 + "GB", "1e400", "1" + "0" * 400 + ".5GiB", "0.1", "-5GB",
                                  "5XB", ""])
def test_absurd_sizes_are_usage_errors(text):
    with pytest.raises(UsageError) as e:
        parse_size(text, "--memory-limit")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_sizes_are_exact():
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("5GB") == 5 * 10**9 and parse_size("7") == 7


@pytest.mark.parametrize("opt", ["--memory-limit", "--shard-size", "--unit-size"])
def test_400_digit_size_on_the_command_line(tmp_path, opt):
    base, ft = tiny_pair(tmp_path)
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", opt, "1" + "0" * 400)
    one_line_error(code, lines, 2, opt)


def test_json_into_a_missing_folder_is_refused_before_the_merge(tmp_path):
    base, ft = tiny_pair(tmp_path)
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "-q",
                         "--json", tmp_path / "nope" / "r.json")
    one_line_error(code, lines, 2, "--json", "does not exist")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("opt,name", [("--plot", "nope/p.png"), ("--json", "nope/s.json"), ("--plot", "p.xyz"),
                                      ("--plot", ".")])
def test_stats_outputs_checked_before_pass_1(tmp_path, opt, name):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft, method="dppa", params=None)
    code, lines, _ = run("stats", cfg, opt, tmp_path / name, "-q")
    one_line_error(code, lines, 2, opt)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
                                     b'{"a": ' + b"9" * 5000 + b"}"],
                         ids=["syntax", "list", "not-utf8", "deep", "huge-int"])
def test_invalid_config_json_in_the_base_fails_at_the_start(tmp_path, content):
    base = write_model(tmp_path / "in" / "base", tensors(0))
    (tmp_path / "in" / "base" / "config.json").write_bytes(content)
    ft = write_model(tmp_path / "in" / "ft", tensors(1))
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "config.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_linear_filter_group_that_is_not_a_number_names_the_tensor(tmp_path):
    sd = {"model.layers.a.mlp.up_proj.weight": tensors(0)["model.layers.0.mlp.up_proj.weight"],
          "model.norm.weight": tensors(0)["model.norm.weight"]}
    base = write_model(tmp_path / "in" / "base", sd)
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in sd.items()})
    cfg = config(tmp_path / "c.yml", base, ft, method="dppa", params=None,
                 extra="parameters: {linear_filter: '(?:^|\\.)layers\\.(\\w+)\\.'}\n")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "model.layers.a.mlp.up_proj.weight")
    assert not (tmp_path / "out.partial").exists()
