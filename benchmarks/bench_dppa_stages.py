"""Where a DPPA merge of the MoE set spends its time: pass 1 (statistics and their store), the plan
(DP's report and thresholds), pass 2 (merge and write), timed inside one merge by wrapping the
pipeline's steps. With --against REV, a snapshot of REV (`common.snapshot`) runs the same merge
in alternation with the live tree, so both see the same machine load.

    python benchmarks/bench_dppa_stages.py                           # the live tree, 3 runs
    python benchmarks/bench_dppa_stages.py --against 8c30880 --rounds 2
    python benchmarks/bench_dppa_stages.py --layout fused

Each run is a fresh process (`--memory-limit 1GiB --scheduler threads:2`, warm page cache, one
untimed warm-up per version first). Stages are wall seconds; CPU is the process's. The plan's
time is `drive`'s less the statistics rounds it waited on. Results: results/bench_dppa_stages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import DATA_DIR, save_result, write_config  # noqa: E402
from moegen import MoeShape, moe_dataset  # noqa: E402

# runs in the child: wraps the steps by name (the same names at every version this compares)
CHILD = r"""
import json, sys, time
import dppa_stream.merge_pass as merge_pass
import dppa_stream.pipeline as pipeline
import dppa_stream.statistics as statistics
from dppa_stream.config import load_config

spent = {"pass1": 0.0, "drive": 0.0, "pass2": 0.0}

def timed(key, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key] += time.perf_counter() - t
    return wrapper

statistics.StatsEngine.__call__ = timed("pass1", statistics.StatsEngine.__call__)
pipeline.drive = timed("drive", pipeline.drive)
merge_pass.write_output = timed("pass2", merge_pass.write_output)
cfg, out = load_config(sys.argv[1]), sys.argv[2]
t0, c0 = time.perf_counter(), time.process_time()
pipeline.merge(cfg, out, pipeline.MergeOptions(memory_limit=1 << 30, scheduler="threads:2", overwrite=True))
spent["total"], spent["cpu"] = time.perf_counter() - t0, time.process_time() - c0
spent["plan"] = spent.pop("drive") - spent["pass1"]
import dppa_stream
spent["code"] = dppa_stream.__file__
print(json.dumps(spent))
"""


def run(cfg: str, out: str, env: dict | None) -> dict:
    # run from the data folder: `python -c` puts the working directory first on sys.path, and in the
    # repository that would import the live tree whatever PYTHONPATH says
    got = subprocess.run([sys.executable, "-c", CHILD, cfg, out], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(out))
    if got.returncode:
        sys.exit(f"merge failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV", help="run REV's code alternately with the live tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layout", choices=("unfused", "fused"), default="unfused")
    args = ap.parse_args()
    paths = moe_dataset(MoeShape(fused=args.layout == "fused"), 2)
    work = os.path.join(DATA_DIR, "bench_dppa_stages")
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, f"dppa_{args.layout}.yml")
    write_config(cfg, "dppa", paths[0], [(p, {}) for p in paths[1:]], None, dtype=None)
    versions = {"live": dict(os.environ, PYTHONPATH=common.REPO)}
    snap = None
    if args.against:
        snap = common.snapshot(args.against)
        common.check_snapshot_import(snap)
        versions = {args.against: common.ours_env(snap), **versions}
    out = os.path.join(work, "out")
    for name, env in versions.items():  # warm-up: numba caches, page cache; and which code each version runs
        code = run(cfg, out, env)["code"]
        print(f"{name}: {code}")
        if name != "live" and not code.startswith(snap["path"]):
            sys.exit(f"{name} ran {code}, not the snapshot at {snap['path']}")
    rows = []
    for r in range(args.rounds):
        for name, env in (versions.items() if r % 2 == 0 else reversed(versions.items())):
            got = run(cfg, out, env)
            rows.append({"version": name, "round": r, **got})
            print(f"{name:>8}: pass 1 {got['pass1']:5.2f}s  plan {got['plan']:5.2f}s  pass 2 {got['pass2']:5.2f}s  "
                  f"merge {got['total']:5.2f}s  CPU {got['cpu']:5.2f}s", flush=True)
    print()
    print("| version | pass 1 | plan | pass 2 | whole merge | CPU |")
    print("|---|---|---|---|---|---|")
    for name in versions:
        mine = [r for r in rows if r["version"] == name]
        cells = [", ".join(f"{r[k]:.1f}" for r in mine) for k in ("pass1", "plan", "pass2", "total", "cpu")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("written", save_result("bench_dppa_stages.json", {"code": common.code_version(), "layout": args.layout,
                                                           "against": args.against,
                                                           "against_sha": snap["sha"] if args.against else None,
                                                           "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
