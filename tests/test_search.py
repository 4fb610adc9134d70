"""DPA factor search: the greedy walk (Q11 fixed) and the end-to-end CLI on a toy objective."""

import json
import os
import sys

import torch
from click.testing import CliRunner

from dppa_stream.cli.main import main
from dppa_stream.search import greedy_ascent


def test_greedy_walk_reverts_failed_probes():
    # peak at alpha_A = 2.3; alpha_B does not matter -> its probe at 1.0 fails and is reverted to 0.0
    alpha, best, log = greedy_ascent(lambda a: -abs(a[0] - 2.3), [1.8, 0.0], 0.1)
    assert alpha == [2.3, 0.0] and abs(best) < 1e-9
    assert [r["amplification"] for r in log] == [[1.8, 0.0], [1.9, 0.0], [2.0, 0.0], [2.1, 0.0], [2.2, 0.0],
                                                 [2.3, 0.0], [2.4, 0.0], [2.3, 1.0]]


def test_greedy_walk_second_coordinate_from_one():
    alpha, _, _ = greedy_ascent(lambda a: -abs(a[0] - 1.9) - abs(a[1] - 1.2), [1.8, 0.0], 0.1)
    assert alpha == [1.9, 1.2]


def test_greedy_walk_respects_max_evals():
    _, _, log = greedy_ascent(lambda a: a[0], [1.0], 0.1, max_evals=5)
    assert len(log) == 5


EVAL = """
import sys, glob, torch
from safetensors.torch import load_file
m, base, ft = sys.argv[1:4]
def load(p):
    out = {}
    for f in glob.glob(p + "/*.safetensors"):
        out.update(load_file(f))
    return out
a, b, f = load(m), load(base), load(ft)
name = "model.embed_tokens.weight"  # not pruned by DP: scaled by max(alpha)
ratio = (a[name].float() - b[name].float()).abs().sum() / (f[name].float() - b[name].float()).abs().sum()
print("objective", -abs(ratio.item() - 2.12))
"""


def test_search_cli_finds_toy_optimum(tmp_path, ckpts):
    base, ft1, _ = ckpts(torch.bfloat16, 2, False)
    (tmp_path / "eval.py").write_text(EVAL)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n")
    out = tmp_path / "best"
    cmd = f"{sys.executable} {tmp_path / 'eval.py'} {{model}} {base} {ft1}"
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--strategy", "reference", "-q"])
    assert res.exit_code == 0, res.output
    log = json.loads((out / "search_log.json").read_text())
    assert log["best_amplification"] == [2.1, 0.0]
    assert len(log["evaluations"]) == 6  # 1.8 1.9 2.0 2.1 2.2, then alpha_B = 1.0 (rejected)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert "amplification:\n  - 2.1" in (out / "dppa_stream_config.yml").read_text()
    assert not os.path.exists(str(out) + ".search")


