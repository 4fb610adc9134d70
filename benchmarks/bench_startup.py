"""The client's CPU: what the main thread spends on a merge (opening and checking the headers,
the catalogue, planning, laying out the output, building pass 2's tasks, verifying the inputs),
measured with `time.thread_time()` around the CLI run in-process, next to the whole process's
CPU. The unfused DeepSeek-V3-shaped set (45,395 tensors x 3 checkpoints, bench_moe.py), by the
code at --snapshot (default HEAD) and at --against REV alternately, so both see the same load.

    python benchmarks/bench_startup.py --against main --methods ties --rounds 2

The first run of a snapshot not run before compiles its numba kernels (numba caches by file
path): its process CPU is ~10 s high; read the later rounds (its client CPU is not affected).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from bench_moe import FAMILIES  # noqa: E402
from common import DATA_DIR, write_config  # noqa: E402
from moegen import MoeShape, moe_dataset  # noqa: E402

# run in a child whose PYTHONPATH puts a snapshot first: the imports the merge makes are timed apart
CHILD = """
import json, resource, sys, time
t0 = time.thread_time()
from dppa_stream.cli.main import main
import dask.threaded, zarr, dppa_stream.pipeline, dppa_stream.merge_pass, dppa_stream.stats_store, dppa_stream.kernels
t1 = time.thread_time()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"import_s": t1 - t0, "client_s": time.thread_time() - t1, "cpu_s": ru.ru_utime + ru.ru_stime,
                      "code": dppa_stream.pipeline.__file__}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, metavar="REV")
    ap.add_argument("--snapshot", default="HEAD", metavar="REV")
    ap.add_argument("--methods", default="ties")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", default="1GiB")
    args = ap.parse_args()
    versions = {v: common.snapshot(v) for v in (args.snapshot, args.against)}
    paths = moe_dataset(MoeShape(fused=False), 2)
    work = os.path.join(DATA_DIR, "bench_startup")
    os.makedirs(work, exist_ok=True)
    rows = []
    for name in args.methods.split(","):
        method, per_model, glob, k, dtype = FAMILIES[name]
        cfg = os.path.join(work, f"{name}.yml")
        write_config(cfg, method, paths[0], [(p, per_model) for p in paths[1:1 + k]], glob, dtype=dtype)
        for r in range(args.rounds):
            for v, snap in versions.items():
                out = os.path.join(work, "out")
                got = subprocess.run([sys.executable, "-c", CHILD, "merge", cfg, out, "--memory-limit", args.limit,
                                      "--overwrite", "-q"], env=common.ours_env(snap), capture_output=True, text=True,
                                     cwd=work)  # not the repository: `python -c` puts the cwd first on sys.path
                shutil.rmtree(out, ignore_errors=True)
                if got.returncode:
                    print(f"  {name} at {v}: failed\n{got.stderr[-2000:]}")
                    continue
                row = dict(json.loads(got.stdout.strip().splitlines()[-1]), method=name, version=v, round=r)
                assert row["code"].startswith(snap["path"]), (row["code"], snap["path"])  # the snapshot ran
                rows.append(row)
                print(f"  {name:12s} {v:10s} client {row['client_s']:6.2f}s  imports {row['import_s']:5.2f}s  "
                      f"process {row['cpu_s']:6.1f}s", flush=True)
    print("\n| method | " + " | ".join(f"client CPU s at {v}" for v in versions) + " | client ratio | "
          + " | ".join(f"process CPU s at {v}" for v in versions) + " | process ratio (medians) |")
    print("|---|" + "---|" * (2 * len(versions) + 2))
    for name in args.methods.split(","):
        med = {}
        for key in ("client_s", "cpu_s"):
            for v in versions:
                med[key, v] = statistics.median([r[key] for r in rows if r["method"] == name and r["version"] == v]
                                                or [float("nan")])
        a, b = versions
        print(f"| {name} | {med['client_s', a]:.2f} | {med['client_s', b]:.2f} | "
              f"{med['client_s', a] / med['client_s', b]:.2f}x | {med['cpu_s', a]:.1f} | {med['cpu_s', b]:.1f} | "
              f"{med['cpu_s', a] / med['cpu_s', b]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
