"""DPA factor search: the greedy walk (Q11 fixed) and the end-to-end CLI on a toy objective."""

import json
import os
import sys

import torch
from click.testing import CliRunner

from dppa_stream.cli.main import main
from dppa_stream.search import Judge, OutOfBudget, Params, Space, compass, refine, walk


class Toy:
    """A strategy's view of a Python function of the parameters: memo, budget, beats by a margin."""

    def __init__(self, fn, budget=100, min_gain=0.0):
        self.fn, self.budget, self.judge = fn, budget, Judge(None, "mean", min_gain)
        self.seen, self.memo = [], {}

    def __call__(self, p):
        if p not in self.memo:
            if len(self.seen) >= self.budget:
                raise OutOfBudget
            self.seen.append(p)
            self.memo[p] = _Ev(p, [self.fn(p)])
        return self.memo[p]

    def beats(self, a, b):
        return self.judge.beats(a.scores, b.scores)

    def best(self):
        return max(self.memo.values(), key=lambda e: e.scores[0]).params


class _Ev:
    def __init__(self, params, scores):
        self.params, self.scores, self.objective = params, scores, scores[0]


def _p(factors, rates=(0.9, 0.8), lamda=0.08, weights=None):
    return Params.make(rates, factors, lamda, weights or [1.0] * len(factors))


def _run(strategy, toy, *args):
    try:
        return strategy(toy, toy.beats, *args)
    except OutOfBudget:
        return None


def test_walk_reverts_failed_probes():
    # peak at alpha_A = 2.3; alpha_B does not matter -> its probe at 1.0 fails and is reverted to 0.0
    toy = Toy(lambda p: -abs(p.factors[0][0] - 2.3))
    best = _run(walk, toy, _p([[1.8, 0.0]]), 0.1)
    assert best.params.factors == ((2.3, 0.0),)
    assert [p.factors[0] for p in toy.seen] == [(1.8, 0.0), (1.9, 0.0), (2.0, 0.0), (2.1, 0.0), (2.2, 0.0),
                                                (2.3, 0.0), (2.4, 0.0), (2.3, 1.0)]


def test_walk_second_coordinate_from_one():
    toy = Toy(lambda p: -abs(p.factors[0][0] - 1.9) - abs(p.factors[0][1] - 1.2))
    assert _run(walk, toy, _p([[1.8, 0.0]]), 0.1).params.factors == ((1.9, 1.2),)


def test_walk_respects_the_budget():
    toy = Toy(lambda p: p.factors[0][0], budget=5)
    assert _run(walk, toy, _p([[1.0, 0.0]]), 0.1) is None and len(toy.seen) == 5


def test_effective_factors_one_model_per_point():
    # [0.9, 1.5], [1.5, 1.5] and [0, 1.5] are one model: the top partition gets max(alpha_1, alpha_2)
    assert _p([[0.9, 1.5]]) == _p([[1.5, 1.5]]) == _p([[0.0, 1.5]]) != _p([[1.5, 1.4]])
    assert _p([[0.9, 1.5]]).factors == ((1.5, 1.5),)


def test_space_moves_push_neighbours_and_stay_valid():
    sp = Space(("factors", "rates"), _p([[1.0, 0.5]]), 0.1, 4.0)
    x = sp.point(_p([[1.0, 0.5]]))
    assert x == (1.0, 0.5, 0.9, 0.8)
    assert sp.move(x, 0, -6) == (0.4, 0.4, 0.9, 0.8)  # the top factor lowered below the next lowers it too
    assert sp.move(x, 1, 6) == (1.1, 1.1, 0.9, 0.8)  # the next raised above the top raises it
    assert sp.move(x, 3, 2) == (1.0, 0.5, 0.95, 0.9)  # a rate raised into the one above pushes it up
    assert sp.move(x, 2, 1) == (1.0, 0.5, 0.95, 0.8)
    assert sp.move(sp.move(x, 2, 1), 2, 1) is None  # above RATE_MAX


def test_space_move_at_the_top_rate():
    sp = Space(("rates",), _p([[1.0, 0.0]], rates=(0.9, 0.8)), 0.1, 4.0)
    assert sp.move((0.9, 0.8), 0, 1) == (0.95, 0.8)
    assert sp.move((0.95, 0.8), 0, 1) is None
    assert sp.move((0.9, 0.8), 1, -16) == (0.9, 0.0) and sp.move((0.9, 0.8), 1, -17) is None