def test_stats_cli_json_and_plot(tmp_path, ckpts):
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, False)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n")
    res = CliRunner().invoke(main, ["stats", str(cfg), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["models"]) == 2 and data["models"][0]["tensors"][0]["densities"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "mlp.up_proj" in res.output


# ---------------------------------------------------------------------------------------------
# The default strategy (tpe): per-model factors, both directions, noise margin, objectives, resume

import math  # noqa: E402

import pytest  # noqa: E402

from dppa_stream.config import parse_config  # noqa: E402
from dppa_stream.search import (OutOfBudget, kept_index, objective_value, parse_start, tpe_search,  # noqa: E402
                                with_factors)


def _budgeted(fn, budget):
    seen = []

    def f(m):
        if len(seen) >= budget:
            raise OutOfBudget
        seen.append([list(r) for r in m])
        return fn(m)

    return f, seen


def test_tpe_moves_factors_down_and_up():
    # optimum: first factor below the start (1.0 -> 0.4), second above it (1.0 -> 2.5)
    f, seen = _budgeted(lambda m: -abs(m[0][0] - 0.4) - abs(m[0][1] - 2.5), 30)
    tpe_search(f, [[1.0, 1.0]], 0.1, 4.0, seed=0)
    assert len(seen) == 30 and seen[0] == [[1.0, 1.0]]
    best = max(seen, key=lambda m: -abs(m[0][0] - 0.4) - abs(m[0][1] - 2.5))
    assert best[0][0] < 0.8 and best[0][1] > 1.8
    assert all(0 <= a <= 4 and abs(a * 10 - round(a * 10)) < 1e-6 for m in seen[1:] for a in m[0])  # on the grid


def test_tpe_is_deterministic_per_seed():
    runs = []
    for seed in (0, 0, 1):
        f, seen = _budgeted(lambda m: -abs(m[0][0] - 1.5), 8)
        tpe_search(f, [[1.0, 0.0]], 0.1, 4.0, seed=seed)
        runs.append(seen)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_tpe_per_model_factors():
    # model 0 wants less amplification than the start, model 1 more
    target = [[0.5, 0.0], [2.0, 0.0]]

    def score(m):
        return -sum(abs(a - t) for row, trow in zip(m, target) for a, t in zip(row, trow))

    f, seen = _budgeted(score, 40)
    tpe_search(f, [[1.0, 0.0], [1.0, 0.0]], 0.1, 4.0, seed=0)
    best = max(seen, key=score)
    assert best[0][0] < 1.0 < best[1][0] and best[0] != best[1]


def test_min_gain_keeps_the_start_unless_beaten_by_more():
    assert kept_index([0.50, 0.51], 0.0) == 1
    assert kept_index([0.50, 0.51], 0.01) == 0  # one example of 100 is not enough
    assert kept_index([0.50, 0.505, 0.52], 0.01) == 2
    assert kept_index([0.50, 0.53, 0.535, 0.54], 0.01) == 1  # the incumbent must be beaten by more than the margin
    assert kept_index([0.5, 0.4], 0.0) == 0


def test_objectives():
    assert objective_value([0.7], None, "geomean") == objective_value([0.7], None, "min") == 0.7
    assert objective_value([0.7], [0.5], "mean") == pytest.approx(1.4)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "mean") == pytest.approx(0.7)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "min") == pytest.approx(0.4)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "geomean") == pytest.approx(math.sqrt(0.4))
    # one task at 0 does not zero the geometric mean: the other task still counts
    a = objective_value([0.0, 0.4], [0.5, 0.8], "geomean")
    b = objective_value([0.0, 0.8], [0.5, 0.8], "geomean")
    assert 0 < a < b and b == pytest.approx(math.sqrt(0.01 * 1.0))


def test_parse_start_and_per_model_config(tmp_path):
    assert parse_start("1.8,0") == [[1.8, 0.0]]
    assert parse_start("1.8,0;1.5,0.5") == [[1.8, 0.0], [1.5, 0.5]]
    with pytest.raises(Exception, match="--start"):
        parse_start("1.8;x")
    cfg = parse_config("merge_method: dppa\nbase_model: /b\nmodels:\n  - /b\n  - model: /m1\n    parameters: {weight: 0.5}\n"
                       "  - /m2\nparameters: {amplification: [1.8, 0.0]}\n")
    per = with_factors(cfg, [[0.5, 0.0], [2.0, 1.0]], shared=False).method()
    assert [per.factors(m) for m in per.mparams] == [[0.5, 0.0], [2.0, 1.0]]
    assert with_factors(cfg, [[0.5, 0.0], [2.0, 1.0]], shared=False).models[0].params["weight"] == 0.5
    shared = with_factors(cfg, [[1.1, 0.2], [1.1, 0.2]], shared=True).method()
    assert [shared.factors(m) for m in shared.mparams] == [[1.1, 0.2], [1.1, 0.2]]


