"""The merge config: every mistake is a one-line UsageError that names the key (and its YAML line);
mergekit features we lack are refused by name; sizes parse like the docs say."""

import os

import pytest
from click.testing import CliRunner

from dppa_stream.cli.main import main as cli
from dppa_stream.config import load_config, parse_config, parse_size
from dppa_stream.errors import EXIT_USAGE, UsageError

SRC = "cfg.yml"


def expect(text, *needles) -> str:
    """parse_config(text) raises UsageError (exit code 2) whose one-line message has every needle."""
    with pytest.raises(UsageError) as info:
        parse_config(text, SRC)
    msg = str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    assert "\n" not in msg, msg
    assert msg.startswith(SRC), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def ties(models="  - model: /m/a\n    parameters: {weight: 0.5, density: 0.5}\n", base="/m/base", extra=""):
    head = "merge_method: ties\n" + (f"base_model: {base}\n" if base else "")
    return head + "models:\n" + models + extra


def test_valid_config():
    cfg = parse_config(ties(extra="parameters: {normalize: false, lambda: 1}\ndtype: bfloat16\n"), SRC)
    assert cfg.merge_method == "ties" and cfg.base_model == "/m/base" and cfg.dtype == "BF16"
    assert [m.path for m in cfg.models] == ["/m/a"]
    glob, models = cfg.tensor_params("model.layers.0.mlp.up_proj.weight", 0.5)
    assert models == ({"weight": 0.5, "density": 0.5},) and glob["normalize"] is False and glob["lambda"] == 1


# --- YAML itself ---------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line():
    text = "merge_method: ties\nbase_model: /m/base\nmodels:\n  - model: /m/a\n    parameters: {weight: [0.5\n"
    expect(text, f"{SRC}:6:", "YAML syntax error")
    expect("merge_method: ties\nmodels:\n  - model: /m/a\n  oops\n", f"{SRC}:5:", "YAML syntax error")


def test_duplicate_key_has_line():
    expect(ties(extra="merge_method: linear\n"), f"{SRC}:6:", "duplicate key 'merge_method'")


def test_unhashable_key():
    expect("? [a, b]\n: 1\n", f"{SRC}:1:", "key")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(text):
    expect(text, "mapping")


# --- top level -----------------------------------------------------------------------------------


def test_unknown_top_level_key_did_you_mean():
    expect(ties(extra="out_dtyp: float16\n"), f"{SRC}:6:", "unknown key 'out_dtyp'", "did you mean 'out_dtype'?")
    expect("merge_methd: ties\nmodels: [/m/a]\n", f"{SRC}:1:", "did you mean 'merge_method'?")


def test_unknown_top_level_key_without_close_match_lists_allowed():
    expect(ties(extra="zzz: 1\n"), "unknown key 'zzz'", "allowed:", "merge_method")


def test_slices_parsed():
    text = ("merge_method: ties\nbase_model: /m/base\nslices:\n  - sources:\n      - model: /m/base\n"
            "        layer_range: [0, 16]\n      - model: /m/a\n        layer_range: [4, 20]\n"
            "        parameters: {weight: 0.5, density: 0.3}\n    parameters: {lambda: 0.9}\n")
    cfg = parse_config(text, SRC)
    (sl,) = cfg.slices
    assert sl.base.path == "/m/base" and sl.base.layer_range == (0, 16)
    assert [(s.path, s.layer_range) for s in sl.sources] == [("/m/a", (4, 20))] and sl.params == {"lambda": 0.9}


@pytest.mark.parametrize("text,needles", [
    ("merge_method: ties\nbase_model: /m/base\nslices:\n  - sources:\n      - model: /m/a\n"
     "        layer_range: [0, 16]\n        parameters: {weight: 1}\n", ["slices[0]", "base model", "/m/base"]),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: /m/a\n        layer_range: [3, 2]\n",
     ["slices[0].sources[0].layer_range"]),
    ("merge_method: passthrough\nmodels:\n  - model: /m/a\nslices:\n  - sources: []\n", ["either", "not both"]),
    ("merge_method: dppa\nbase_model: /m/b\nslices:\n  - sources:\n      - model: /m/b\n        layer_range: [0, 2]\n",
     ["slices are not supported for dppa"]),
])
def test_bad_slices(text, needles):
    expect(text, *needles)