def test_unit_cube_maps_onto_valid_snapped_points():
    import random

    sp = Space(("factors", "rates", "lamda"), _p([[1.0, 0.0], [1.0, 0.0]]), 0.1, 4.0)
    rnd = random.Random(0)
    for _ in range(500):
        p = sp.decode([rnd.random() for _ in sp.coords])
        assert all(row[0] >= row[1] >= 0 for row in p.factors) and all(a <= 4.0 for row in p.factors for a in row)
        assert all(abs(a * 10 - round(a * 10)) < 1e-6 for row in p.factors for a in row)
        assert 0.95 >= p.rates[0] > p.rates[1] >= 0 and abs(p.rates[0] * 20 - round(p.rates[0] * 20)) < 1e-6
        assert 0 <= p.lamda <= 0.3
        assert sp.decode(sp.encode(p)) == p  # the cube point of a valid point decodes back to it


def test_compass_goes_down_and_per_model():
    # model 0 wants [0.4, 0.4] (below the start: the walk cannot go there), model 1 [2.0, 1.0]
    target = ((0.4, 0.4), (2.0, 1.0))
    fn = lambda p: -sum(abs(a - t) for r, tr in zip(p.factors, target) for a, t in zip(r, tr))  # noqa: E731
    toy = Toy(fn)
    start = _p([[1.0, 0.0], [1.0, 0.0]])
    sp = Space(("factors",), start, 0.1, 4.0)
    _run(refine, toy, sp, start, 0.1)
    assert toy.best().factors == target


def test_refine_starts_with_the_walk():
    # refine makes exactly the walk's evaluations first, so at a budget the walk has not finished, they agree
    fn = lambda p: -abs(p.factors[0][0] - 1.9) - abs(p.factors[0][1] - 1.2) + 0.01 * p.factors[0][1]  # noqa: E731
    ref, ours = Toy(fn), Toy(fn)
    start = _p([[1.8, 0.0]])
    _run(walk, ref, start, 0.1)
    _run(refine, ours, Space(("factors",), start, 0.1, 4.0), start, 0.1)
    assert ours.seen[:len(ref.seen)] == ref.seen and len(ours.seen) > len(ref.seen)


def test_compass_doubles_its_step_on_a_plateau():
    # flat within 0.25 of the start, better beyond: one-step moves see nothing, doubled steps find it
    fn = lambda p: 1.0 if p.factors[0][0] >= 1.45 else 0.0  # noqa: E731
    toy = Toy(fn)
    start = _p([[1.0, 1.0]])
    compass(toy, toy.beats, Space(("factors",), start, 0.1, 4.0), toy(start))
    assert toy.best().factors[0][0] >= 1.45


