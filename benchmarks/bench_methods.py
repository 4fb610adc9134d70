"""One row per method family, dppa-stream next to mergekit 0.1.5 on the same ~0.5B set.

slerp, breadcrumbs, della, sce and model_stock (the families whose whole-tensor quantities —
norms and Gram matrices, two-sided order statistics, row ranks, variance top-k — pass 1 gathers)
on base + 3 fine-tunes (model_stock and sce use all three, slerp one, breadcrumbs and della two),
bf16 inputs with `dtype: float32` and `out_dtype: bfloat16` for both tools, warm page cache; our
merge runs once untimed first (numba compiles its kernels on first use after an install). Per
run: wall seconds, CPU seconds of the process tree, CPU nanoseconds per parameter per input model,
peak anonymous memory of the tree; and the ratios. JSON in benchmarks/results/bench_methods.json.

    python benchmarks/bench_methods.py               # the 0.5B set (needs mergekit in $MERGEKIT_VENV or .venv-mergekit)
    python benchmarks/bench_methods.py --small       # ~60M parameters
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (BIG, DATA_DIR, SMALL, code_version, dataset, dppa_cmd, fmt_mib, input_bytes, mergekit_available,  # noqa: E402
                    mergekit_cmd, mergekit_env, run_measured, save_result, write_config)

FAMILIES = {
    # name: (method, fine-tunes used, per-model parameters, global parameters)
    "slerp": ("slerp", 1, {}, {"t": 0.4}),
    "breadcrumbs": ("breadcrumbs_ties", 2, {"weight": 0.5, "density": 0.8, "gamma": 0.02}, None),
    "della": ("della", 2, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, None),
    "sce": ("sce", 3, {}, {"select_topk": 0.5}),
    "model_stock": ("model_stock", 3, {}, None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args()
    shape = SMALL if args.small else BIG
    paths = dataset(shape, 3, torch.bfloat16)
    params = shape.numel()
    work = os.path.join(DATA_DIR, "bench_methods")
    os.makedirs(work, exist_ok=True)
    mk = not args.no_mergekit and mergekit_available()
    input_bytes(paths)  # warm the page cache for both tools alike
    rows = []
    for family in args.families.split(","):
        method, k, mp, gp = FAMILIES[family]
        cfg = os.path.join(work, f"{family}.yml")
        write_config(cfg, method, paths[0], [(p, mp) for p in paths[1:1 + k]], gp, dtype="float32",
                     out_dtype="bfloat16")
        models = k + 1
        row = {"family": family, "method": method, "models": models}
        for tool in ("dppa-stream", "mergekit") if mk else ("dppa-stream",):
            out = os.path.join(work, f"out-{tool}")
            shutil.rmtree(out, ignore_errors=True)
            if tool == "dppa-stream":
                # untimed first: after an install or an edit numba compiles the kernels once (cached on disk)
                run_measured(dppa_cmd(cfg, out, os.path.join(work, "r.json")))
                shutil.rmtree(out, ignore_errors=True)
                m = run_measured(dppa_cmd(cfg, out, os.path.join(work, "r.json")))
            else:
                m = run_measured(mergekit_cmd(cfg, out), env=mergekit_env())
            if m.rc != 0:
                print(f"{family} {tool} failed:\n{m.stderr_tail}", file=sys.stderr)
                continue
            row[tool] = {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes,
                         "cpu_ns_per_param_model": m.cpu_s / (params * models) * 1e9}
            print(f"{family:12s} {tool:11s} wall {m.wall_s:7.1f}s  cpu {m.cpu_s:7.1f}s  "
                  f"{row[tool]['cpu_ns_per_param_model']:6.1f} ns/param/model  peak {fmt_mib(m.peak_anon_bytes)} MiB",
                  flush=True)
        if "mergekit" in row and "dppa-stream" in row:
            row["speedup"] = row["mergekit"]["wall_s"] / row["dppa-stream"]["wall_s"]
            row["memory_ratio"] = row["dppa-stream"]["peak_anon_bytes"] / row["mergekit"]["peak_anon_bytes"]
            print(f"{family:12s} speed-up {row['speedup']:.1f}x, memory {row['memory_ratio']:.2f} of mergekit's", flush=True)
        rows.append(row)
    result = {"shape": shape.__dict__, "params": params, "cpus": os.cpu_count(), "code": code_version(), "rows": rows,
              "load_average": os.getloadavg()}
    save_result("bench_methods_small.json" if args.small else "bench_methods.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
