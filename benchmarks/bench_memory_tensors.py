"""Peak memory vs number of tensors (not bytes): narrow Llama shapes with many layers.

bench_scale.py shows dppa's peak memory flat in checkpoint bytes for a fixed tensor count, but
rising with the number of fine-tunes K and of transformer blocks. This sweep holds the width fixed
(hidden 512, MLP 1408, vocab 1024: ~2.8 M parameters per block) and varies the layer count, so the
bytes stay small while the number of DP tensors (7 per block) grows; K fine-tunes each. Same
measurement as the other scripts (sum of RssAnon over the process tree, 20 ms samples), default
--memory-limit, warm cache (the inputs are small).

    python benchmarks/bench_memory_tensors.py                      # dppa, layers 8/32/80/160, K=4 (~3 min)
    python benchmarks/bench_memory_tensors.py --method ties --layers 8,80
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from bench_scale import fit, method_params  # noqa: E402
from common import DATA_DIR, RESULTS_DIR, fmt_mib, input_bytes, run_measured, write_config  # noqa: E402
from fastgen import fast_dataset  # noqa: E402

from dppa_stream.synthetic import LlamaShape  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dppa")
    ap.add_argument("--layers", default="8,32,80,160")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--snapshot", default=None, metavar="REV", help="run dppa_stream exported at git REV")
    ap.add_argument("--extra", default="", help="extra dppa-stream merge arguments, one string")
    args = ap.parse_args()
    args.extra = shlex.split(args.extra)
    work = os.path.join(DATA_DIR, "bench_memory_tensors")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    per_model, glob, dtype, out_dtype = method_params(args.method)
    snap = common.snapshot(args.snapshot) if args.snapshot else None
    env = common.ours_env(snap)
    result = {"method": args.method, "k": args.k, "extra": args.extra, "code": common.code_version(), "snapshot": snap,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for n in [int(x) for x in args.layers.split(",")]:
        shape = LlamaShape(hidden=512, intermediate=1408, layers=n, vocab=1024, heads=8, kv_heads=4)
        paths = fast_dataset(shape, args.k, torch.bfloat16)[: args.k + 1]
        cfg = os.path.join(work, f"{args.method}_l{n}.yml")
        write_config(cfg, args.method, paths[0], [(p, per_model) for p in paths[1:]], glob or None, dtype=dtype,
                     out_dtype=out_dtype)
        jpath = os.path.join(work, f"{args.method}_l{n}.json")
        m = run_measured(common.dppa_cmd(cfg, out, jpath, args.extra), env=env)
        rep = json.load(open(jpath)) if m.rc == 0 else {}
        row = {"layers": n, "tensors": len(shape.tensors()), "dp_tensors": 7 * n, "input_bytes": input_bytes(paths),
               "rc": m.rc, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes,
               "units": rep.get("units"), "self_report": rep}
        result["rows"].append(row)
        print(f"  layers {n:4d} ({row['tensors']:5d} tensors, {row['input_bytes'] / 1e9:5.2f} GB in)  rc={m.rc}  "
              f"wall {m.wall_s:6.1f}s  peak {fmt_mib(m.peak_anon_bytes)} MiB", flush=True)
    ok = [r for r in result["rows"] if r["rc"] == 0]
    if len(ok) >= 2:
        f = fit([r["tensors"] for r in ok], [r["peak_anon_bytes"] for r in ok])
        result["fit_peak_per_tensor"] = f
        print(f"peak = {fmt_mib(f['intercept'])} MiB + {f['slope'] / 1024:.0f} KiB per tensor (R² {f['r2']:.3f}) "
              f"with K={args.k}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = f"bench_memory_tensors_{args.method}_k{args.k}.json"
    with open(os.path.join(RESULTS_DIR, name), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"results in benchmarks/results/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
