"""MoE layouts without start-up: where the unfused set's extra CPU goes.

`bench_moe.py` times whole processes, so its unfused/fused ratio includes ~1 s of start-up that
both layouts pay (Python, torch, dask and numba imports, the first numba kernel's load). Here one
process merges each layout once to load all that, then runs the merges again, alternating, and
splits each run's CPU into the client's main thread (opening, planning, the output layout, the
final checks) and the rest (the worker threads): the per-run cost that grows with the tensor count.

    python benchmarks/bench_moe_warm.py                                   # linear, task arithmetic, ties; 5 runs
    python benchmarks/bench_moe_warm.py --methods ties --repeat 9
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe import FAMILIES  # noqa: E402
from common import DATA_DIR, save_result, write_config  # noqa: E402
from moegen import MoeShape, moe_dataset  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_run(cli, cfg: str, out: str) -> tuple[float, float]:
    """(process CPU, main-thread CPU) of one merge in this process."""
    p, t = _cpu(), time.thread_time()
    cli(["merge", cfg, out, "--memory-limit", "1GiB", "--scheduler", "threads:2", "--overwrite", "-q"],
         standalone_mode=False)
    return _cpu() - p, time.thread_time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,task_arithmetic,ties")
    ap.add_argument("--repeat", type=int, default=5, help="measured runs of each layout, alternating")
    args = ap.parse_args()
    from dppa_stream.cli.main import main as cli

    work = os.path.join(DATA_DIR, "bench_moe_warm")
    os.makedirs(work, exist_ok=True)
    sets = {tag: moe_dataset(MoeShape(fused=tag == "fused"), 2) for tag in ("unfused", "fused")}
    out, result = os.path.join(work, "out"), {"repeat": args.repeat, "methods": {}}
    print("| method | layout | process CPU s (least / median) | client thread | workers |\n|---|---|---|---|---|")
    for name in args.methods.split(","):
        method, per_model, glob, k, dtype = FAMILIES[name]
        cfgs = {}
        for tag, paths in sets.items():
            cfgs[tag] = os.path.join(work, f"{name}_{tag}.yml")
            write_config(cfgs[tag], method, paths[0], [(p, per_model) for p in paths[1:1 + k]], glob, dtype=dtype)
            one_run(cli, cfgs[tag], out)  # imports, kernels, page cache
        runs = {tag: [] for tag in cfgs}
        for _ in range(args.repeat):  # alternating: a busy spell of the machine hits both layouts
            for tag in cfgs:
                runs[tag].append(one_run(cli, cfgs[tag], out))
        got = {}
        for tag, rs in runs.items():
            proc, client = [r[0] for r in rs], [r[1] for r in rs]
            workers = [p - c for p, c in rs]
            got[tag] = {"process": proc, "client": client, "workers": workers}
            print(f"| {name} | {tag} | {min(proc):.2f} / {statistics.median(proc):.2f} | "
                  f"{min(client):.2f} / {statistics.median(client):.2f} | "
                  f"{min(workers):.2f} / {statistics.median(workers):.2f} |", flush=True)
        u, f = got["unfused"], got["fused"]
        got["ratio_least"] = min(u["process"]) / min(f["process"])
        got["ratio_median"] = statistics.median(u["process"]) / statistics.median(f["process"])
        print(f"|   ratio | | {got['ratio_least']:.2f}× / {got['ratio_median']:.2f}× | | |")
        result["methods"][name] = got
    shutil.rmtree(out, ignore_errors=True)
    save_result("bench_moe_warm.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
