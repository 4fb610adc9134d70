"""As fast as another commit? CPU time per parameter of the live tree next to a snapshot of REV
(`common.snapshot`), method by method, on the same ~0.5B set, runs interleaved (live, REV, live,
REV, ...) so that both see the same machine load. Run it before landing a change that should not
cost speed (a kernel rewrite, a refactor); `compare_outputs.py REV` checks the bytes.

Each method merges base + 2 fine-tunes (model_stock and sce all 3, arcee_fusion one) of the 0.5B
set (bf16 in, `dtype: float32`, `out_dtype: bfloat16`, warm page cache, defaults otherwise; the
settings of bench_io_bound.py and bench_methods.py). Every version runs each config once untimed
first (numba compiles its kernels once per install). Per run: CPU seconds of the process tree
(user + sys, wait4 rusage), wall seconds; per method: the median and the minimum over the rounds
of CPU ns per parameter per input model, and live / REV of each. CPU time is the steadier measure
on a shared machine; wall time is reported too. JSON in benchmarks/results/compare_speed.json.

    python benchmarks/compare_speed.py main                         # ~25 min on 2 shared cores
    python benchmarks/compare_speed.py main --methods ties,dppa --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (BIG, DATA_DIR, SMALL, check_snapshot_import, code_version, dataset, dppa_cmd, ours_env,  # noqa: E402
                    run_measured, save_result, snapshot, write_config)

W2 = {"weight": 0.5}
METHODS = {
    # name: (merge_method, fine-tunes used, per-model parameters, global parameters)
    "task_arithmetic": ("task_arithmetic", 2, W2, {"lambda": 0.9}),
    "ties": ("ties", 2, {**W2, "density": 0.5}, None),
    "dare_ties": ("dare_ties", 2, {**W2, "density": 0.5}, None),
    "breadcrumbs": ("breadcrumbs_ties", 2, {**W2, "density": 0.8, "gamma": 0.02}, None),
    "della": ("della", 2, {**W2, "density": 0.5, "epsilon": 0.1}, None),
    "dppa": ("dppa", 2, {}, {"amplification": [1.8, 1.0]}),
    "model_stock": ("model_stock", 3, {}, None),
    "sce": ("sce", 3, {}, {"select_topk": 0.5}),
    "arcee_fusion": ("arcee_fusion", 1, {}, None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the commit to compare the live tree with")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the ~60M-parameter set (a quick check)")
    args = ap.parse_args()
    snap = snapshot(args.rev)
    check_snapshot_import(snap)
    versions = {"live": None, args.rev: ours_env(snap)}
    shape = SMALL if args.small else BIG
    paths = dataset(shape, 3, torch.bfloat16)
    params = shape.numel()
    work = os.path.join(DATA_DIR, "compare_speed")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    rows = []
    for name in args.methods.split(","):
        method, k, mp, gp = METHODS[name]
        cfg = os.path.join(work, f"{name}.yml")
        write_config(cfg, method, paths[0], [(p, mp) for p in paths[1:1 + k]], gp, dtype="float32", out_dtype="bfloat16")
        models = k + 1
        runs = {v: [] for v in versions}
        for label, env in versions.items():  # untimed: compiles the kernels, warms the page cache
            if run_measured(dppa_cmd(cfg, out, os.path.join(work, "r.json")), env=env).rc != 0:
                print(f"{name} {label}: failed", file=sys.stderr)
                return 1
        for _ in range(args.rounds):
            for label, env in versions.items():
                shutil.rmtree(out, ignore_errors=True)
                m = run_measured(dppa_cmd(cfg, out, os.path.join(work, "r.json")), env=env)
                if m.rc != 0:
                    print(f"{name} {label}: failed\n{m.stderr_tail}", file=sys.stderr)
                    return 1
                runs[label].append({"cpu_s": m.cpu_s, "wall_s": m.wall_s,
                                    "cpu_ns_per_param_model": m.cpu_s / (params * models) * 1e9})
        row = {"method": name, "models": models, "runs": runs}
        for label, rs in runs.items():
            ns = [r["cpu_ns_per_param_model"] for r in rs]
            row[label] = {"cpu_ns_median": statistics.median(ns), "cpu_ns_min": min(ns),
                          "wall_s_median": statistics.median(r["wall_s"] for r in rs)}
        live, base = row["live"], row[args.rev]
        row["ratio_median"] = live["cpu_ns_median"] / base["cpu_ns_median"]
        row["ratio_min"] = live["cpu_ns_min"] / base["cpu_ns_min"]
        print(f"{name:16s} CPU ns/param/model  live {live['cpu_ns_median']:6.2f} (min {live['cpu_ns_min']:6.2f})  "
              f"{args.rev} {base['cpu_ns_median']:6.2f} (min {base['cpu_ns_min']:6.2f})  "
              f"live/{args.rev}: median {row['ratio_median']:.3f}, min {row['ratio_min']:.3f}  "
              f"(wall s {live['wall_s_median']:.1f} / {base['wall_s_median']:.1f})", flush=True)
        rows.append(row)
    result = {"rev": args.rev, "rev_sha": snap["sha"], "shape": shape.__dict__, "params": params, "rounds": args.rounds,
              "cpus": os.cpu_count(), "code": code_version(), "rows": rows, "load_average": os.getloadavg()}
    save_result("compare_speed_small.json" if args.small else "compare_speed.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