EVAL_NP = """
import glob, os, sys
import numpy as np
from safetensors.numpy import load_file
m, base, ft, calls = sys.argv[1:5]
with open(calls, "a") as f:
    f.write("x\\n")
n = sum(1 for _ in open(calls))
if os.path.exists(calls + ".fail") and n >= int(open(calls + ".fail").read()):
    sys.exit("simulated crash")
def load(p):
    out = {}
    for f in glob.glob(p + "/*.safetensors"):
        out.update(load_file(f))
    return out
a, b, f = load(m), load(base), load(ft)
name = "model.embed_tokens.weight"  # not pruned by DP: scaled by max(alpha)
ratio = np.abs(a[name] - b[name]).sum() / np.abs(f[name] - b[name]).sum()
print("objective", TARGET)
"""


def _toy(tmp_path, ckpts, target):
    base, ft1 = ckpts(torch.float32, 1, False)
    (tmp_path / "eval.py").write_text(EVAL_NP.replace("TARGET", target))
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n")
    calls = tmp_path / "calls.txt"
    cmd = f"{sys.executable} {tmp_path / 'eval.py'} {{model}} {base} {ft1} {calls}"
    return cfg, cmd, calls


def _ncalls(calls):
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_search_cli_tpe_moves_down_and_resumes(tmp_path, ckpts):
    # the best embedding scale is 0.62: below the start's max(alpha) = 1, which the reference walk cannot reach
    cfg, cmd, calls = _toy(tmp_path, ckpts, "-abs(ratio - 0.62)")
    args = ["search", str(cfg), "--eval-cmd", cmd, "--start", "1,0", "--max-evals", "8", "--max-factor", "1.5",
            "--min-gain", "0.001"]
    full = tmp_path / "full"
    res = CliRunner().invoke(main, [args[0], args[1], str(full)] + args[2:])
    assert res.exit_code == 0, res.output
    log = json.loads((full / "search_log.json").read_text())
    assert log["strategy"] == "tpe" and log["evaluations_used"] == 8 == _ncalls(calls)
    assert log["beat_start"] and max(log["best_factors"][0]) < 1.0
    assert log["best_score"] > log["start_score"] + 0.001
    assert "-> [" in res.output and "kept the best candidate" in res.output
    # interrupted at the 4th evaluation: 3 are logged; --resume re-runs none of them and ends where `full` did
    calls.unlink()
    (tmp_path / "calls.txt.fail").write_text("4")
    out = tmp_path / "resumed"
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:])
    assert res.exit_code == 2 and "simulated crash" in res.output
    logged = (tmp_path / "resumed.search" / "search_log.jsonl").read_text().splitlines()
    assert len(logged) == 1 + 3
    # a log of another seed (or config, inputs, strategy) is refused
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--resume", "--seed", "1"])
    assert res.exit_code == 4 and "remove it or run without --resume" in res.output
    (tmp_path / "calls.txt.fail").unlink()
    calls.unlink()
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--resume"])
    assert res.exit_code == 0, res.output
    assert _ncalls(calls) == 8 - 3
    again = json.loads((out / "search_log.json").read_text())
    assert [e["factors"] for e in again["evaluations"]] == [e["factors"] for e in log["evaluations"]]
    assert [e["replayed"] for e in again["evaluations"]] == [True] * 3 + [False] * 5
    assert again["best_factors"] == log["best_factors"]
    assert not os.path.exists(str(out) + ".search")


def test_search_cli_keeps_the_start_when_nothing_beats_it(tmp_path, ckpts):
    cfg, cmd, calls = _toy(tmp_path, ckpts, "0.5")
    out = tmp_path / "best"
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--start", "1.2,0",
                                    "--max-evals", "3"])
    assert res.exit_code == 0, res.output
    assert "no candidate beat the start by more than 0.01; kept the start" in res.output
    log = json.loads((out / "search_log.json").read_text())
    assert not log["beat_start"] and log["best_factors"] == [[1.2, 0.0]] and log["best_evaluation"] == 1
    assert "amplification:\n    - 1.2\n    - 0.0" in (out / "dppa_stream_config.yml").read_text()
    assert "kept the start" in (out / "search_log.md").read_text()
