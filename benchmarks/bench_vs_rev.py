"""As fast as another commit? DPPA and TIES on the 0.5B bf16 set (the fast path: raw rows, no
decoding), merged by the live tree and by a snapshot of REV (`common.snapshot`), alternating, so
both see the same machine load; prints the median wall and CPU seconds of each and their ratios.
Run it when a change touches the hot path but should not slow it (bench_io_bound.py measures the
live tree alone).

    python benchmarks/bench_vs_rev.py main --rounds 3     # ~4 min on 2 cores; results/bench_vs_rev.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (BIG, DATA_DIR, check_snapshot_import, code_version, dataset, dppa_cmd, ours_env,  # noqa: E402
                    run_measured, save_result, snapshot, write_config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    snap = snapshot(args.rev)
    check_snapshot_import(snap)
    paths = dataset(BIG, 2, torch.bfloat16)
    work = os.path.join(DATA_DIR, "bench_vs_rev")
    os.makedirs(work, exist_ok=True)
    configs = {"dppa": os.path.join(work, "dppa.yml"), "ties": os.path.join(work, "ties.yml")}
    write_config(configs["dppa"], "dppa", paths[0], [(p, {}) for p in paths[1:]], {"amplification": [1.8, 1.0]},
                 dtype=None)
    write_config(configs["ties"], "ties", paths[0], [(p, {"weight": 0.5, "density": 0.5}) for p in paths[1:]], None,
                 dtype="float32", out_dtype="bfloat16")
    versions = {"rev": ours_env(snap), "live": None}
    times = {(v, c): [] for v in versions for c in configs}
    for c, cfg in configs.items():  # warm-up: numba caches, page cache
        for v, env in versions.items():
            run_measured(dppa_cmd(cfg, os.path.join(work, "out"), os.path.join(work, "r.json"), ["--overwrite"]), env=env,
                         cwd=work)
    for r in range(args.rounds):
        for c, cfg in configs.items():
            for v, env in (versions.items() if r % 2 == 0 else reversed(versions.items())):
                m = run_measured(dppa_cmd(cfg, os.path.join(work, "out"), os.path.join(work, "r.json"), ["--overwrite"]),
                                 env=env, cwd=work)
                if m.rc:
                    print(m.stderr_tail, file=sys.stderr)
                    return 1
                times[(v, c)].append((m.wall_s, m.cpu_s))
                print(f"round {r + 1} {c} {v:4s}: wall {m.wall_s:5.1f}s cpu {m.cpu_s:5.1f}s", flush=True)
    rows = []
    for c in configs:
        med = {v: (statistics.median(t[0] for t in times[(v, c)]), statistics.median(t[1] for t in times[(v, c)]))
               for v in versions}
        row = {"config": c, "rev_wall_s": med["rev"][0], "live_wall_s": med["live"][0], "rev_cpu_s": med["rev"][1],
               "live_cpu_s": med["live"][1], "wall_ratio": med["live"][0] / med["rev"][0],
               "cpu_ratio": med["live"][1] / med["rev"][1]}
        rows.append(row)
        print(f"{c}: median wall live/rev {row['live_wall_s']:.1f}/{row['rev_wall_s']:.1f}s = {row['wall_ratio']:.3f}x, "
              f"cpu {row['live_cpu_s']:.1f}/{row['rev_cpu_s']:.1f}s = {row['cpu_ratio']:.3f}x")
    print("written", save_result("bench_vs_rev.json", {"code": code_version(), "rev": snap, "rounds": args.rounds,
                                                       "runs": {f"{v}-{c}": t for (v, c), t in times.items()},
                                                       "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