def test_modules_refused():
    expect(ties(extra="modules: base\n"), "'modules'", "not supported")


def test_merge_method_missing_unknown_or_not_a_string():
    expect("models: [/m/a]\n", "'merge_method' is required", "ties")
    expect(ties().replace("ties", "tie", 1), f"{SRC}:1:", "unknown merge_method 'tie'", "did you mean 'ties'?")
    expect(ties().replace("ties", "[ties]", 1), f"{SRC}:1:", "unknown merge_method")


def test_base_missing_for_ties():
    expect(ties(base=None), "merge_method 'ties' needs a 'base_model'")
    expect(ties(base="[/m/base]"), f"{SRC}:2:", "base_model must be a path")


@pytest.mark.parametrize("v", ["float8", "[bfloat16]", "1"])
def test_bad_dtype(v):
    expect(ties(extra=f"dtype: {v}\n"), f"{SRC}:6:", "dtype", "float32, float16, bfloat16")


# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("models", ["models: []\n", "models:\n", "models: /m/a\n", "models: {a: 1}\n", ""])
def test_empty_or_malformed_model_list(models):
    expect("merge_method: ties\nbase_model: /m/base\n" + models, "'models' must be a non-empty list")


def test_model_entry_without_path():
    expect(ties("  - parameters: {weight: 1}\n"), "models[0] needs a 'model: PATH' entry")
    expect(ties("  - model: 3\n"), "models[0] needs a 'model: PATH' entry")


def test_same_model_twice():
    m = "  - model: /m/a\n    parameters: {weight: 1}\n"
    expect(ties(m + "  - model: /m/x/../a\n    parameters: {weight: 1}\n"), f"{SRC}:6:", "models[1] repeats models[0]")


def test_base_listed_among_models():
    m = "  - model: /m/base\n  - model: /m/a\n    parameters: {weight: 1}\n"
    assert [x.path for x in parse_config(ties(m), SRC).models] == ["/m/a"]  # mergekit style: skipped
    expect(ties("  - model: /m/base\n    parameters: {weight: 1}\n  - model: /m/a\n    parameters: {weight: 1}\n"),
           "models[0] is the base model")
    expect(ties("  - model: /m/base\n"), "no model besides the base")


def test_unknown_model_entry_key():
    expect(ties("  - model: /m/a\n    paramters: {weight: 1}\n"), f"{SRC}:5:", "models[0].'paramters'",
           "did you mean 'parameters'?")


def test_required_weight_missing():
    expect(ties("  - model: /m/a\n    parameters: {density: 0.5}\n"), "models[/m/a].parameters.weight is required")


# --- parameters ----------------------------------------------------------------------------------


def test_unknown_parameter_did_you_mean():
    expect(ties("  - model: /m/a\n    parameters: {weight: 1, densty: 0.5}\n"), f"{SRC}:5:",
           "models[0].parameters.'densty'", "did you mean 'density'?")
    expect(ties(extra="parameters: {normalise: true}\n"), f"{SRC}:6:", "parameters.'normalise'", "did you mean 'normalize'?")


def test_global_parameter_under_a_model():
    expect(ties("  - model: /m/a\n    parameters: {weight: 1, normalize: true}\n"), "models[0].parameters.normalize",
           "global parameter")


def test_parameters_not_a_mapping():
    expect(ties(extra="parameters: [1]\n"), "'parameters' must be a mapping")
    expect(ties("  - model: /m/a\n    parameters: 1\n"), "models[0].parameters must be a mapping")