EVAL = """
import sys
import numpy as np
from dppa_stream.checkpoint import Checkpoint, read_range
m, base, ft = sys.argv[1:4]
name = "model.embed_tokens.weight"  # not pruned by DP: scaled by max(alpha)
def load(p):  # that tensor as float64, read by the project's reader (torch takes seconds to import)
    e = Checkpoint.open(p).tensors[name]
    raw = np.empty(e.nbytes, np.uint8)
    read_range(e, 0, e.numel, raw)
    if e.dtype == "BF16":  # numpy has no bf16: its bits are a float32's upper half
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert e.dtype == "F32", e.dtype
    return raw.view(np.float32).astype(np.float64)
a, b, f = load(m), load(base), load(ft)
ratio = np.abs(a - b).sum() / np.abs(f - b).sum()
print("objective", -abs(ratio - 2.12))
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
# Samplers, the noise margin, objectives, configs

import math  # noqa: E402

import pytest  # noqa: E402

from dppa_stream.config import parse_config  # noqa: E402
from dppa_stream.search import (Incumbent, objective_value, parse_start, parse_tune, sampler_search,  # noqa: E402
                                with_params)


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_samplers_move_factors_down_and_up(sampler):
    # optimum: effective [1.6, 0.4] from the start [1.0, 1.0]: the second factor below the start, the first above
    fn = lambda p: -abs(p.factors[0][0] - 1.6) - abs(p.factors[0][1] - 0.4)  # noqa: E731
    toy = Toy(fn, budget=30)
    start = _p([[1.0, 1.0]])
    _run(lambda f, b, *a: sampler_search(f, *a), toy, Space(("factors",), start, 0.1, 4.0), start, sampler, 0)
    assert len(toy.seen) == 30 and toy.seen[0] == start and len(set(toy.seen)) == 30
    best = toy.best().factors[0]
    assert best[0] > 1.2 and best[1] < 0.8, best
    assert all(0 <= a <= 4 and abs(a * 10 - round(a * 10)) < 1e-6 for p in toy.seen[1:] for a in p.factors[0])


def test_samplers_are_deterministic_per_seed():
    runs = []
    for seed in (0, 0, 1):
        toy = Toy(lambda p: -abs(p.factors[0][0] - 1.5), budget=8)
        start = _p([[1.0, 0.0]])
        _run(lambda f, b, *a: sampler_search(f, *a), toy, Space(("factors",), start, 0.1, 4.0), start, "tpe", seed)
        runs.append(toy.seen)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _kept(scores, judge):
    inc = Incumbent(judge)
    evs = [_Ev(None, s) for s in scores]
    for ev in evs:
        inc.offer(ev)
    return evs.index(inc.ev)


def test_min_gain_is_in_score_units():
    one = Judge(None, "mean", 0.01)
    assert _kept([[0.50], [0.51]], Judge(None, "mean", 0.0)) == 1
    assert _kept([[0.50], [0.51]], one) == 0  # one example of 100 is not enough
    assert _kept([[0.50], [0.505], [0.52]], one) == 2
    assert _kept([[0.50], [0.53], [0.535], [0.54]], one) == 1  # the incumbent must be beaten by more
    assert _kept([[0.5], [0.4]], Judge()) == 0
    # geomean of two tasks, one at zero: one example more on the dead task (0 -> 0.01, under the 1 % floor
    # of a dense score of 1) is within a margin of one example, and so is one more on the other task;
    # two examples on the dead task are not (the docs: the margin is in score units, whatever the objective)
    geo = Judge([1.0, 0.8], "geomean", 0.01)
    assert not geo.beats([0.01, 0.5], [0.0, 0.5]) and not geo.beats([0.0, 0.51], [0.0, 0.5])
    assert geo.beats([0.02, 0.5], [0.0, 0.5]) and geo.beats([0.0, 0.52], [0.0, 0.5])
    # the margin used to be in objective units: one example more on the dead task (0.01 -> 0.02) moved the
    # geomean by 0.033, three margins; now it is one example, within the margin
    lift = objective_value([0.02, 0.5], [1.0, 0.8], "geomean") - objective_value([0.01, 0.5], [1.0, 0.8], "geomean")
    assert lift > 0.03 and not geo.beats([0.02, 0.5], [0.01, 0.5])


def test_objectives():
    assert objective_value([0.7], None, "geomean") == objective_value([0.7], None, "min") == 0.7
    assert objective_value([0.7], [0.5], "mean") == pytest.approx(1.4)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "mean") == pytest.approx(0.7)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "min") == pytest.approx(0.4)
    assert objective_value([0.2, 0.8], [0.5, 0.8], "geomean") == pytest.approx(math.sqrt(0.4))
    # a zero (or anything under 1 % of the dense score, negative too) counts as exactly 1 % in the geomean
    assert objective_value([0.0, 0.8], [0.5, 0.8], "geomean") == pytest.approx(math.sqrt(0.01 * 1.0))
    assert objective_value([-0.3, 0.8], [0.5, 0.8], "geomean") == objective_value([0.004, 0.8], [0.5, 0.8], "geomean")
    assert objective_value([0.0, 0.8], [0.5, 0.8], "mean") == pytest.approx(0.5)
    assert objective_value([0.0, 0.8], [0.5, 0.8], "min") == 0.0


def test_parse_start_tune_and_configs():
    assert parse_start("1.8,0") == [[1.8, 0.0]]
    assert parse_start("1.8,0;1.5,0.5") == [[1.8, 0.0], [1.5, 0.5]]
    with pytest.raises(Exception, match="--start"):
        parse_start("1.8;x")
    assert parse_tune("lamda,factors") == ("factors", "lamda")
    with pytest.raises(Exception, match="--tune"):
        parse_tune("factors,alpha")
    cfg = parse_config("merge_method: dppa\nbase_model: /b\nmodels:\n  - /b\n  - model: /m1\n    parameters: {weight: 0.5}\n"
                       "  - /m2\nparameters: {amplification: [1.8, 0.0]}\n")
    per = with_params(cfg, _p([[0.5, 0.0], [2.0, 1.0]], weights=[0.5, 1.0])).method()
    assert [per.factors(m) for m in per.mparams] == [[0.5, 0.0], [2.0, 1.0]]
    assert with_params(cfg, _p([[0.5, 0.0], [2.0, 1.0]])).models[0].params["weight"] == 0.5  # not tuned: kept
    shared = with_params(cfg, _p([[1.1, 0.2], [1.1, 0.2]]))
    assert shared.parameters["amplification"] == [1.1, 0.2] and "amplification" not in shared.models[1].params
    tuned = with_params(cfg, _p([[1.0, 0.0]] * 2, rates=(0.6, 0.5), lamda=0.03, weights=[0.25, 0.75]),
                        ("rates", "lamda", "weight"))
    m = tuned.method()
    assert m.rates == [0.6, 0.5] and m.params["lamda"] == 0.03
    assert [x.params["weight"] for x in tuned.models] == [0.25, 0.75]


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


def _merge_again(output: str, tmp_path):
    """Run the report's last line (the merge command for the kept settings) and return OUT-merged."""
    import shlex

    line = output.strip().splitlines()[-1]
    words = shlex.split(line)
    if words[0] == "cd":  # cd DIR && dppa-stream merge ...
        os.chdir(words[1])
        words = words[3:]
    assert words[:2] == ["dppa-stream", "merge"], line
    res = CliRunner().invoke(main, words[1:])
    assert res.exit_code == 0, res.output
    return words[-1]


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_search_cli_default_moves_down_resumes_and_extends(tmp_path, ckpts, monkeypatch):
    # the best embedding scale is 0.62: below the start's max(alpha) = 1, which the reference walk cannot reach
    cfg, cmd, calls = _toy(tmp_path, ckpts, "-abs(ratio - 0.62)")
    args = ["search", str(cfg), "--eval-cmd", cmd, "--start", "1,0", "--max-factor", "1.5"]
    full = tmp_path / "full"
    res = CliRunner().invoke(main, [args[0], args[1], str(full)] + args[2:] + ["--max-evals", "8"])
    assert res.exit_code == 0, res.output
    log = json.loads((full / "search_log.json").read_text())
    assert log["strategy"] == "refine" and log["evaluations_used"] == 8 == _ncalls(calls)
    assert log["beat_start"] and log["best_factors"] == [[0.6, 0.0]]
    assert len({e["digest"] for e in log["evaluations"]}) == 8  # eight different models
    assert "-> [" in res.output and "kept the best candidate" in res.output and "cost per evaluation" in res.output
    # the last line merges the kept settings again, into the same weights
    monkeypatch.chdir(tmp_path)
    again = _merge_again(res.output, tmp_path)
    a, b = _weights(full), _weights(again)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # interrupted at the 4th evaluation: 3 are logged; --resume re-runs none of them and ends where `full` did
    calls.unlink()
    (tmp_path / "calls.txt.fail").write_text("4")
    out = tmp_path / "resumed"
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--max-evals", "8"])
    assert res.exit_code == 2 and "simulated crash" in res.output
    logged = (tmp_path / "resumed.search" / "search_log.jsonl").read_text().splitlines()
    assert len(logged) == 1 + 3
    # a log of another seed (or config, inputs, strategy, tuned set) is refused
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--max-evals", "8", "--resume",
                                                                               "--seed", "1"])
    assert res.exit_code == 4 and "remove it or run without --resume" in res.output
    (tmp_path / "calls.txt.fail").unlink()
    calls.unlink()
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--max-evals", "5", "--resume"])
    assert res.exit_code == 0, res.output
    assert _ncalls(calls) == 5 - 3
    assert not os.path.exists(str(out) + ".search")
    # a finished search is extended by --resume with a larger budget: the 5 are replayed, 3 more run, and the
    # result is the one of the search that had 8 from the start
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--max-evals", "8", "--resume"])
    assert res.exit_code == 0, res.output
    assert _ncalls(calls) == 8 - 3
    again = json.loads((out / "search_log.json").read_text())
    assert [e["factors"] for e in again["evaluations"]] == [e["factors"] for e in log["evaluations"]]
    assert [e["replayed"] for e in again["evaluations"]] == [True] * 5 + [False] * 3
    assert again["best_factors"] == log["best_factors"]
    a, b = _weights(full), _weights(out)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    # without --resume an existing OUT is still refused
    res = CliRunner().invoke(main, [args[0], args[1], str(out)] + args[2:] + ["--max-evals", "9"])
    assert res.exit_code == 4 and "already exists" in res.output


