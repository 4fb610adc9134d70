"""Linear scaling: wall time, throughput and peak memory of one merge method over checkpoint size x
number of fine-tunes, next to the machine's measured read bandwidth (cold and warm page cache).

Sets are Llama-shaped bf16 synthetic checkpoints from benchmarks/fastgen.py (`--sizes` in GB per
checkpoint: TinyLlama-1.1B widths below 2.5 GB, Llama-3-8B widths with its 128256 x 4096 embedding
above). For each size and K in `--ks`, base + K fine-tunes are merged once with the default
`--memory-limit` (half the available memory), from a cold page cache for the inputs
(posix_fadvise DONTNEED before each run). Peak memory = max of sum(RssAnon) over the process tree,
sampled every 20 ms (benchmarks/common.py). A least-squares line wall = a + b * input bytes is
fitted; memory should be flat.

Read bandwidth is measured in the same run, before and after the merges: one 6 GB checkpoint read
with 16 MiB buffered reads after eviction (cold), then again at once (warm).

    python benchmarks/bench_scale.py                           # dppa, 0.5/2/6 GB x K=1,2,4 (~25 min here)
    python benchmarks/bench_scale.py --method ties --sizes 0.5,2 --ks 1,2
    python benchmarks/bench_scale.py --plot-only               # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from bench_memory import evict  # noqa: E402
from common import DATA_DIR, RESULTS_DIR, fmt_mib, input_bytes, run_measured, weight_files, write_config  # noqa: E402
from fastgen import fast_dataset, shape_for  # noqa: E402


def method_params(method: str) -> tuple[dict, dict, str | None, str | None]:
    """(per-model params, global params, dtype, out_dtype) for the config."""
    if method == "ties":
        # density 1 (the default) crashes on split tensors (benchmarks/README.md, known issues)
        return {"weight": 0.5, "density": 0.2}, {}, "float32", "bfloat16"
    if method == "task_arithmetic":
        return {"weight": 0.5}, {}, "float32", "bfloat16"
    return {}, {}, None, None  # dppa / dp defaults


def bandwidth(files: list[str]) -> dict:
    evict(files)
    cold = io_floor_files(files)
    warm = io_floor_files(files)
    return {"files": files, "cold": cold, "warm": warm}


def io_floor_files(files: list[str], block: int = 16 << 20) -> dict:
    """common.io_floor over an explicit file list."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for fpath in files:
        with open(fpath, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / 1e9}


def fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": a, "slope": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["rc"] == 0]
    sizes = sorted({r["size_gb"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    markers = {k: m for k, m in zip(ks, "os^Dv")}
    colors = {s: c for s, c in zip(sizes, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        x = r["input_bytes"] / 1e9
        kw = dict(marker=markers[r["k"]], color=colors[r["size_gb"]], linestyle="none", markersize=7)
        ax1.plot(x, r["wall_s"], **kw)
        ax1.plot(x, r["cpu_s"], marker=markers[r["k"]], color=colors[r["size_gb"]], markerfacecolor="none",
                 linestyle="none", markersize=7)
        ax2.plot(x, r["peak_anon_bytes"] / 2**20, **kw)
    xmax = max(r["input_bytes"] for r in rows) / 1e9 * 1.05
    f = result["fit_wall"]
    ax1.plot([0, xmax], [f["intercept"], f["intercept"] + f["slope"] * xmax * 1e9], color="gray", linewidth=1,
             label=f"fit wall: {f['slope'] * 1e9:.1f} s/GB, R²={f['r2']:.3f}")
    bw = result["bandwidth"][0]["cold"]["gb_per_s"]
    passes = result.get("read_passes")
    if passes:
        ax1.plot([0, xmax], [0, xmax * passes / bw], color="black", linestyle=":", linewidth=1,
                 label=f"cold read floor ({passes:.2g} reads at {bw:.2f} GB/s)")
    ax1.set_xlabel("input bytes (base + K fine-tunes), GB")
    ax1.set_ylabel("seconds (filled: wall, hollow: CPU)")
    ax1.set_title(f"{result['method']}: time vs input size")
    ax1.set_xlim(0, xmax)
    ax1.set_ylim(0)
    ax1.legend(fontsize=8, loc="upper left")
    ax2.set_xlabel("input bytes (base + K fine-tunes), GB")
    ax2.set_ylabel("peak anonymous memory, MiB (process tree)")
    ax2.set_title(f"{result['method']}: peak memory vs input size")
    ax2.set_xlim(0, xmax)
    ax2.set_ylim(0, max(1100, max(r["peak_anon_bytes"] for r in rows) / 2**20 * 1.2))
    ax2.axhline(1024, color="gray", linestyle="--", linewidth=1, label="1 GiB")
    handles = [plt.Line2D([], [], color=colors[s], marker="o", linestyle="none", label=f"{s:g} GB/ckpt") for s in sizes]
    handles += [plt.Line2D([], [], color="black", marker=markers[k], linestyle="none", label=f"K={k}") for k in ks]
    ax2.legend(handles=handles + [plt.Line2D([], [], color="gray", linestyle="--", label="1 GiB")], fontsize=8,
               loc="lower right", ncol=2)
    lim = " ".join(result.get("extra") or []) or "default --memory-limit"
    fig.suptitle(f"dppa-stream {result['method']}, {lim}, cold page cache, "
                 f"{result['cpus']} shared cores (noisy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dppa", help="dppa, ties or task_arithmetic")
    ap.add_argument("--sizes", default="0.5,2,6", help="GB per checkpoint")
    ap.add_argument("--ks", default="1,2,4", help="numbers of fine-tunes")
    ap.add_argument("--extra", default="", help="extra dppa-stream merge arguments, one string: --extra='--unit-size 16MiB'")
    ap.add_argument("--snapshot", default=None, metavar="REV",
                    help="run dppa_stream exported at git REV (common.snapshot) instead of the live tree")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default bench_scale[_METHOD])")
    args = ap.parse_args()
    args.extra = shlex.split(args.extra)
    stem = args.name or ("bench_scale" if args.method == "dppa" else f"bench_scale_{args.method}")
    jpath_out = os.path.join(RESULTS_DIR, stem + ".json")
    png = os.path.join(RESULTS_DIR, stem + ".png")
    if args.plot_only:
        with open(jpath_out) as f:
            plot(json.load(f), png)
        print(f"wrote {png}")
        return 0

    sizes = [float(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    gen_log: list = []
    sets = {s: fast_dataset(shape_for(s), max(ks), torch.bfloat16, log=gen_log) for s in sizes}
    work = os.path.join(DATA_DIR, "bench_scale")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    per_model, glob, dtype, out_dtype = method_params(args.method)
    snap = common.snapshot(args.snapshot) if args.snapshot else None
    env = common.ours_env(snap)
    if snap:
        common.check_snapshot_import(snap)

    # read bandwidth: one checkpoint of >= ~6 GB (the largest set's base, or several bases)
    bw_files: list[str] = []
    for s in sorted(sizes, reverse=True):
        bw_files += weight_files(sets[s][0])
        if sum(os.path.getsize(f) for f in bw_files) >= 5e9:
            break
    result = {"method": args.method, "sizes_gb": sizes, "ks": ks, "extra": args.extra, "cpus": os.cpu_count(),
              "torch": torch.__version__, "code": common.code_version(), "snapshot": snap, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "shapes": {str(s): shape_for(s).__dict__ for s in sizes}, "generation": gen_log, "bandwidth": [],
              "rows": [], "notes": [
                  "every merge starts with the inputs evicted from the page cache (posix_fadvise DONTNEED)",
                  "peak anon = max over 20 ms samples of sum(RssAnon) over the process tree",
                  "2 shared cores: other jobs ran at the same time; wall times are noisy, CPU seconds less so"]}
    bw = bandwidth(bw_files)
    result["bandwidth"].append({"when": "before", **bw})
    print(f"read bandwidth ({bw['cold']['bytes'] / 1e9:.1f} GB): cold {bw['cold']['gb_per_s']:.2f} GB/s, "
          f"warm {bw['warm']['gb_per_s']:.2f} GB/s", flush=True)

    for s in sizes:
        paths = sets[s]
        for k in ks:
            use = paths[:k + 1]
            cfg = os.path.join(work, f"{args.method}_s{s:g}_k{k}.yml")
            write_config(cfg, args.method, use[0], [(p, per_model) for p in use[1:]], glob or None, dtype=dtype,
                         out_dtype=out_dtype)
            jpath = os.path.join(work, f"{args.method}_s{s:g}_k{k}.json")
            if os.path.exists(jpath):
                os.unlink(jpath)
            files = [f for p in use for f in weight_files(p)]
            evict(files)
            m = run_measured(common.dppa_cmd(cfg, out, jpath, args.extra), env=env,
                             log_path=os.path.join(work, f"{args.method}_s{s:g}_k{k}.log"))
            rep = json.load(open(jpath)) if os.path.isfile(jpath) else {}
            ib = input_bytes(use)
            row = {"size_gb": s, "k": k, "checkpoint_bytes": input_bytes([use[0]]), "input_bytes": ib, "rc": m.rc,
                   "wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes, "samples": m.samples,
                   "max_gap_ms": m.max_gap_ms, "sampler": m.extra, "bytes_read": rep.get("bytes_read"),
                   "bytes_written": rep.get("bytes_written"), "units": rep.get("units"),
                   "split_tensors": rep.get("split_tensors"), "self_report": rep,
                   "input_mb_per_s": ib / m.wall_s / 1e6, "read_mb_per_s": (rep.get("bytes_read") or 0) / m.wall_s / 1e6}
            if m.rc != 0:
                row["stderr_tail"] = m.stderr_tail
            result["rows"].append(row)
            print(f"  {s:4g} GB x (1+{k}) = {ib / 1e9:5.1f} GB  rc={m.rc}  wall {m.wall_s:7.1f}s  cpu {m.cpu_s:7.1f}s  "
                  f"{ib / m.wall_s / 1e6:6.0f} MB/s input ({row['read_mb_per_s']:.0f} MB/s read)  "
                  f"peak {fmt_mib(m.peak_anon_bytes)} MiB", flush=True)

    bw = bandwidth(bw_files)
    result["bandwidth"].append({"when": "after", **bw})
    print(f"read bandwidth again: cold {bw['cold']['gb_per_s']:.2f} GB/s, warm {bw['warm']['gb_per_s']:.2f} GB/s", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    ok = [r for r in result["rows"] if r["rc"] == 0]
    if len(ok) >= 2:
        result["fit_wall"] = fit([r["input_bytes"] for r in ok], [r["wall_s"] for r in ok])
        result["fit_cpu"] = fit([r["input_bytes"] for r in ok], [r["cpu_s"] for r in ok])
        reads = [r["bytes_read"] / r["input_bytes"] for r in ok if r["bytes_read"]]
        result["read_passes"] = sum(reads) / len(reads) if reads else None
        peaks = [r["peak_anon_bytes"] for r in ok]
        result["memory"] = {"min": min(peaks), "max": max(peaks), "spread_ratio": max(peaks) / min(peaks)}
        fw, fc = result["fit_wall"], result["fit_cpu"]
        print(f"fit: wall = {fw['intercept']:.1f}s + {fw['slope'] * 1e9:.2f} s/GB (R² {fw['r2']:.3f}); "
              f"cpu = {fc['intercept']:.1f}s + {fc['slope'] * 1e9:.2f} s/GB (R² {fc['r2']:.3f}); "
              f"peak memory {fmt_mib(min(peaks))}-{fmt_mib(max(peaks))} MiB", flush=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(jpath_out, "w") as f:
        json.dump(result, f, indent=2)
    if len(ok) >= 2:
        plot(result, png)
        print(f"wrote {png}")
    print(f"results in {jpath_out}")
    return 0 if len(ok) == len(result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