@pytest.mark.parametrize("params,needles", [
    ('{weight: "abc"}', ["models[0].parameters.weight must be a number, not 'abc'"]),
    ("{weight: true}", ["models[0].parameters.weight must be a number, not True"]),
    ("{weight: null}", ["models[0].parameters.weight must be a number, not None"]),
    ("{weight: 1, density: 0}", ["models[0].parameters.density = 0 must be in (0, 1]"]),
    ("{weight: 1, density: 1.5}", ["models[0].parameters.density = 1.5 must be in (0, 1]"]),
    ("{weight: 1, density: -0.1}", ["density = -0.1 must be in (0, 1]"]),
], ids=["weight-abc", "weight-bool", "weight-null", "density-0", "density-1.5", "density-negative"])
def test_bad_model_parameter_values(params, needles):
    expect(ties(f"  - model: /m/a\n    parameters: {params}\n"), f"{SRC}:5:", *needles)


def test_bad_global_parameter_values():
    expect(ties(extra="parameters: {normalize: 3}\n"), f"{SRC}:6:", "parameters.normalize must be a bool, not 3")
    expect(ties(extra="parameters: {density: 1.5}\n"), "parameters.density = 1.5 must be in (0, 1]")
    expect(ties(extra="parameters: {lambda: abc}\n"), "parameters.lambda must be a number")


@pytest.mark.parametrize("value,hint", [
    ("1e-3", "(YAML reads 1e-3 as text; write 0.001)"),
    ("5E-1", "(YAML reads 5E-1 as text; write 0.5)"),
    ("2e7", "(YAML reads 2e7 as text; write 2.0e+07)"),
    ("'0.5'", "(a quoted number is text: write 0.5 without quotes)"),
])
def test_a_number_read_as_text_says_how_to_write_it(value, hint):
    """PyYAML (YAML 1.1, as mergekit) reads 1e-3 as a string: the refusal says how to write it."""
    expect(ties(extra=f"parameters: {{lambda: {value}}}\n"), f"{SRC}:6:", "parameters.lambda must be a number", hint)
    with pytest.raises(UsageError) as e:
        parse_config(ties(extra="parameters: {lambda: abc}\n"), SRC)
    assert "YAML" not in str(e.value)


def test_cached_parameters_equal_resolving_each_tensor():
    """`params_of` (cached by layer position and filter matches) gives every tensor what
    `tensor_params` resolves for it alone: filters on the output and input names, "*", gradients,
    per-model scopes, and values that only differ as 1 / 1.0 / True."""
    from types import SimpleNamespace

    cfg = parse_config(ties(
        "  - model: /m/a\n    parameters:\n      weight: [{filter: self_attn, value: [0.1, 0.9]}, {filter: '*', value: 1}]\n"
        "      density: [{filter: experts.1., value: 0.3}, {value: 1.0}]\n"
        "  - model: /m/b\n    parameters:\n      weight: [0.2, 0.4, 1.0]\n      density: {filter: up_proj, value: 0.7}\n",
        extra="parameters: {density: 0.5, lambda: [{filter: mlp, value: [1, 2]}, {value: 1.0}]}\n"), SRC)
    of = cfg.params_of()
    names = [f"model.layers.{i}.{part}" for i in range(4) for part in
             ("self_attn.q_proj.weight", "mlp.experts.1.up_proj.weight", "mlp.experts.12.down_proj.weight",
              "input_layernorm.weight")] + ["model.embed_tokens.weight", "lm_head.weight"]
    for k, name in enumerate(names):
        t = 0.0 if "layers" not in name else int(name.split(".")[2]) / 3
        inputs = [name, name.replace("up_proj", "gate_proj") if k % 2 else name]
        entries = tuple(SimpleNamespace(name=n) for n in inputs)
        want = cfg.tensor_params(name, t, None, inputs, {})
        assert repr(of(name, t, None, entries, {})) == repr(want), name


def test_density_bounds_accepted():
    for d in ("1", "1.0", "0.01"):
        parse_config(ties(f"  - model: /m/a\n    parameters: {{weight: 1, density: {d}}}\n"), SRC)