def test_search_cli_never_evaluates_a_model_twice(tmp_path, ckpts):
    # raw factors [0.5, 1.4] and [1.4, 1.4] are one model: the samplers propose effective factors, and a
    # repeated model is answered from memory, so every evaluation is a different model
    cfg, cmd, calls = _toy(tmp_path, ckpts, "-abs(ratio - 1.3)")
    for strategy in ("tpe", "cmaes"):
        out = tmp_path / strategy
        res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--start", "0.5,1.4",
                                        "--max-evals", "10", "--max-factor", "2", "--strategy", strategy])
        assert res.exit_code == 0, res.output
        log = json.loads((out / "search_log.json").read_text())
        assert log["start_factors"] == [[1.4, 1.4]]
        assert len({e["digest"] for e in log["evaluations"]}) == len(log["evaluations"]) == 10
        assert all(e["factors"][0][0] >= e["factors"][0][1] for e in log["evaluations"])


def test_search_cli_same_plan_is_one_model(tmp_path, ckpts):
    # lamda cannot matter when DP prunes one linear (its block and linear signals normalise to 0): every
    # lamda is the start's model, so the search evaluates it once and answers every other proposal from memory
    cfg, cmd, calls = _toy(tmp_path, ckpts, "0.5")
    cfg.write_text(cfg.read_text() + "parameters:\n  linear_filter: 'layers\\.(0)\\.self_attn\\.q_proj'\n")
    out = tmp_path / "best"
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--tune", "lamda",
                                    "--max-evals", "5"])
    assert res.exit_code == 0, res.output
    log = json.loads((out / "search_log.json").read_text())
    assert log["evaluations_used"] == 1 == _ncalls(calls) and log["repeats"] > 0
    assert "proposals were models already evaluated" in res.output


