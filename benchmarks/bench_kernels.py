"""Pass-2 kernel time per element, the live tree next to a snapshot of REV: each method's
`merge_unit` on one in-memory unit (no reads, no writes, no Dask), so that a few percent are
visible on a shared machine where a whole merge's CPU time varies more than that.

One bf16 tensor of 2048 x 4096 (a 48 MiB unit with base + 2 fine-tunes, under the default 64 MiB
cap; sce uses 3 fine-tunes), base N(0, 0.02) and fine-tunes base + N(0, 1e-3) rounded to bf16, so
thresholds fall in large tie classes as they do on real bf16 checkpoints; output bf16. The plan
comes from the method's own statistics (`statistics.drive` on the unit's rows, as a one-unit
tensor is planned in its pass-2 task); only `merge_unit` is timed (thread CPU time, the fastest and
the median of `--reps` calls after one untimed call). Versions alternate process by process for
`--rounds` rounds; per method it prints the minimum over rounds of each version's fastest call
(ns per element), the median over all calls, and live / REV of both, and checks that both wrote
the same bytes. JSON in benchmarks/results/bench_kernels.json.

    python benchmarks/bench_kernels.py main                   # ~5 min on 2 shared cores
    python benchmarks/bench_kernels.py main --methods ties,dppa --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS, COLS = 2048, 4096
TENSOR = "model.layers.0.mlp.up_proj.weight"  # a block linear, so DPPA prunes it
W = {"weight": 0.5}
METHODS = {
    # name: (merge_method, fine-tunes, per-model parameters, global parameters)
    "task_arithmetic": ("task_arithmetic", 2, W, {"lambda": 0.9}),
    "ties": ("ties", 2, {**W, "density": 0.5}, {}),
    "ties_d0.2": ("ties", 2, {**W, "density": 0.2}, {}),
    "magnitude": ("magnitude", 2, {**W, "density": 0.5}, {}),
    "dare_ties": ("dare_ties", 2, {**W, "density": 0.5}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", 2, {**W, "density": 0.8, "gamma": 0.02}, {}),
    "della": ("della", 2, {**W, "density": 0.5, "epsilon": 0.1}, {}),
    "dppa": ("dppa", 2, {"amplification": [1.8, 1.0]}, {}),
    "dppa_exact": ("dppa", 2, {"amplification": [1.8, 1.0]}, {"semantics": "exact"}),
    "model_stock": ("model_stock", 2, {}, {}),
    "sce": ("sce", 3, {}, {"select_topk": 0.5}),
    "arcee_fusion": ("arcee_fusion", 1, {}, {}),
}


def worker(names: list[str], reps: int) -> None:
    """Time `merge_unit` of each method with whichever dppa_stream this process imports; one JSON
    line per method."""
    import types

    import numpy as np
    import torch

    from dppa_stream import kernels
    from dppa_stream.methods import METHODS as REGISTRY
    from dppa_stream.methods.base import Catalogue, TensorInfo
    from dppa_stream.statistics import drive, inline
    from dppa_stream.units import Unit

    g = torch.Generator().manual_seed(0)
    base = (torch.randn(ROWS * COLS, generator=g) * 0.02).to(torch.bfloat16)
    fts = [(base.float() + torch.randn(ROWS * COLS, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(3)]
    raw = np.stack([t.view(torch.int16).numpy().view(np.uint16) for t in [base] + fts])
    unit = Unit(TENSOR, 0, 0, ROWS, COLS)
    for name in names:
        method_name, k, mp, gp = METHODS[name]
        entry = types.SimpleNamespace(shape=(ROWS, COLS), numel=ROWS * COLS, file="memory", name=TENSOR)
        rows = types.SimpleNamespace(src=raw[:k + 1], dtype="BF16", has_base=True,
                                     inp=types.SimpleNamespace(unit=unit, models=(entry,) * k, entries=(entry,) * (k + 1)))
        cls = REGISTRY[method_name]
        glob = {key: p.default for key, p in cls.global_params.items()} | gp
        models = tuple({key: p.default for key, p in cls.model_params.items()} | mp for _ in range(k))
        method = cls(glob, [dict(m) for m in models], 3)
        info = TensorInfo(TENSOR, "BF16", (ROWS, COLS), glob, models)
        plan = drive(method, Catalogue({TENSOR: info}, None), [TENSOR], inline(rows, True)).tensors[TENSOR]
        out = np.empty(ROWS * COLS, np.uint16)
        method.merge_unit(rows, plan, out, kernels.BF16)
        times = []
        for _ in range(reps):
            t = time.thread_time()
            method.merge_unit(rows, plan, out, kernels.BF16)
            times.append(time.thread_time() - t)
        print(json.dumps({"method": name, "ns": [s / (ROWS * COLS) * 1e9 for s in times],
                          "crc": zlib.crc32(out.tobytes())}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", help="the commit to compare the live tree with")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.methods.split(",")
    if args.worker:
        worker(names, args.reps)
        return 0
    from common import check_snapshot_import, code_version, ours_env, save_result, snapshot

    versions = {"live": None}
    snap = None
    if args.rev:
        snap = snapshot(args.rev)
        check_snapshot_import(snap)
        versions[args.rev] = ours_env(snap)
    runs = {v: {n: [] for n in names} for v in versions}
    crcs = {v: {} for v in versions}
    for _ in range(args.rounds):
        for label, env in versions.items():
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--methods", args.methods,
                                  "--reps", str(args.reps)], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{label}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
                return 1
            for line in res.stdout.splitlines():
                r = json.loads(line)
                runs[label][r["method"]].append(r["ns"])
                crcs[label][r["method"]] = r["crc"]
    rows = []
    for name in names:
        row = {"method": name}
        for label in versions:
            calls = runs[label][name]
            row[label] = {"ns_min": min(min(c) for c in calls), "ns_median": statistics.median(x for c in calls for x in c),
                          "crc": crcs[label][name]}
        line = f"{name:18s} ns/element  live min {row['live']['ns_min']:6.2f} median {row['live']['ns_median']:6.2f}"
        if args.rev:
            base = row[args.rev]
            row["ratio_min"] = row["live"]["ns_min"] / base["ns_min"]
            row["ratio_median"] = row["live"]["ns_median"] / base["ns_median"]
            row["same_bytes"] = row["live"]["crc"] == base["crc"]
            line += (f"   {args.rev} min {base['ns_min']:6.2f} median {base['ns_median']:6.2f}   live/{args.rev} "
                     f"min {row['ratio_min']:.3f} median {row['ratio_median']:.3f}   same bytes: {row['same_bytes']}")
        print(line, flush=True)
        rows.append(row)
    save_result("bench_kernels.json", {"rev": args.rev, "rev_sha": snap["sha"] if snap else None, "shape": [ROWS, COLS],
                                       "rounds": args.rounds, "reps": args.reps, "code": code_version(), "rows": rows,
                                       "load_average": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