@pytest.mark.parametrize("value,layer0,mlp_layer2", [
    ("[{filter: self_attn, value: 0.5}, {value: 1.0}]", 0.5, 1.0),  # mergekit per-tensor filter list
    ("[0.1, 0.5, 0.9]", 0.1, 0.9),  # layer gradient over 3 layers: t = 0, 0.5, 1
    ("{filter: mlp, value: 0.5}", None, 0.5),  # one filter entry; no match falls back to the next scope
])
def test_per_tensor_values(value, layer0, mlp_layer2):
    cfg = parse_config(ties(f"  - model: /m/a\n    parameters:\n      weight: {value}\n      density: 0.5\n",
                            extra="parameters: {weight: 0.25}\n"), SRC)
    attn0 = cfg.tensor_params("model.layers.0.self_attn.q_proj.weight", 0.0)[1][0]["weight"]
    mlp2 = cfg.tensor_params("model.layers.2.mlp.up_proj.weight", 1.0)[1][0]["weight"]
    assert attn0 == (0.25 if layer0 is None else layer0) and mlp2 == mlp_layer2


@pytest.mark.parametrize("value,needle", [("[[0.1, 0.2]]", "gradient"), ("[{filter: a}]", "needs a 'value'"),
                                          ("[{filter: 3, value: 1}]", "'filter' must be a string"),
                                          ("[{filter: a, value: 1, extra: 2}]", "unknown key"),
                                          ("[0.1, .nan]", "finite"), ("[0.5, 2.0]", "must be in (0, 1]")])
def test_bad_per_tensor_values(value, needle):
    expect(ties(f"  - model: /m/a\n    parameters:\n      weight: 1\n      density: {value}\n"), f"{SRC}:7:",
           "models[0].parameters.density", needle)


def test_model_wide_parameters_take_plain_values():
    text = "merge_method: dppa\nbase_model: /m/b\nmodels:\n  - model: /m/a\nparameters:\n  lamda: [0.1, 0.2]\n"
    expect(text, "parameters.lamda", "one value for the whole model")


# --- files and sizes -----------------------------------------------------------------------------


def test_load_config_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yml"))
    (tmp_path / "latin1.yml").write_bytes("merge_method: ties # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config(str(tmp_path / "latin1.yml"))
    (tmp_path / "bad.yml").write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(UsageError, match=r"bad\.yml:3: YAML syntax error"):
        load_config(str(tmp_path / "bad.yml"))


@pytest.mark.parametrize("text,value", [
    ("5GB", 5_000_000_000), ("1GiB", 2**30), ("500M", 500_000_000), ("1.5GiB", 3 * 2**29), ("4KiB", 4096),
    ("2tb", 2 * 10**12), ("100", 100), ("100B", 100), (" 5 GB ", 5_000_000_000), (1234, 1234), ("1e3", 1000),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "", "5XB", "1iB", "-5GB", "MB", "0", "0.0001K", 0, -5, True])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_size(text, "--shard-size")
    assert str(info.value).startswith("--shard-size ") and repr(text) in str(info.value)


# --- the CLI -------------------------------------------------------------------------------------


def _cli(tmp_path, text, *extra):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["merge", str(cfg), str(out), *extra])
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    return res


@pytest.mark.parametrize("text,needle", [
    ("merge_method: ties\nmodels: [\n", "cfg.yml:3: YAML syntax error"),
    (ties(extra="slices: []\n"), "'slices:'"),
    (ties("  - model: /m/a\n    parameters: {weight: abc}\n"), "must be a number"),
], ids=["yaml-syntax", "slices", "wrong-type"])
def test_cli_usage_error(tmp_path, text, needle):
    res = _cli(tmp_path, text)
    assert res.exit_code == EXIT_USAGE, res.output
    assert isinstance(res.exception, SystemExit)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output and res.stdout == ""


def test_cli_bad_size_is_one_line(tmp_path):
    res = _cli(tmp_path, ties(), "--memory-limit", "abc")
    assert res.exit_code == EXIT_USAGE
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
