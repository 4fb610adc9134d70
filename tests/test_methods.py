"""Every mergekit method beyond the delta basics is chunk-invariant and stays within its memory limit.

For each method: the merge with default work units (every tensor of these tiny models in one
unit, statistics gathered inline) and the merge with 1500-byte units (tensors split over many
units, statistics gathered by Dask passes, rows never split) write the same bytes. The split runs
are made in one fresh process (no torch imported), with `memory_limit` 400 MiB on 2 threads, and
each reports its peak anonymous memory, which must stay within that limit. One method also runs
through the CLI (`--memory-limit 400MiB`) under a hard cgroup cap of the same size
(benchmarks/capped_run.py) when this machine lets us create a memory cgroup.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPPED_RUN = os.path.join(ROOT, "benchmarks", "capped_run.py")
TINY = LlamaShape(hidden=16, intermediate=24, layers=2, vocab=24, heads=4, kv_heads=2)
UNIT_BYTES = 1500
LIMIT = 400 << 20
SCHEDULER = "threads:2"  # the smallest accepted limit grows with the worker count: fixed here

_ALL3 = "models:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\n"
_W3 = ("models:\n  - model: {ft1}\n    parameters: {weight: 0.5, %s}\n  - model: {ft2}\n    parameters: {weight: 0.3, %s}\n"
       "  - model: {ft3}\n    parameters: {weight: 0.8, %s}\n")
METHODS = {
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\n" + _W3 % (("density: 0.7, gamma: 0.05",) * 3),
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\n" + _W3 % ("density: 0.7, gamma: 0.05",
                                                                                        "density: 0.5, gamma: 0.01",
                                                                                        "density: 0.9, gamma: 0.02"),
    "della": "merge_method: della\nbase_model: {base}\n" + _W3 % ("density: 0.4", "density: 0.5, epsilon: 0.1",
                                                                  "density: 0.7"),
    "della_linear": "merge_method: della_linear\nbase_model: {base}\n" + _W3 % (("density: 0.4",) * 3),
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {t: [0.1, 0.9]}\n",
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {weight: 0.4}\n"
               "  - model: {ft2}\n    parameters: {weight: 0.6}\n",
    "nuslerp_rows": "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {weight: 0.4}\n"
                    "  - model: {ft2}\n    parameters: {weight: 0.6}\nparameters: {nuslerp_flatten: false}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\n" + _W3 % ("", "", ""),
    "karcher": "merge_method: karcher\nbase_model: {base}\n" + _ALL3,
    "model_stock": "merge_method: model_stock\nbase_model: {base}\n" + _ALL3,
    "model_stock_filter_wise": "merge_method: model_stock\nbase_model: {base}\n" + _ALL3 + "parameters: {filter_wise: true}\n",
    "sce": "merge_method: sce\nbase_model: {base}\n" + _ALL3 + "parameters: {select_topk: 0.3}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {ft2}\nparameters: {t: 0.0005}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {ft1}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources:\n      - {model: {ft1}, layer_range: [0, 2]}\n"
                   "  - sources:\n      - {model: {ft2}, layer_range: [1, 2], parameters: {scale: 0.5}}\n",
    "ram": "merge_method: ram\nbase_model: {base}\n" + _ALL3 + "parameters: {epsilon: 0.0005}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\n" + _ALL3 + "parameters: {epsilon: 0.0005, r: 0.3}\n",
}

_RUNNER = """
import json, sys
from dppa_stream.config import load_config
from dppa_stream.pipeline import MergeOptions, merge
out = {}
for name, cfg, dst in json.loads(sys.argv[1]):
    r = merge(load_config(cfg), dst, MergeOptions(quiet=True, seed=3, memory_limit=%d, unit_bytes=%d, scheduler=%r))
    out[name] = {"peak": r.peak_anon_bytes, "limit": r.memory_limit, "units": r.units, "split": r.split_tensors,
                 "tensors": r.tensors}
    assert "torch" not in sys.modules
