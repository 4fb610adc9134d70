"""Speed and memory: dppa-stream vs mergekit 0.1.5 on a ~0.5B-parameter Llama-shaped bf16 set.

Each merge runs as its own subprocess (the CLI, end to end, imports included). While it runs we
sample Σ RssAnon over its whole process tree every --interval seconds (default 20 ms) from
/proc/<pid>/status; that peak is the memory figure (not RSS/VmHWM, which count file pages).
The page cache cannot be dropped without root, so all numbers are WARM-CACHE numbers; the same
run measures a plain-read floor (every input file read once with 16 MiB reads) for reference.

    .venv/bin/python benchmarks/bench_merge.py                 # default shape, 1 round
    .venv/bin/python benchmarks/bench_merge.py --repeat 2      # two rounds, both reported
    # pin the dppa-stream code to a commit (others edit the tree), add a memory-capped variant:
    .venv/bin/python benchmarks/bench_merge.py --snapshot HEAD \
        --ours-variant "mem768=--memory-limit 768MiB" --out benchmarks/results/bench_merge_r1.json
    # combine separate invocations (each one round) into one table / JSON:
    .venv/bin/python benchmarks/bench_merge.py --report benchmarks/results/bench_merge_r*.json

One round (both methods, both tools) takes ~4 min on a quiet 2-core box and up to ~13 min when the
cores are shared (mergekit's TIES alone took 186-418 s then); use one invocation per round, or
--methods ties / --methods task_arithmetic, to keep invocations short.

Writes benchmarks/results/bench_merge.json (override with --out). Generated checkpoints and
outputs live under benchmarks/data/ (git-ignored). mergekit is run from $MERGEKIT_VENV, else the repository's
.venv-mergekit, when present, otherwise skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

TARGETS = {  # method: (min speedup = mergekit wall / ours, max memory ratio = ours peak / mergekit peak)
    "ties": (10.0, 0.25),
    "task_arithmetic": (1.5, None),
}


def method_config(method: str, paths: list[str], density: float) -> tuple[str, list, dict]:
    base, fts = paths[0], paths[1:]
    w = 1.0 / len(fts)
    per_model = []
    for p in fts:
        params = {"weight": w}
        if method == "ties":
            params["density"] = density
        per_model.append((p, params))
    return base, per_model, {}


def compare_outputs(a_dir: str, b_dir: str) -> dict:
    """Bitwise comparison of two merged checkpoints (same tensor names expected)."""
    import torch
    from safetensors import safe_open

    def catalogue(d):
        out = {}
        for f in common.weight_files(d):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    ca, cb = catalogue(a_dir), catalogue(b_dir)
    res = {"tensors": len(ca), "only_in_a": sorted(set(ca) - set(cb)), "only_in_b": sorted(set(cb) - set(ca)),
           "elements": 0, "mismatched": 0, "mismatched_tensors": 0, "max_abs_diff": 0.0, "worst": []}
    for name in sorted(set(ca) & set(cb)):
        with safe_open(ca[name], "pt") as ha, safe_open(cb[name], "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["worst"].append((name, f"dtype/shape {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"))
            res["mismatched_tensors"] += 1
            continue
        ib = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        neq = x.reshape(-1).view(ib) != y.reshape(-1).view(ib)
        n = int(neq.sum())
        res["elements"] += x.numel()
        if n:
            res["mismatched"] += n
            res["mismatched_tensors"] += 1
            d = float((x.float() - y.float()).abs().max())
            res["max_abs_diff"] = max(res["max_abs_diff"], d)
            res["worst"].append((name, n))
        del x, y
    res["worst"] = sorted(res["worst"], key=lambda t: -t[1] if isinstance(t[1], int) else 0)[:5]
    return res


def run_ours(cfg: str, out: str, json_path: str, logs: str, tag: str, interval: float, extra: list[str],
             tool: str = "dppa-stream", snap: dict | None = None) -> dict:
    if os.path.exists(out):
        shutil.rmtree(out)  # not timed; --overwrite is still passed as in normal use
    cmd = common.dppa_cmd(cfg, out, json_path, extra)
    m = common.run_measured(cmd, env=common.ours_env(snap), interval=interval, log_path=os.path.join(logs, tag + ".log"),
                            cwd=snap["path"] if snap else None)
    row = {"tool": tool, **asdict(m)}
    if m.rc == 0 and os.path.exists(json_path):
        with open(json_path) as f:
            row["self_report"] = json.load(f)
    return row


def run_mergekit(cfg: str, out: str, logs: str, tag: str, interval: float, extra: list[str]) -> dict:
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = common.mergekit_cmd(cfg, out, extra)
    m = common.run_measured(cmd, env=common.mergekit_env(), interval=interval, log_path=os.path.join(logs, tag + ".log"))
    return {"tool": "mergekit", **asdict(m)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--intermediate", type=int, default=3456)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; every round runs every (method, tool)")
    ap.add_argument("--interval", type=float, default=0.02, help="memory sampling interval in seconds (<= 0.05)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-compare", action="store_true", help="skip the bitwise comparison of the two outputs")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged checkpoints (about 1 GB each) afterwards")
    ap.add_argument("--ours-args", default="", help="extra arguments for the primary `dppa-stream merge` run")
    ap.add_argument("--ours-variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="an additional dppa-stream configuration, e.g. 'mem768=--memory-limit 768MiB' (repeatable)")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml, e.g. '-j 1'")
    ap.add_argument("--snapshot", metavar="REV", help="run dppa-stream as committed at REV (e.g. HEAD), exported to "
                    "benchmarks/data/snapshots/, instead of the live working tree")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="run nothing: combine these result files (rounds renumbered in order), print the tables, write --out")
    ap.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "bench_merge.json"))
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.out)
    if not 0 < args.interval <= 0.05:
        ap.error("--interval must be in (0, 0.05]")

    import torch

    from dppa_stream.synthetic import LlamaShape

    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=args.heads, kv_heads=args.kv_heads)
    paths = common.dataset(shape, args.finetunes, torch.bfloat16)
    in_bytes = common.input_bytes(paths)
    work = os.path.join(common.DATA_DIR, "bench_merge")
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    use_mk = not args.no_mergekit and common.mergekit_available()
    notes = ["warm page cache: inputs were read just before (no root to drop caches); cold-cache times would be higher",
             "memory = peak of sum(RssAnon) over the process tree, sampled from /proc/<pid>/status"]
    if not use_mk:
        notes.append("mergekit skipped: " + ("--no-mergekit" if args.no_mergekit else f"{common.MK_BIN} not found"))
    ours_extra, mk_extra = args.ours_args.split(), args.mergekit_args.split()
    variants = []
    for spec in args.ours_variant:
        label, _, extra = spec.partition("=")
        if not label.isidentifier():
            ap.error(f"--ours-variant {spec!r}: LABEL must be a plain word")
        variants.append((label, extra.split()))

    snap = common.snapshot(args.snapshot) if args.snapshot else None
    if snap:
        common.check_snapshot_import(snap)
        print(f"dppa-stream code: snapshot of {snap['rev']} = {snap['sha'][:10]}", flush=True)
    code_start = common.code_version()
    if not snap:
        print(f"dppa-stream code: live tree at {code_start['head'][:10]}"
              + (f" with {len(code_start['dirty'])} uncommitted change(s)" if code_start["dirty"] else ""), flush=True)

    cfgs = {}
    for method in methods:
        base, models, glob = method_config(method, paths, args.density)
        cfg = os.path.join(work, f"{method}.yml")
        common.write_config(cfg, method, base, models, glob, dtype="float32", out_dtype="bfloat16")
        cfgs[method] = cfg

    print(f"inputs: {len(paths)} checkpoints, {shape.numel() / 1e9:.3f} B params each, {in_bytes / 1e9:.2f} GB total "
          f"(bf16); {os.cpu_count()} CPUs; mergekit: {'yes' if use_mk else 'no'}", flush=True)
    result = {"shape": asdict(shape), "params": shape.numel(), "finetunes": args.finetunes, "density": args.density,
              "input_bytes": in_bytes, "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "interval_s": args.interval, "ours_args": ours_extra,
              "mergekit_args": mk_extra, "ours_variants": dict(variants),
              "code": {"snapshot": snap, "live_at_start": code_start}, "notes": notes, "configs": {m: open(c).read() for m, c in cfgs.items()},
              "io_floor": [], "runs": [], "compare": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if use_mk:
        result["mergekit_version"] = subprocess.run(
            [os.path.join(common.MK_VENV, "bin", "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True, text=True).stdout.strip()

    for rnd in range(1, args.repeat + 1):
        floor = common.io_floor(paths)
        floor["round"] = rnd
        result["io_floor"].append(floor)
        print(f"[round {rnd}] plain-read floor: {floor['bytes'] / 1e9:.2f} GB in {floor['seconds']:.2f}s "
              f"= {floor['gb_per_s']:.2f} GB/s (16 MiB reads, warm cache)", flush=True)
        for method in methods:
            tools = [("dppa-stream", "ours", ours_extra)] + ([("mergekit", "mk", mk_extra)] if use_mk else [])
            tools += [(f"dppa-stream[{label}]", f"ours_{label}", extra) for label, extra in variants]
            for tool, short, extra in tools:
                out = os.path.join(work, f"out_{short}_{method}")
                tag = f"r{rnd}_{short}_{method}"
                if tool == "mergekit":
                    row = run_mergekit(cfgs[method], out, logs, tag, args.interval, extra)
                else:
                    row = run_ours(cfgs[method], out, os.path.join(work, tag + ".json"), logs, tag, args.interval, extra,
                                   tool, snap)
                row.update(method=method, round=rnd)
                result["runs"].append(row)
                status = "ok" if row["rc"] == 0 else f"FAILED rc={row['rc']}: {row['stderr_tail'][-400:]}"
                print(f"  {method:<16} {tool:<20} {row['wall_s']:7.1f}s  peak {common.fmt_mib(row['peak_anon_bytes'])} MiB  "
                      f"{status}", flush=True)
            if rnd == 1 and use_mk and not args.no_compare:
                a, b = os.path.join(work, f"out_ours_{method}"), os.path.join(work, f"out_mk_{method}")
                if os.path.isdir(a) and os.path.isdir(b):
                    result["compare"][method] = compare_outputs(a, b)
        with open(args.out, "w") as f:  # partial results survive an interrupted later round
            json.dump(result, f, indent=2, default=str)

    result["code"]["live_at_end"] = code_end = common.code_version()
    if not snap and code_end != code_start:
        msg = (f"WARNING: the live dppa-stream tree changed during the run ({code_start['head'][:10]} -> "
               f"{code_end['head'][:10]}); use --snapshot HEAD for numbers tied to one commit")
        notes.append(msg)
        print(msg)
    summarize(result, methods, use_mk)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(args.out)}")
    if not args.keep_outputs:
        for name in os.listdir(work):
            if name.startswith("out_"):
                shutil.rmtree(os.path.join(work, name), ignore_errors=True)


def report(files: list[str], out: str) -> None:
    parts = []
    for f in files:
        with open(f) as h:
            parts.append(json.load(h))
    result = dict(parts[0])
    result["runs"], result["io_floor"], result["compare"], result["sources"] = [], [], {}, []
    rnd = 0
    for f, p in zip(files, parts):
        for key in ("shape", "params", "input_bytes"):
            if p[key] != result[key]:
                raise SystemExit(f"{f}: {key} differs from {files[0]}; not combining")
        mapping = {}
        for r in sorted({r["round"] for r in p["runs"]}):
            rnd += 1
            mapping[r] = rnd
        result["runs"] += [{**r, "round": mapping[r["round"]]} for r in p["runs"]]
        result["io_floor"] += [{**x, "round": mapping[x["round"]]} for x in p["io_floor"] if x["round"] in mapping]
        for m, c in p.get("compare", {}).items():
            result["compare"].setdefault(m, c)
        result["sources"].append({"file": os.path.relpath(f), "started": p.get("started"), "code": p.get("code"),
                                  "rounds": sorted(mapping.values())})
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    use_mk = any(r["tool"] == "mergekit" for r in result["runs"])
    for s in result["sources"]:
        snap = (s["code"] or {}).get("snapshot")
        print(f"{s['file']}: started {s['started']}, rounds {s['rounds']}, dppa-stream "
              + (f"snapshot {snap['sha'][:10]}" if snap else f"live tree {(s['code'] or {}).get('live_at_start', {}).get('head', '?')[:10]}"))
    summarize(result, methods, use_mk)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nwrote {os.path.relpath(out)}")


def summarize(result: dict, methods: list[str], use_mk: bool) -> None:
    in_bytes = result["input_bytes"]
    print("\nWarm-cache results (wall = whole CLI process incl. imports; in GB/s = input bytes / wall):")
    hdr = (f"{'method':<16} {'tool':<20} {'rnd':>3} {'wall s':>7} {'cpu s':>6} {'in GB/s':>7} {'read GB':>7} "
           f"{'rchar GB':>8} {'peak anon MiB':>13} {'self MiB':>8} {'samples':>7} {'gap p99/max ms':>14}")
    print(hdr)
    print("-" * len(hdr))
    for method in methods:
        for r in [r for r in result["runs"] if r["method"] == method]:
            sr = r.get("self_report") or {}
            read = sr.get("bytes_read", in_bytes if r["tool"] == "mergekit" else 0)
            gaps = f"{r['extra'].get('gap_p99_ms', 0):.0f}/{r['max_gap_ms']:.0f}"
            print(f"{method:<16} {r['tool']:<20} {r['round']:>3} {r['wall_s']:>7.1f} {r['cpu_s']:>6.1f} "
                  f"{in_bytes / r['wall_s'] / 1e9:>7.3f} {read / 1e9:>7.2f} {r['rchar_bytes'] / 1e9:>8.2f} "
                  f"{common.fmt_mib(r['peak_anon_bytes']):>13} "
                  f"{(common.fmt_mib(sr['peak_anon_bytes']) if sr else '-'):>8} {r['samples']:>7} {gaps:>14}"
                  + ("" if r["rc"] == 0 else f"  FAILED rc={r['rc']}"))
    floors = result["io_floor"]
    print("plain-read floor (all inputs once, 16 MiB reads, warm cache): "
          + ", ".join(f"round {f['round']}: {f['bytes'] / 1e9:.2f} GB in {f['seconds']:.2f}s = {f['gb_per_s']:.2f} GB/s"
                      for f in floors))
    print("('read GB': dppa-stream's own count; for mergekit the input size, each tensor mapped once. 'rchar' counts "
          "read()/pread() syscalls only, so mergekit's mmap reads do not show)")
    if not use_mk:
        print("\nmergekit not run: no ratios.")
        return
    print("\nRatios (speedup = mergekit wall / dppa-stream wall; memory = dppa-stream peak / mergekit peak):")
    ratios = {}
    ours_tools = sorted({r["tool"] for r in result["runs"] if r["tool"] != "mergekit"}, key=lambda t: (t != "dppa-stream", t))
    for method in methods:
        mk = {r["round"]: r for r in result["runs"] if r["method"] == method and r["tool"] == "mergekit" and r["rc"] == 0}
        for tool in ours_tools:
            ours = {r["round"]: r for r in result["runs"] if r["method"] == method and r["tool"] == tool and r["rc"] == 0}
            per_round = []
            for rnd in sorted(set(ours) & set(mk)):
                per_round.append({"round": rnd, "speedup": mk[rnd]["wall_s"] / ours[rnd]["wall_s"],
                                  "cpu_ratio": mk[rnd]["cpu_s"] / max(ours[rnd]["cpu_s"], 1e-9),
                                  "mem_ratio": ours[rnd]["peak_anon_bytes"] / mk[rnd]["peak_anon_bytes"]})
            if not per_round:
                print(f"  {method} {tool}: no successful pair")
                continue
            best = {"speedup": min(r["wall_s"] for r in mk.values()) / min(r["wall_s"] for r in ours.values()),
                    "mem_ratio": max(r["peak_anon_bytes"] for r in ours.values()) / min(r["peak_anon_bytes"] for r in mk.values())}
            t_speed, t_mem = TARGETS.get(method, (None, None))
            verdict = []
            if t_speed:
                verdict.append(f"speed target >= {t_speed:g}x: {'MET' if best['speedup'] >= t_speed else 'NOT MET'}")
            if t_mem:
                verdict.append(f"memory target <= {t_mem:g}: {'MET' if best['mem_ratio'] <= t_mem else 'NOT MET'}")
            ratios.setdefault(method, {})[tool] = {"per_round": per_round, "best_of": best,
                                                   "targets": {"speedup": t_speed, "mem_ratio": t_mem}, "verdict": verdict}
            for r in per_round:
                print(f"  {method:<16} {tool:<20} round {r['round']}: speedup {r['speedup']:5.2f}x "
                      f"(CPU-time ratio {r['cpu_ratio']:5.2f}x), memory ratio {r['mem_ratio']:.3f}")
            print(f"  {method:<16} {tool:<20} best-of: speedup {best['speedup']:.2f}x (min walls), memory ratio "
                  f"{best['mem_ratio']:.3f} (max ours / min mergekit) -> {'; '.join(verdict)}")
    result["ratios"] = ratios
    if result["compare"]:
        print("\nOutput agreement, dppa-stream (primary) vs mergekit, bitwise on the bf16 outputs (round 1):")
        for method, c in result["compare"].items():
            print(f"  {method:<16} {c['mismatched']} of {c['elements']} elements differ in {c['mismatched_tensors']} of "
                  f"{c['tensors']} tensors (max |diff| {c['max_abs_diff']:.3g}); worst: {c['worst'][:3]}")


if __name__ == "__main__":
    main()
