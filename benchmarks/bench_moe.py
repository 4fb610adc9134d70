"""MoE scale: a DeepSeek-V3-shaped merge with the full tensor count as shipped (45,395 tensors,
width scaled down, ~190 MB per model), against the same numbers fused into 3-D expert tensors
(1,025 tensors), one row per method family, under `--memory-limit 1GiB`.

Each row: wall, CPU (rusage of the process tree), peak anonymous memory (Σ RssAnon of the tree,
20 ms samples), work units, tensors per second and CPU per tensor, next to the I/O floor of a
two-pass merge (read every input twice, write the output once, warm cache) measured in the same
run; then the unfused/fused ratio per method, and the CPU each extra tensor costs beyond its
bytes: (CPU unfused - CPU fused) / (45,395 - 1,025). A second set with 512 experts per layer
(~90k tensors: the FP8 release's count, scales included) shows how peak memory grows with the
tensor count; `--cluster` adds rows on a local `dask.distributed` cluster (`processes:2`). Every set
is evicted from the page cache and read back before the runs (`common.refill`): the layouts then
read from a cache filled the same way, not as the generator's writes left it.

    python benchmarks/bench_moe.py                                  # every family, ~30 min on 2 cores
    python benchmarks/bench_moe.py --methods ties,dppa --no-scale   # quicker
    python benchmarks/bench_moe.py --snapshot HEAD                  # pin the code while the tree changes
    python benchmarks/bench_moe.py --no-scale --repeat 3            # ratios from each layout's cheapest of 3 runs
    python benchmarks/bench_moe.py --methods ties,dppa --layouts as-shipped --no-scale   # the FP8 release: 91,991 tensors
    python benchmarks/bench_moe.py --against REV --methods ties --rounds 2   # this code and REV's, alternating
    python benchmarks/bench_moe.py --wider 2 --no-scale --repeat 3   # the same tensors, 4x the bytes each
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (DATA_DIR, REPO, fmt_mib, input_bytes, run_measured, save_result, two_pass_floor,  # noqa: E402
                    write_config)
from moegen import MoeShape, moe_dataset  # noqa: E402

# one config per method family: (merge_method, per-model parameters, global parameters, fine-tunes used, dtype)
FAMILIES = {
    "linear": ("linear", {}, {"weight": 0.5}, 2, "bfloat16"),  # the base is one more input: weights for all
    "task_arithmetic": ("task_arithmetic", {"weight": 0.5}, None, 2, "bfloat16"),
    "ties": ("ties", {"weight": 0.5, "density": 0.2}, None, 2, "bfloat16"),
    "dare_linear": ("dare_linear", {"weight": 0.5, "density": 0.5}, None, 2, "bfloat16"),
    "magnitude": ("magnitude", {"weight": 0.5, "density": 0.3}, None, 2, "bfloat16"),
    "breadcrumbs": ("breadcrumbs_ties", {"weight": 0.5, "density": 0.8, "gamma": 0.02}, None, 2, "bfloat16"),
    "della": ("della", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, None, 2, "bfloat16"),
    "slerp": ("slerp", {}, {"t": 0.4}, 1, "bfloat16"),
    "model_stock": ("model_stock", {}, None, 2, "bfloat16"),
    "sce": ("sce", {}, {"select_topk": 0.5}, 2, "bfloat16"),
    "ram": ("ram", {}, None, 2, "bfloat16"),
    "dppa": ("dppa", {}, None, 2, None),
}


def shape(args, **fields) -> MoeShape:
    """A set's shape at `--wider`'s widths: hidden and intermediate widths times W, so the same
    tensors hold W*W times the numbers (what a tensor costs beyond its bytes stays the same)."""
    s, w = MoeShape(**fields), args.wider
    return s if w == 1 else replace(s, hidden=s.hidden * w, intermediate=s.intermediate * w,
                                    moe_intermediate=s.moe_intermediate * w)


def run_one(name: str, paths: list[str], work: str, args, env, scheduler: str, tag: str, limit: str) -> dict:
    method, per_model, glob, k, dtype = FAMILIES[name]
    cfg = os.path.join(work, f"{name}_{tag}.yml")
    write_config(cfg, method, paths[0], [(p, per_model) for p in paths[1:1 + k]], glob, dtype=dtype)
    out, jpath = os.path.join(work, "out"), os.path.join(work, f"{name}_{tag}.json")
    extra = ["--memory-limit", limit, "--scheduler", scheduler] + args.extra
    m = run_measured(common.dppa_cmd(cfg, out, jpath, extra), env=env)
    rep = json.load(open(jpath)) if m.rc == 0 else {}
    shutil.rmtree(out, ignore_errors=True)
    row = {"method": name, "layout": tag, "scheduler": scheduler, "limit": limit, "rc": m.rc, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
           "peak_anon_bytes": m.peak_anon_bytes, "tensors": rep.get("tensors"), "work_units": rep.get("units"),
           "bytes_read": rep.get("bytes_read"), "stored_tensors": _stored(paths[0]), "self_report": rep,
           "command": " ".join(shlex.quote(c) for c in ["dppa-stream", "merge", cfg, "OUT", "--json", "R.json"] + extra)}
    if m.rc:
        row["stderr"] = m.stderr_tail
    print(f"  {name:16s} {tag:8s} {scheduler:12s} rc={m.rc} wall {m.wall_s:6.1f}s cpu {m.cpu_s:6.1f}s "
          f"peak {fmt_mib(m.peak_anon_bytes):>5} MiB  units {rep.get('units')}", flush=True)
    return row


def warm_up(name: str, sets: dict, work: str, args, env) -> None:
    """One untimed run of the method per layout first (`--no-warm-up` skips it): a fresh snapshot
    compiles the method's kernels on its first run (6-16 s, and LLVM's memory), which would
    otherwise be one of the timed runs, and the cheapest-run ratios would compare fewer runs."""
    if args.no_warm_up:
        return
    for tag, paths in sets.items():
        print(f"  (warm-up: {name} {tag})", flush=True)
        run_one(name, paths, work, args, env, args.scheduler, tag, args.limit)


def _stored(folder: str) -> int:
    """Tensors stored in a model's shards (an FP8 weight and its scale count two; the merge counts one)."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return len(json.load(f)["weight_map"])


