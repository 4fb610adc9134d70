"""The merge-quality benchmark (benchmarks/quality/) runs end to end in its smoke version: a tiny
Llama trained on CPU, one domain, pruned and merged by the `dppa-stream merge`/`search` commands,
evaluated by batched greedy decoding, with results JSON, tables and plot written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quality_smoke(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "DPPA_QUALITY_EVAL_SOCKET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality.run", "--smoke", "--cache", str(cache), "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cache / "results"
    res = json.loads((out / "quality.json").read_text())
    assert "### Table 1" in (out / "tables.md").read_text()
    assert (out / "retention.png").stat().st_size > 1000
    (seed,) = res["seeds"]
    (domain,) = res["plan"]["domains"]

    # Checkpoints were saved with save_pretrained under the cache, keyed by a config hash.
    for path in seed["checkpoints"].values():
        assert os.path.isfile(os.path.join(path, "model.safetensors")) and str(cache) in path
    assert 0 < seed["drift"][f"{domain}-complex"]["overall"]

    # Table 1: every (method, rate) row, a kept share near the nominal density, finite retention.
    rows = {(r["method"], r["rate"]): r for r in seed["table1"]}
    assert set(rows) == {(m, r) for m in res["plan"]["table1_methods"] for r in res["plan"]["rates"]}
    for (method, rate), r in rows.items():
        assert 0 <= r["acc"] <= 1 and math.isfinite(r["retention"])
        if method == "dppa":
            assert r["search_evals"] >= 1 and len(r["amplification"]) == 2
            assert r["kept"] <= 1 - rate + 0.1 + 0.05
        else:
            assert abs(r["kept"] - (1 - rate)) < 0.05
    # Table 2: the baselines and the searched DPPA merge.
    methods = {(r["method"], r["variant"]) for r in seed["table2"]}
    assert ("task_arithmetic", "lambda=1") in methods and ("dppa", "w=1") in methods

    # The search's evaluation command, run on its own (no server), agrees with the server's score.
    env_local = dict(env)
    ev = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "quality", "evaluate.py"),
                         "--model", seed["checkpoints"]["base"], "--domain", domain, "--split", "val",
                         "--n", str(res["plan"]["n_val"])], cwd=REPO, env=env_local, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert float(ev.stdout.split()[-1]) == pytest.approx(seed["base_acc"]["val"][domain])
