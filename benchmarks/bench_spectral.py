#!/usr/bin/env python3
"""Iso-C and TSV-M next to task arithmetic on one synthetic model: wall time, bytes read, peak
memory (anonymous, process tree, as MergeResult reports it) and what the methods declare they hold
(`task_bytes`: one task's Gram/projection memory; `held_bytes`: what the run keeps per matrix planned
in pass 1), with whole tensors (the default unit size: matrices are planned inside their pass-2
task, one read) and with 2 MiB units (tall matrices split: Gram in pass 1, plan, pass 2). A first
untimed task-arithmetic merge compiles the kernels.

    python benchmarks/bench_spectral.py [--hidden 1024] [--intermediate 2816] [--layers 2] [--vocab 8192]
        [--memory-limit 4GiB] [--json benchmarks/results/bench_spectral.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from dppa_stream.config import parse_config
from dppa_stream.methods import METHODS
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape, write_llama_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--memory-limit", default="4GiB")
    ap.add_argument("--json")
    args = ap.parse_args()
    from dask.utils import parse_bytes

    limit = parse_bytes(args.memory_limit)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab)
    root = tempfile.mkdtemp(prefix="bench_spectral_")
    rows = []
    try:
        paths = write_llama_set(os.path.join(root, "in"), shape, 2, torch.bfloat16, seed=1, drift=1e-2)
        size = sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0])
                   if f.endswith(".safetensors"))
        print(f"model: {shape}, {size / 2**20:.0f} MiB per checkpoint, 2 fine-tunes, "
              f"--memory-limit {limit / 2**20:.0f} MiB")
        warm = os.path.join(root, "warm")
        merge(parse_config(f"merge_method: task_arithmetic\nbase_model: {paths[0]}\nmodels:\n  - model: {paths[1]}\n"
                           "    parameters: {weight: 1.0}\n"), warm, MergeOptions(quiet=True))
        for method in ("task_arithmetic", "iso_c", "tsv_m"):
            for unit in (None, 2 << 20):
                text = f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n" + "".join(
                    f"  - model: {p}\n" + ("    parameters: {weight: 1.0}\n" if method == "task_arithmetic" else "")
                    for p in paths[1:])
                out = os.path.join(root, "out")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                r = merge(parse_config(text), out, MergeOptions(quiet=True, memory_limit=limit, unit_bytes=unit,
                                                                scheduler="threads:2"))
                wall = time.perf_counter() - t0
                m = METHODS[method].__new__(METHODS[method])
                task = max(m.task_bytes(s, 2) for _, s in shape.tensors())
                held = max(m.held_bytes(s, 2) for _, s in shape.tensors())
                row = dict(method=method, unit_bytes=unit or "default", wall_s=round(wall, 2),
                           read_MB=round(r.bytes_read / 1e6), peak_MiB=round(r.peak_anon_bytes / 2**20),
                           split_tensors=r.split_tensors, task_extra_MiB=round(task / 2**20),
                           held_MiB=round(held / 2**20))
                rows.append(row)
                print(json.dumps(row), flush=True)
        base = {r["unit_bytes"]: r["wall_s"] for r in rows if r["method"] == "task_arithmetic"}
        for r in rows:
            print(f"{r['method']:16s} unit={str(r['unit_bytes']):9s} {r['wall_s']:7.2f}s "
                  f"({r['wall_s'] / base[r['unit_bytes']]:5.2f}x task_arithmetic) read {r['read_MB']} MB "
                  f"peak {r['peak_MiB']} MiB, {r['split_tensors']} split tensors")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "python": sys.version.split()[0], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