def save(name: str, result: dict) -> None:
    """The results JSON, with paths relative to the repository (they name git-ignored data)."""
    save_result(name, json.loads(json.dumps(result).replace(REPO + os.sep, "")))


def table(result: dict) -> str:
    floor = result["io_floor_s"]
    lines = ["| method | layout | scheduler, limit | tensors | work units | wall s | CPU s | peak MiB | tensors/s | "
             "CPU µs/tensor | wall / I/O floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["rc"]:
            continue
        n = r["tensors"]
        stored = f" ({r['stored_tensors']:,} stored)" if r.get("stored_tensors", n) != n else ""
        lines.append(f"| {r['method']} | {r['layout']} | {r['scheduler']}, {r['limit']} | {n:,}{stored} | {r['work_units']} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{fmt_mib(r['peak_anon_bytes'])} | {n / r['wall_s']:.0f} | {r['cpu_s'] / n * 1e6:.0f} | "
                     f"{r['wall_s'] / floor:.2f}× |")
    lines += ["", "| method | unfused / fused, wall | unfused / fused, CPU | CPU µs per extra tensor |", "|---|---|---|---|"]
    if any(d.get("runs", 1) > 1 for d in result["ratios"].values()):
        lines[-2] = "| method | unfused / fused, wall (least of the runs) | unfused / fused, CPU (least) | CPU µs per extra tensor |"
    for name, d in result["ratios"].items():
        lines.append(f"| {name} | {d['wall']:.2f}× | {d['cpu']:.2f}× | {d['us_per_extra_tensor']:.0f} |")
    return "\n".join(lines)


def against(args, work: str) -> int:
    """Each method on the unfused set by two versions of the code, alternating, `--rounds` times."""
    versions = {v: common.snapshot(v) for v in (args.snapshot or "HEAD", args.against)}
    paths = moe_dataset(shape(args, fused=False), 2)
    common.refill(paths)
    result = {"code": common.code_version(), "versions": versions, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "limit": args.limit, "scheduler": args.scheduler, "rows": []}
    for name in args.methods.split(","):
        for snap in versions.values():
            warm_up(name, {"unfused": paths}, work, args, common.ours_env(snap))
        for r in range(args.rounds):
            for v, snap in versions.items():
                row = run_one(name, paths, work, args, common.ours_env(snap), args.scheduler, "unfused", args.limit)
                row.update(version=v, sha=snap["sha"], round=r)
                result["rows"].append(row)
        save(f"{args.name}.json", result)
    print("\n| method | " + " | ".join(f"CPU s at {v} (runs)" for v in versions) + " | CPU ratio (medians) |")
    print("|---|" + "---|" * len(versions) + "---|")
    for name in args.methods.split(","):
        cpu = {v: sorted(r["cpu_s"] for r in result["rows"] if r["method"] == name and r["version"] == v and not r["rc"])
               for v in versions}
        med = {v: statistics.median(c) if c else float("nan") for v, c in cpu.items()}
        a, b = versions
        print(f"| {name} | " + " | ".join(", ".join(f"{x:.1f}" for x in cpu[v]) for v in versions)
              + f" | {med[a] / med[b]:.2f}× |")
    print(f"results in benchmarks/results/{args.name}.json")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(FAMILIES))
    ap.add_argument("--layouts", default="unfused,fused", help="of unfused, fused, as-shipped (the FP8 release: "
                    "FP8 projections with their scales and the MTP layer, 91,991 tensors)")
    ap.add_argument("--limit", default="1GiB")
    ap.add_argument("--scheduler", default="threads:2")
    ap.add_argument("--no-scale", action="store_true", help="skip the 512-expert (~90k tensors) set")
    ap.add_argument("--cluster", default="", help="methods to run again on --cluster-scheduler (e.g. ties,dppa)")
    ap.add_argument("--cluster-scheduler", default="processes:2")
    ap.add_argument("--cluster-limit", default="2GiB", help="--memory-limit of the cluster rows (3 processes)")
    ap.add_argument("--snapshot", default=None, metavar="REV", help="run dppa_stream exported at git REV")
    ap.add_argument("--extra", default="", help="extra dppa-stream merge arguments, one string")
    ap.add_argument("--wider", type=int, default=1, metavar="W", help="hidden and intermediate widths times W: "
                    "the same tensor count, W*W times the bytes (--wider 2: ~750 MB per model)")
    ap.add_argument("--name", default="bench_moe")
    ap.add_argument("--against", metavar="REV", help="instead: the unfused set, each method run alternately by "
                    "the code at --snapshot (default HEAD) and at REV, --rounds times (a loaded machine moves CPU "
                    "times by 2x between runs minutes apart; side by side they see the same load)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-warm-up", action="store_true", help="time the first run of each method too (a fresh "
                    "snapshot compiles its kernels then)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each method and layout, alternating; the ratios "
                    "compare each layout's cheapest run (a shared machine only ever adds CPU time)")
    args = ap.parse_args()
    args.extra = shlex.split(args.extra)
    work = os.path.join(DATA_DIR, "bench_moe")
    os.makedirs(work, exist_ok=True)
    if args.against:
        return against(args, work)
    snap = common.snapshot(args.snapshot) if args.snapshot else None
    env = common.ours_env(snap)
    layouts = {"unfused": shape(args, fused=False), "fused": shape(args, fused=True),
               "as-shipped": shape(args, mtp=True, fp8=True)}  # the FP8 release's 91,991 tensors
    sets = {tag: moe_dataset(layouts[tag], 2) for tag in args.layouts.split(",")}
    for paths in sets.values():  # every layout read from a page cache filled the same way
        common.refill(paths)
    first = next(iter(sets.values()))
    out_bytes = input_bytes(first[:1])
    floor = two_pass_floor(first, out_bytes, work, cold=False)
    print(f"I/O floor (warm): {floor['seconds']:.2f}s (reads {floor['read_s']}, write {floor['write_s']:.2f}s)")
    result = {"code": common.code_version(), "snapshot": snap, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wider": args.wider, "limit": args.limit, "scheduler": args.scheduler, "extra": args.extra, "io_floor_s": floor["seconds"],
              "io_floor": floor, "input_bytes": input_bytes(first), "sets": sets, "rows": [], "ratios": {}}
    for name in args.methods.split(","):
        warm_up(name, sets, work, args, env)
        runs = []
        for r in range(args.repeat):  # the layouts alternate: a busy spell of the machine hits both
            for tag, paths in sets.items():
                runs.append(run_one(name, paths, work, args, env, args.scheduler, tag, args.limit))
                runs[-1]["round"] = r
        result["rows"] += runs
        got = {}  # per layout, its cheapest run (in CPU): what the code costs, the rest is the machine's other work
        for r in runs:
            if r["rc"] == 0 and (r["layout"] not in got or r["cpu_s"] < got[r["layout"]]["cpu_s"]):
                got[r["layout"]] = r
        if "unfused" in got and "fused" in got:
            u, f = got["unfused"], got["fused"]
            wall = {t: min(r["wall_s"] for r in runs if r["layout"] == t and r["rc"] == 0) for t in ("unfused", "fused")}
            result["ratios"][name] = {"wall": wall["unfused"] / wall["fused"], "cpu": u["cpu_s"] / f["cpu_s"],
                                      "us_per_extra_tensor": (u["cpu_s"] - f["cpu_s"]) / (u["tensors"] - f["tensors"]) * 1e6,
                                      "runs": args.repeat}
        save(f"{args.name}.json", result)
    for name in filter(None, args.cluster.split(",")):
        for tag, paths in sets.items():
            result["rows"].append(run_one(name, paths, work, args, env, args.cluster_scheduler, tag, args.cluster_limit))
        save(f"{args.name}.json", result)
    if not args.no_scale:
        big = moe_dataset(shape(args, experts=512), 2)
        result["scale"] = []
        for name in ("ties", "dppa"):
            if name in args.methods.split(","):
                row = run_one(name, big, work, args, env, args.scheduler, "unfused-512", args.limit)
                result["scale"].append(row)
                small = next(r for r in result["rows"] if r["method"] == name and r["layout"] == "unfused")
                if row["rc"] == 0 and small["rc"] == 0:
                    row["peak_kib_per_extra_tensor"] = ((row["peak_anon_bytes"] - small["peak_anon_bytes"])
                                                        / (row["tensors"] - small["tensors"]) / 1024)
        save(f"{args.name}.json", result)
    print()
    print(table(result))
    for row in result.get("scale", []):
        if "peak_kib_per_extra_tensor" in row:
            print(f"{row['method']}: {row['tensors']} tensors peak {fmt_mib(row['peak_anon_bytes'])} MiB "
                  f"({row['peak_kib_per_extra_tensor']:.1f} KiB per tensor beyond the 45k set)")
    print(f"results in benchmarks/results/{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