KEPT_SHARE = """
import glob, sys
import numpy as np
from safetensors.numpy import load_file
m, base = sys.argv[1:3]
def load(p):
    out = {}
    for f in glob.glob(p + "/*.safetensors"):
        out.update(load_file(f))
    return out
a, b = load(m), load(base)
names = [n for n in a if ".layers." in n and n.endswith("proj.weight")]
kept = sum(int((a[n] != b[n]).sum()) for n in names) / sum(a[n].size for n in names)
print("kept share", kept, "score", -abs(kept - 0.35))
"""


def test_search_cli_tunes_rates_from_one_pass1(tmp_path, ckpts, monkeypatch):
    import dppa_stream.statistics as st

    base, ft1 = ckpts(torch.float32, 1, False)
    (tmp_path / "eval.py").write_text(KEPT_SHARE)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n")
    cmd = f"{sys.executable} {tmp_path / 'eval.py'} {{model}} {base}"
    reads = []
    real = st.stats_task
    monkeypatch.setattr(st, "stats_task", lambda *a: reads.append(1) or real(*a))
    logs = []
    for n in (2, 7):  # more candidates, no more statistics reads: every rate is planned from pass 1
        reads.clear()
        out = tmp_path / f"best{n}"
        res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--tune", "rates",
                                        "--max-evals", str(n)])
        assert res.exit_code == 0, res.output
        logs.append((len(reads), json.loads((out / "search_log.json").read_text())))
    assert logs[0][0] == logs[1][0] > 0
    log = logs[1][1]
    # the start keeps ~10 % (alpha [1.8, 0] zeroes the second band): the search lowers the rates towards 65 %
    assert log["start"]["rates"] == [0.9, 0.8] and log["kept"]["rates"][0] < 0.8
    assert log["best_score"] > log["start_score"] + 0.1
    assert "rates [0.9, 0.8]" in res.output
    assert "pruning_rates:" in (tmp_path / "best7" / "dppa_stream_config.yml").read_text()


