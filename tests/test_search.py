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
    res = CliRunner().invoke(main, ["search", str(cfg), str(out), "--eval-cmd", cmd, "-q"])
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