print(json.dumps(out))
""" % (LIMIT, UNIT_BYTES, SCHEDULER)


def _config(tmp, paths, name) -> str:
    text = METHODS[name]
    for k, p in zip(("base", "ft1", "ft2", "ft3"), paths):
        text = text.replace("{" + k + "}", p)
    path = os.path.join(tmp, f"{name}.yml")
    with open(path, "w") as f:
        f.write(text + "out_dtype: float32\n")  # float32 output: no rounding can hide a difference
    return path


@pytest.fixture(scope="module")
def split_runs(ckpts, tmp_path_factory):
    """Every method merged with tiny units under the memory limit, in one fresh process."""
    tmp = str(tmp_path_factory.mktemp("methods"))
    paths = ckpts(torch.bfloat16, 3, True, shape=TINY)
    jobs = [(name, _config(tmp, paths, name), os.path.join(tmp, "split", name)) for name in METHODS]
    os.makedirs(os.path.join(tmp, "split"))
    os.makedirs(os.path.join(tmp, "whole"))
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, {name: cfg for name, cfg, _ in jobs}, json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(METHODS))
def test_chunked_equals_unchunked_within_memory_limit(split_runs, name):
    tmp, configs, stats = split_runs
    whole, split = os.path.join(tmp, "whole", name), os.path.join(tmp, "split", name)
    r = merge(parse_config(open(configs[name]).read(), configs[name]), whole, MergeOptions(quiet=True, seed=3))
    s = stats[name]
    assert r.split_tensors == 0, "the reference run should hold every tensor in one unit"
    assert s["split"] >= 10 and s["units"] > 10, s  # most tensors split over several work units
    names = sorted(os.listdir(whole))
    assert names == sorted(os.listdir(split))
    for f in names:
        assert filecmp.cmp(os.path.join(whole, f), os.path.join(split, f), shallow=False), f
    assert s["limit"] == LIMIT
    assert 0 < s["peak"] <= s["limit"], f"peak anonymous memory {s['peak'] >> 20} MiB over the {LIMIT >> 20} MiB limit"


def _cgroup_problem() -> str | None:
    """Why a hard memory cap cannot be set here (None when it can): capped_run.py makes a child of
    this process's cgroup-v1 memory cgroup."""
    if not os.path.exists(CAPPED_RUN):
        return f"{os.path.normpath(CAPPED_RUN)} not found"
    try:
        rel = next(line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup") if line.split(":")[1] == "memory")
    except (OSError, StopIteration, IndexError):
        return "no cgroup-v1 memory controller for this process"
    probe = f"/sys/fs/cgroup/memory{rel}/dppa-probe.{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return f"cannot create a memory cgroup under /sys/fs/cgroup/memory{rel} ({e.strerror})"
    return None


def test_cli_under_hard_memory_cap(split_runs, tmp_path):
    problem = _cgroup_problem()
    if problem:
        pytest.skip(f"hard memory cap not available: {problem}")
    tmp, configs, _ = split_runs
    cli = os.path.join(os.path.dirname(sys.executable), "dppa-stream")
    out, js = tmp_path / "capped", tmp_path / "capped.json"
    res = subprocess.run([sys.executable, CAPPED_RUN, str(LIMIT), cli, "merge", configs["sce"], str(out),
                          "--memory-limit", f"{LIMIT >> 20}MiB", "--unit-size", str(UNIT_BYTES), "--scheduler", SCHEDULER,
                          "--seed", "3", "--json", str(js), "--quiet"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "oom_kill=0" in res.stderr, res.stderr[-1000:]
    report = json.loads(js.read_text())
    assert report["peak_anon_bytes"] <= LIMIT and report["split_tensors"] >= 10
    for f in sorted(os.listdir(out)):
        assert filecmp.cmp(out / f, os.path.join(tmp, "split", "sce", f), shallow=False), f


def test_della_unit_planned_in_its_task_merges_with_its_statistics_masks(ckpts, tmp_path, monkeypatch):
    """A tensor too big to batch but whole in one unit is planned in its pass-2 task: DELLA's masks
    are ranked once per model (by the statistics) and the merge takes them; the bytes equal a run
    whose units split it (statistics gathered by a pass, masks ranked again in pass 2)."""
    from dppa_stream import kernels
    from dppa_stream.units import BATCH_MAX_NUMEL

    shape = LlamaShape(hidden=256, intermediate=320, layers=1, vocab=24, heads=4, kv_heads=2)
    assert 256 * 320 > BATCH_MAX_NUMEL
    cfg = _config(str(tmp_path), ckpts(torch.bfloat16, 3, True, shape=shape), "della")
    calls = []
    mask = kernels.della_mask
    monkeypatch.setattr(kernels, "della_mask", lambda *a: calls.append(a[2]) or mask(*a))
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    r = merge(parse_config(open(cfg).read(), cfg), whole, MergeOptions(quiet=True, seed=3))
    big = 3  # gate, up and down projections: 81,920 elements each, one unit each
    assert r.split_tensors == 0 and sorted(calls) == sorted([0, 1, 2] * big)
    s = merge(parse_config(open(cfg).read(), cfg), split, MergeOptions(quiet=True, seed=3, unit_bytes=64 << 10))
    assert s.split_tensors >= big
    for f in sorted(os.listdir(whole)):
        assert filecmp.cmp(os.path.join(whole, f), os.path.join(split, f), shallow=False), f
