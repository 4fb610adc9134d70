"""Is the merge I/O-bound? DPPA and TIES next to the I/O floor, side by side in one run.

On one ~0.5B-parameter set (base + 2 fine-tunes, bf16), measured in this order, each with the
inputs' pages evicted ("cold") and resident ("warm"):
- the I/O floor: read every input twice, write the output once and fsync it (16 MiB blocks);
- `dppa-stream merge` with DPPA (rates [0.9, 0.8], amplification [1.8, 1.0]) on threads:2 and on
  threads:1 (thread scaling);
- TIES (density 0.5, weights 0.5/0.5, dtype float32, out bfloat16), and mergekit 0.1.5 on the same
  config when its virtualenv is there ($MERGEKIT_VENV or .venv-mergekit).
It prints the table the issue asks for: ratio to the floor, CPU nanoseconds per parameter per
fine-tune (CPU time of the whole process tree / (parameters x fine-tunes)), threads:2 speed-up and
the ratio to mergekit; JSON in benchmarks/results/bench_io_bound.json.

    python benchmarks/bench_io_bound.py              # the 0.5B set (~3 GB of inputs)
    python benchmarks/bench_io_bound.py --small      # ~60M parameters, a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (BIG, DATA_DIR, SMALL, code_version, dataset, dppa_cmd, evict, fmt_mib, input_bytes,  # noqa: E402
                    mergekit_available, mergekit_cmd, mergekit_env, run_measured, save_result, two_pass_floor,
                    weight_files, write_config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--caches", default="cold,warm")
    args = ap.parse_args()
    shape = SMALL if args.small else BIG
    paths = dataset(shape, 2, torch.bfloat16)
    files = [f for p in paths for f in weight_files(p)]
    params = shape.numel()
    work = os.path.join(DATA_DIR, "bench_io_bound")
    os.makedirs(work, exist_ok=True)
    dppa = os.path.join(work, "dppa.yml")
    write_config(dppa, "dppa", paths[0], [(p, {}) for p in paths[1:]], {"amplification": [1.8, 1.0]}, dtype=None)
    ties = os.path.join(work, "ties.yml")
    write_config(ties, "ties", paths[0], [(p, {"weight": 0.5, "density": 0.5}) for p in paths[1:]], None,
                 dtype="float32", out_dtype="bfloat16")
    out_bytes = input_bytes([paths[0]])
    rows = []

    def record(label, cache, m, floor=None):
        row = {"run": label, "cache": cache, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes,
               "cpu_ns_per_param_ft": m.cpu_s / (params * 2) * 1e9, "floor_s": floor,
               "ratio_to_floor": m.wall_s / floor if floor else None}
        rows.append(row)
        extra = f"  floor {floor:5.1f}s  ratio {row['ratio_to_floor']:4.2f}x" if floor else ""
        print(f"{label:18s} {cache:4s}: wall {m.wall_s:6.1f}s  cpu {m.cpu_s:6.1f}s  "
              f"{row['cpu_ns_per_param_ft']:5.1f} ns/param/ft  peak {fmt_mib(m.peak_anon_bytes)} MiB{extra}", flush=True)
        return row

    # one untimed run per config first: a fresh install compiles its numba kernels on the first merge
    # (once per machine, cached on disk), which is not what the rows below measure
    for cfg in (dppa, ties):
        m = run_measured(dppa_cmd(cfg, os.path.join(work, "out"), os.path.join(work, "r.json"), []))
        if m.rc != 0:
            print(m.stderr_tail, file=sys.stderr)
            return 1
    for cache in args.caches.split(","):
        fl = two_pass_floor(paths, out_bytes, work, cold=cache == "cold")
        floor = fl["seconds"]
        print(f"I/O floor          {cache:4s}: {floor:5.1f}s (read {fl['read_s'][0]:.1f} + {fl['read_s'][1]:.1f}, "
              f"write+fsync {fl['write_s']:.1f})", flush=True)
        for label, cfg, extra in (("dppa threads:2", dppa, ["--scheduler", "threads:2"]),
                                  ("dppa threads:1", dppa, ["--scheduler", "threads:1"]),
                                  ("ties threads:2", ties, ["--scheduler", "threads:2"])):
            if cache == "cold":
                evict(files)
            m = run_measured(dppa_cmd(cfg, os.path.join(work, "out"), os.path.join(work, "r.json"), extra))
            if m.rc != 0:
                print(m.stderr_tail, file=sys.stderr)
                return 1
            record(label, cache, m, floor)
    mk = None
    if not args.no_mergekit and mergekit_available():
        shutil.rmtree(os.path.join(work, "mk"), ignore_errors=True)
        m = run_measured(mergekit_cmd(ties, os.path.join(work, "mk")), env=mergekit_env())
        if m.rc == 0:
            mk = record("mergekit ties", "warm", m)
    ours = {(r["run"], r["cache"]): r for r in rows}
    summary = {
        "dppa_ratio_to_floor": {c: ours[("dppa threads:2", c)]["ratio_to_floor"] for c in args.caches.split(",")},
        "cpu_ns_per_param_ft": {"dppa": min(r["cpu_ns_per_param_ft"] for r in rows if r["run"].startswith("dppa")),
                                "ties": min(r["cpu_ns_per_param_ft"] for r in rows if r["run"].startswith("ties"))},
        "threads2_speedup": {c: ours[("dppa threads:1", c)]["wall_s"] / ours[("dppa threads:2", c)]["wall_s"]
                             for c in args.caches.split(",")},
        "ties_vs_mergekit": (mk["wall_s"] / ours[("ties threads:2", "warm")]["wall_s"]
                             if mk and ("ties threads:2", "warm") in ours else None),
    }
    print("\n" + json.dumps(summary, indent=2))
    result = {"shape": shape.__dict__, "params": params, "input_bytes": input_bytes(paths), "output_bytes": out_bytes,
              "cpus": os.cpu_count(), "code": code_version(), "rows": rows, "summary": summary,
              "load_average": os.getloadavg()}
    save_result("bench_io_bound_small.json" if args.small else "bench_io_bound.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
