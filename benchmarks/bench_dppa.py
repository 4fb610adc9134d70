"""DPPA throughput next to the I/O floor, measured side by side in one run.

The floor is what any two-pass merge must do at least: read every input twice and write the output
once (plain buffered 16 MiB reads and writes, output fsynced). Both the floor and `dppa-stream merge`
are measured with a cold page cache for the inputs (evicted with posix_fadvise(DONTNEED) before
each run) and with a warm one. Target (issue 3): DPPA wall time <= 1.5x the floor.

    python benchmarks/bench_dppa.py                 # ~0.5B params x (base + 2 fine-tunes), bf16
    python benchmarks/bench_dppa.py --small         # a quick ~60M-parameter run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (DATA_DIR, RESULTS_DIR, dataset, dppa_cmd, fmt_mib, input_bytes, io_floor,  # noqa: E402
                    run_measured, weight_files, write_config)

from dppa_stream.synthetic import LlamaShape  # noqa: E402

BIG = LlamaShape(hidden=1280, intermediate=3456, layers=24, vocab=32000, heads=20, kv_heads=4)
SMALL = LlamaShape(hidden=512, intermediate=1408, layers=12, vocab=32000, heads=8, kv_heads=4)


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (no root or drop_caches needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_floor(nbytes: int, path: str, block: int = 16 << 20) -> float:
    buf = bytes(block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            n = min(left, block)
            f.write(buf[:n])
            left -= n
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--extra", nargs="*", default=[], help="extra dppa-stream merge arguments")
    args = ap.parse_args()
    shape = SMALL if args.small else BIG
    paths = dataset(shape, 2, torch.bfloat16)
    files = [f for p in paths for f in weight_files(p)]
    work = os.path.join(DATA_DIR, "bench_dppa")
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "dppa.yml")
    write_config(cfg, "dppa", paths[0], [(p, {}) for p in paths[1:]], {"amplification": [1.8, 1.0]}, dtype=None)
    out = os.path.join(work, "out")
    out_bytes = input_bytes([paths[0]])
    rows = []
    for rnd in range(1, args.repeat + 1):
        for cache in ("cold", "warm"):
            if cache == "cold":
                evict(files)
            r1 = io_floor(paths)
            if cache == "cold":
                evict(files)
            r2 = io_floor(paths)
            w = write_floor(out_bytes, os.path.join(work, "floor.bin"))
            floor = r1["seconds"] + r2["seconds"] + w
            if cache == "cold":
                evict(files)
            jpath = os.path.join(work, "r.json")
            m = run_measured(dppa_cmd(cfg, out, jpath, ["--overwrite", *args.extra]))
            if m.rc != 0:
                print(m.stderr_tail, file=sys.stderr)
                return 1
            rows.append({"round": rnd, "cache": cache, "floor_s": floor, "read_s": [r1["seconds"], r2["seconds"]],
                         "write_s": w, "dppa_wall_s": m.wall_s, "dppa_cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes,
                         "ratio": m.wall_s / floor, "self_report": json.load(open(jpath))})
            print(f"round {rnd} {cache:4s}: floor {floor:6.1f}s (read {r1['seconds']:.1f}+{r2['seconds']:.1f}s, "
                  f"write {w:.1f}s)  dppa {m.wall_s:6.1f}s (cpu {m.cpu_s:.1f}s)  ratio {m.wall_s / floor:4.2f}x  "
                  f"peak {fmt_mib(m.peak_anon_bytes)} MiB", flush=True)
    result = {"shape": shape.__dict__, "params": shape.numel(), "input_bytes": input_bytes(paths), "output_bytes": out_bytes,
              "cpus": os.cpu_count(), "target_ratio": 1.5, "rows": rows,
              "best_ratio": {c: min(r["ratio"] for r in rows if r["cache"] == c) for c in ("cold", "warm")}}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = "bench_dppa_small.json" if args.small else "bench_dppa.json"
    with open(os.path.join(RESULTS_DIR, name), "w") as f:
        json.dump(result, f, indent=2)
    print(f"best ratio to the I/O floor: cold {result['best_ratio']['cold']:.2f}x, warm {result['best_ratio']['warm']:.2f}x "
          f"(target <= 1.5x); results in benchmarks/results/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