def test_search_cli_refuses_redundant_or_unknown_tuning(tmp_path, ckpts):
    cfg, cmd, calls = _toy(tmp_path, ckpts, "0.5")
    for extra, msg in ((["--tune", "factors,weight"], "only scales its factors"),
                       (["--tune", "alpha"], "--tune"),
                       (["--tune", "rates", "--strategy", "reference"], "factors only")):
        res = CliRunner().invoke(main, ["search", str(cfg), str(tmp_path / "o"), "--eval-cmd", cmd] + extra)
        assert res.exit_code == 2 and msg in res.output, res.output
        assert _ncalls(calls) == 0 and not os.path.exists(tmp_path / "o.search")


def test_search_cli_keeps_the_start_when_nothing_beats_it(tmp_path, ckpts):
    cfg, cmd, calls = _toy(tmp_path, ckpts, "0.5")
    out = tmp_path / "best"
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--start", "1.2,0",
                                    "--max-evals", "3", "--min-gain", "0.01"])
    assert res.exit_code == 0, res.output
    assert "no candidate beat the start by more than 0.01; kept the start" in res.output
    log = json.loads((out / "search_log.json").read_text())
    assert not log["beat_start"] and log["best_factors"] == [[1.2, 0.0]] and log["best_evaluation"] == 1
    assert "amplification:\n  - 1.2\n  - 0.0" in (out / "dppa_stream_config.yml").read_text()
    assert "kept the start" in (out / "search_log.md").read_text()


def test_search_cli_resume_an_interrupted_extension_and_refuse_another_search(tmp_path, ckpts):
    cfg, cmd, calls = _toy(tmp_path, ckpts, "-abs(ratio - 0.62)")
    args = ["search", str(cfg), str(tmp_path / "o"), "--eval-cmd", cmd, "--start", "1,0"]
    assert CliRunner().invoke(main, args + ["--max-evals", "3"]).exit_code == 0
    # the extension to 6 crashes at its 2nd new evaluation; OUT still holds the finished search of 3
    calls.unlink()
    (tmp_path / "calls.txt.fail").write_text("2")
    res = CliRunner().invoke(main, args + ["--max-evals", "6", "--resume"])
    assert res.exit_code == 2 and "simulated crash" in res.output
    assert json.loads((tmp_path / "o" / "search_log.json").read_text())["evaluations_used"] == 3
    (tmp_path / "calls.txt.fail").unlink()
    calls.unlink()
    res = CliRunner().invoke(main, args + ["--max-evals", "6", "--resume"])
    assert res.exit_code == 0, res.output
    assert _ncalls(calls) == 2  # the 4th was logged before the crash
    log = json.loads((tmp_path / "o" / "search_log.json").read_text())
    assert [e["replayed"] for e in log["evaluations"]] == [True] * 4 + [False] * 2
    # OUT holding a search of another strategy is not replaced by --resume
    res = CliRunner().invoke(main, args + ["--max-evals", "7", "--resume", "--strategy", "tpe"])
    assert res.exit_code == 4 and "holds another search" in res.output
    assert json.loads((tmp_path / "o" / "search_log.json").read_text())["evaluations_used"] == 6


def test_search_cli_tunes_a_weight(tmp_path, ckpts):
    # the embedding delta is scaled by weight x max(alpha) = weight at the start [1, 0]: the best weight is 0.5
    cfg, cmd, calls = _toy(tmp_path, ckpts, "-abs(ratio - 0.5)")
    out = tmp_path / "best"
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "--start", "1,0",
                                    "--tune", "weight", "--max-evals", "14"])
    assert res.exit_code == 0, res.output
    log = json.loads((out / "search_log.json").read_text())
    assert log["start"]["weights"] == [1.0] and log["kept"]["weights"] == [0.5]
    assert "weight 1 -> 0.5" in res.output
    assert "weight: 0.5" in (out / "dppa_stream_config.yml").read_text()
