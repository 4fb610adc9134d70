"""Merge quality benchmark: DPPA's claims in miniature, on tiny Llama models trained here on CPU.

    .venv/bin/python -m benchmarks.quality.run             # full run: 3 seeds, both tables
    .venv/bin/python -m benchmarks.quality.run --smoke     # seconds: CI smoke version
    .venv/bin/python -m benchmarks.quality.run --seeds 0   # one seed

Run from the repository root. Trained checkpoints are cached under benchmarks/quality/cache/
(git-ignored) by a hash of their training config and seed, so a re-run only merges and evaluates.
Results: results/quality.json, results/tables.md, results/retention.png, and the results block of
README.md (full runs only; --out elsewhere leaves the README alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a script path
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    __package__ = "benchmarks.quality"
    import benchmarks.quality  # noqa: F401

from . import experiments as X  # noqa: E402
from . import model as M  # noqa: E402
from . import report  # noqa: E402

RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny training, one domain, a few merges (CI)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds [default: 0,1,2; smoke: 0]")
    ap.add_argument("--sweep-rates", default=None,
                    help="Table 1 rates for every seed after the first (e.g. 0.8,0.9) [default: all rates]")
    ap.add_argument("--tables", default="table1,table2",
                    help="which tables to run: table1, table2, search (the search strategies; results in search.json)")
    ap.add_argument("--strategies", default=None,
                    help="search table: strategies to run, comma-separated, each NAME[:MIN_GAIN][+TUNED] (e.g. "
                         "refine:0.01, refine+rates) [default: the plan's]")
    ap.add_argument("--extend", action="store_true",
                    help="search table: add the rows of --strategies to the existing search.json (same seeds and "
                         "cached checkpoints) instead of replacing it")
    ap.add_argument("--out", default=None, help=f"results folder [default: {RESULTS}; smoke: cache/smoke/results]")
    ap.add_argument("--cache", default=None, help="checkpoint cache [default: benchmarks/quality/cache]")
    ap.add_argument("--cli", choices=("inproc", "subprocess"), default="inproc",
                    help="run dppa-stream through its click entry point in this process, or as the installed executable")
    ap.add_argument("--no-eval-server", action="store_true",
                    help="search --eval-cmd processes evaluate on their own (imports torch each time; slow)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="seeds run in this many worker processes at once [default: 2, one per core]")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process [default: 1: two-thread OpenMP collapses on a busy machine]")
    ap.add_argument("--rates", default=None, help=argparse.SUPPRESS)  # Table 1 rates (worker use)
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)  # write one seed's result here
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    plan = X.smoke_plan() if args.smoke else X.Plan()
    if args.strategies:
        plan = dataclasses.replace(plan, strategies=tuple(args.strategies.split(",")))
    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")]
    sweep_rates = tuple(float(r) for r in args.sweep_rates.split(",")) if args.sweep_rates else None
    cache = args.cache or (os.path.join(M.CACHE_DIR, "smoke") if args.smoke else M.CACHE_DIR)
    out = args.out or (os.path.join(cache, "results") if args.smoke else RESULTS)
    os.makedirs(out, exist_ok=True)
    log = (lambda *a: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.jobs > 1 and len(seeds) > 1 and not args.worker_json:
        return _parallel(args, plan, seeds, sweep_rates, cache, out, log)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from .evaluate import SOCKET_ENV, EvalServer, Evaluator

    evaluator = Evaluator(plan.n_val, plan.n_test)
    tmp = tempfile.mkdtemp(prefix="dppa-quality-")
    server = None
    if args.no_eval_server:
        os.environ.pop(SOCKET_ENV, None)
    else:
        server = EvalServer(evaluator, os.path.join(tmp, "eval.sock"))
        os.environ[SOCKET_ENV] = server.path
    cli = X.Cli(args.cli)
    work = os.path.join(tmp, "work")
    t0, c0 = time.perf_counter(), cpu_seconds()
    results = {"plan": plan.to_json(), "seeds": [], "smoke": args.smoke}
    try:
        for i, seed in enumerate(seeds):
            log(f"== seed {seed}")
            rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else (
                sweep_rates if i and sweep_rates else None)
            run = X.SeedRun(plan, seed, evaluator, cli, work, cache, log, rates=rates)
            results["seeds"].append(run.run(tuple(args.tables.split(","))))
            if args.worker_json:
                results["seeds"][-1]["timing"]["cli_calls"] = cli.calls
                results["seeds"][-1]["timing"]["cli_seconds"] = round(cli.seconds, 1)
                with open(args.worker_json, "w") as f:
                    json.dump(results["seeds"][-1], f)
                return 0
            _write(results, out, t0, c0, cli.calls, cli.seconds, args, final=False)
    finally:
        if server:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    _write(results, out, t0, c0, cli.calls, cli.seconds, args, final=True)
    log(f"done in {time.perf_counter() - t0:.0f}s wall ({cpu_seconds() - c0:.0f}s CPU); results in {out}")
    return 0


def _parallel(args, plan, seeds, sweep_rates, cache, out, log) -> int:
    """Each seed in its own worker process (`--jobs` at a time); their results are assembled here."""
    import subprocess

    t0, c0 = time.perf_counter(), cpu_seconds()
    tmp = tempfile.mkdtemp(prefix="dppa-quality-jobs-")
    pending = list(enumerate(seeds))
    running = []
    results = {"plan": plan.to_json(), "seeds": [None] * len(seeds), "smoke": args.smoke}
    cli_calls = cli_seconds = 0
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                i, seed = pending.pop(0)
                path = os.path.join(tmp, f"seed{seed}.json")
                cmd = [sys.executable, "-m", "benchmarks.quality.run", "--seeds", str(seed), "--worker-json", path,
                       "--cache", cache, "--out", out, "--tables", args.tables, "--cli", args.cli,
                       "--threads", str(args.threads), "--jobs", "1"]
                rates = sweep_rates if i and sweep_rates else None
                if rates:
                    cmd += ["--rates", ",".join(f"{r:g}" for r in rates)]
                if args.strategies:
                    cmd += ["--strategies", args.strategies]
                for flag in ("smoke", "no_eval_server", "quiet"):
                    if getattr(args, flag):
                        cmd.append("--" + flag.replace("_", "-"))
                log(f"== seed {seed} (worker process)")
                running.append((i, seed, path, subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(HERE)))))
            time.sleep(0.5)
            for item in list(running):
                i, seed, path, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed} failed (exit {proc.returncode})")
                with open(path) as f:
                    results["seeds"][i] = json.load(f)
                cli_calls += results["seeds"][i]["timing"].get("cli_calls", 0)
                cli_seconds += results["seeds"][i]["timing"].get("cli_seconds", 0)
    finally:
        for _, _, _, proc in running:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    _write(results, out, t0, c0, cli_calls, cli_seconds, args, final=True)
    log(f"done in {time.perf_counter() - t0:.0f}s wall ({cpu_seconds() - c0:.0f}s CPU); results in {out}")
    return 0


def _write(results, out, t0, c0, cli_calls, cli_seconds, args, final: bool):
    import torch

    if args.extend and not final:
        return  # the earlier table is only touched once, by the merged result

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    results["timing"] = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
                         "cli_calls": cli_calls, "cli_seconds": round(cli_seconds, 1), "cli_mode": args.cli,
                         "jobs": args.jobs, "loadavg_at_end": load}
    results["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cpus": os.cpu_count(), "torch_threads": args.threads,
                              "command": " ".join(["python -m benchmarks.quality.run"] + sys.argv[1:])}
    tables = set(args.tables.split(","))
    main_tables = bool(tables & {"table1", "table2"})
    if final and args.extend and not main_tables:
        results = _extended(os.path.join(out, "search.json"), results)
    if main_tables:
        results["summary"] = report.aggregate(results)
    # the search comparison alone (--tables search) goes to search.json, leaving quality.json alone
    with open(os.path.join(out, "quality.json" if main_tables else "search.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not final:
        return
    if main_tables:
        md = report.markdown(results)
        with open(os.path.join(out, "tables.md"), "w") as f:
            f.write(md + "\n")
        if results["seeds"] and results["seeds"][0].get("table1"):
            report.plot(results, os.path.join(out, "retention.png"))
    if "search" in tables:
        with open(os.path.join(out, "search.md"), "w") as f:
            f.write(report.search_markdown(results) + "\n")
    if not args.smoke and os.path.abspath(out) == RESULTS:
        if main_tables:
            report.write_readme_block(results, README)
        if "search" in tables:
            report.write_readme_block(results, README, search=True)


def _extended(path: str, new: dict) -> dict:
    """An earlier search table with the new strategies' rows added, seed by seed."""
    with open(path) as f:
        old = json.load(f)
    if [s["seed"] for s in old["seeds"]] != [s["seed"] for s in new["seeds"]]:
        raise SystemExit(f"{path}: has seeds {[s['seed'] for s in old['seeds']]}; --extend needs the same seeds")
    for a, b in zip(old["seeds"], new["seeds"]):
        if a["checkpoints"] != b["checkpoints"]:
            raise SystemExit(f"{path}: seed {a['seed']} was measured on other checkpoints; rerun without --extend")
        a["search"] += [r for r in b["search"] if r["strategy"] not in old["plan"]["strategies"]]
    old["plan"]["strategies"] = list(old["plan"]["strategies"]) + [
        x for x in new["plan"]["strategies"] if x not in old["plan"]["strategies"]]
    old.setdefault("extensions", []).append({"timing": new["timing"], "command": new["environment"]["command"]})
    return old


if __name__ == "__main__":
    sys.exit(main())
