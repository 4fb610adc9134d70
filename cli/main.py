"""The `dppa-stream` command line: a thin layer over the library.

Errors the user can fix print one line and exit with their kind's code (2 usage, 3 input,
4 output); anything else is a bug (exit 1). `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from dppa_stream import __version__
from dppa_stream.errors import EXIT_INTERNAL, DppaError

_SCHED_HELP = "threads (default), threads:N, processes:N (a local Dask cluster) or tcp://HOST:PORT (an existing cluster)"


def _run(debug: bool, fn):
    # A file-size limit (ulimit -f) must surface as a write error (EFBIG), not kill us silently.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return fn()
    except DppaError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug: say so, briefly
        if debug:
            raise
        click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


def _size(value, option: str):
    """Sizes are parsed inside the run so a bad one is a one-line usage error like the others."""
    from dppa_stream.config import parse_size

    return None if value is None else parse_size(value, option)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dppa-stream")
def main():
    """Merge fine-tuned LLM checkpoints out of core: DPPA, TIES, DARE, task arithmetic."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--memory-limit", help="Memory budget for the whole run, e.g. 4GiB [default: half the available memory].")
@click.option("--scheduler", default=None, help=_SCHED_HELP)
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Connect to the Dask scheduler described in this file.")
@click.option("--shard-size", default="5GB", show_default=True, help="Max bytes per output shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods (DARE).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (once the new output is complete) or a stale OUT.partial.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same config and inputs from OUT.partial.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs containing NaN/Inf instead of refusing them.")
@click.option("--unit-size", help="Memory per work unit (rows of every input, plus float32 deltas where needed) "
              "[default: 64MiB, lowered to fit --memory-limit]. Larger units mean fewer reads for ties/magnitude.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary line.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the run summary as JSON to this file ('-' for stdout).")
@click.option("--verbose", "-v", count=True, help="Log the plan and passes (-vv: also Dask's logs).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def merge(config, out, memory_limit, scheduler, scheduler_file, shard_size, seed, overwrite, resume, allow_nonfinite,
          unit_size, quiet, json_out, verbose, debug):
    """Merge the models named in CONFIG (mergekit-style YAML) into the folder OUT.

    OUT appears only when complete; until then work goes to OUT.partial, which --resume continues."""

    _logging(verbose)

    def go():
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions, merge as run_merge

        opts = MergeOptions(_size(memory_limit, "--memory-limit"), scheduler, scheduler_file,
                            _size(shard_size, "--shard-size"), seed, overwrite, quiet,
                            _size(unit_size, "--unit-size"), resume, allow_nonfinite)
        res = run_merge(load_config(config), out, opts)
        _report(res, quiet, json_out)

    _run(debug, go)


def _logging(verbose: int) -> None:
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("dppa_stream").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        if verbose > 1:
            from dppa_stream import executor

            executor.DASK_LOGS = True


def _report(res, quiet, json_out):
    if not quiet:
        click.echo(res.summary_line(), err=True)
    if json_out:
        text = json.dumps(res.to_json(), indent=2)
        if json_out == "-":
            click.echo(text)
        else:
            with open(json_out, "w") as f:
                f.write(text + "\n")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all statistics as JSON ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of outlier ratios and densities across layers.")
@click.option("--memory-limit", help="Memory budget, e.g. 4GiB [default: half the available memory].")
@click.option("--scheduler", default=None, help=_SCHED_HELP)
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Connect to the Dask scheduler described in this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or table.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def stats(config, json_out, plot, memory_limit, scheduler, scheduler_file, quiet, debug):
    """Run pass 1 of a dp/dppa CONFIG and report DP statistics: outlier ratios, densities, thresholds."""

    def go():
        from dppa_stream import stats_report
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions

        res = stats_report.collect_stats(load_config(config), MergeOptions(_size(memory_limit, "--memory-limit"),
                                                                           scheduler, scheduler_file, quiet=quiet))
        if not quiet:
            click.echo(stats_report.table(res))
            click.echo(f"pass 1 read {res.bytes_read / 1e9:.2f} GB in {res.wall_seconds:.1f}s; "
                       f"peak memory {res.peak_anon_bytes / 2**20:.0f} MiB", err=True)
        if json_out:
            stats_report.write_json(res, json_out)
        if plot:
            stats_report.plot(res, plot)

    _run(debug, go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--eval-cmd", "eval_cmds", multiple=True, required=True,
              help="Command scoring a model folder, with {model} in it; its last printed number is the score. Repeatable.")
@click.option("--dense-score", "dense", type=float, multiple=True,
              help="Reference score per --eval-cmd (e.g. the dense fine-tune's): each score is divided by it before "
                   "the scores are combined.")
@click.option("--strategy", type=click.Choice(["tpe", "reference"]), default="tpe", show_default=True,
              help="tpe: each fine-tune's own factors, searched up and down in [0, --max-factor] by optuna's seeded "
                   "TPE sampler; reference: the authors' greedy walk (one shared vector, +--step moves only).")
@click.option("--objective", type=click.Choice(["mean", "geomean", "min"]), default="geomean", show_default=True,
              help="How several scores (each / its --dense-score) combine. geomean floors each ratio at 0.01, so one "
                   "task scoring 0 does not zero it. With one --eval-cmd all three are the score.")
@click.option("--min-gain", type=float, default=None,
              help="Noise margin: a candidate replaces the best so far only if it beats it by more than this (objective "
                   "units); if none beats the start, the start is kept [default: 0.01 for tpe, 0 for reference].")
@click.option("--max-evals", type=int, default=100, show_default=True, help="Budget: at most this many evaluations.")
@click.option("--start", help="Starting factors: one vector for every fine-tune ('1.8,0.0') or one per fine-tune "
              "('1.8,0.0;1.5,0.5') [default: the config's amplification].")
@click.option("--step", type=float, default=0.1, show_default=True,
              help="Step of the reference walk; grid of the factors tpe tries.")
@click.option("--max-factor", type=float, default=4.0, show_default=True, help="Upper bound of every factor (tpe).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the optimiser (tpe).")
@click.option("--resume", is_flag=True, help="Reuse the evaluations logged in OUT.search/search_log.jsonl by an "
              "interrupted search (none is run again) and continue to --max-evals.")
@click.option("--memory-limit", help="Memory budget, e.g. 4GiB [default: half the available memory].")
@click.option("--scheduler", default=None, help=_SCHED_HELP)
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Connect to the Dask scheduler described in this file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No per-evaluation lines or final report.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def search(config, out, eval_cmds, dense, strategy, objective, min_gain, max_evals, start, step, max_factor, seed,
           resume, memory_limit, scheduler, scheduler_file, overwrite, quiet, debug):
    """Search the DPA amplification factors of a dppa CONFIG on validation scores; keep the best model in OUT.

    Pass 1 runs once (statistics in OUT.search/stats.zarr); each candidate costs one pass 2 and one run of
    every --eval-cmd. Every evaluation is logged in OUT.search/search_log.jsonl; the final report (stderr,
    OUT/search_log.json, OUT/search_log.md) gives the start and best factors and scores, what changed per
    model, and says when no candidate beat the start by more than --min-gain (then the start is kept).

    Score on a validation split, not on the test set you report (the reference tuned on test data)."""

    def go():
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions
        from dppa_stream.search import parse_start, search as run_search

        start_m = parse_start(start)
        opts = MergeOptions(_size(memory_limit, "--memory-limit"), scheduler, scheduler_file, seed=seed,
                            overwrite=overwrite, quiet=True)
        res = run_search(load_config(config), out, list(eval_cmds), opts, start_m, step, list(dense) or None,
                         max_evals, echo=(lambda *a: None) if quiet else (lambda m: click.echo(m, err=True)),
                         strategy=strategy, objective=objective, min_gain=min_gain, max_factor=max_factor,
                         resume=resume)
        if not quiet:
            click.echo(res.report(), err=True)

    _run(debug, go)


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="demo-out")
@click.option("--method", default="dppa", show_default=True, help="Merge method to demonstrate.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/merged.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--debug", is_flag=True)
def demo(out, method, overwrite, quiet, debug):
    """Generate a small Llama-shaped base and two fine-tunes under OUT, then merge them into OUT/merged."""

    def go():
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions, merge as run_merge
        from dppa_stream.synthetic import write_llama_set

        inputs = os.path.join(out, "inputs")
        if not os.path.isdir(os.path.join(inputs, "ft2")):
            if not quiet:
                click.echo(f"writing demo checkpoints to {inputs}", err=True)
            write_llama_set(inputs)
        cfg_path = os.path.join(out, f"{method}.yml")
        with open(cfg_path, "w") as f:
            f.write(_demo_config(method, inputs))
        cfg = load_config(cfg_path)
        res = run_merge(cfg, os.path.join(out, "merged"), MergeOptions(overwrite=overwrite, quiet=quiet))
        _report(res, quiet, None)
        if cfg.merge_method in ("dp", "dppa"):
            from dppa_stream import stats_report

            st = stats_report.collect_stats(cfg, MergeOptions(quiet=True))
            stats_report.plot(st, os.path.join(out, "dppa-stats.png"))
            stats_report.write_json(st, os.path.join(out, "dppa-stats.json"))
            if not quiet:
                click.echo(f"DP statistics: {out}/dppa-stats.png, {out}/dppa-stats.json", err=True)
        if not quiet:
            click.echo(f"config: {cfg_path}; merged model: {out}/merged", err=True)

    _run(debug, go)


def _demo_config(method: str, inputs: str) -> str:
    from dppa_stream.methods import METHODS
    from dppa_stream.errors import UsageError

    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    params = METHODS[method].model_params
    lines = [f"merge_method: {method}", f"base_model: {inputs}/base", "models:"]
    for k in (1, 2):
        lines.append(f"  - model: {inputs}/ft{k}")
        p = []
        if "weight" in params:
            p.append("weight: 0.5")
        if "density" in params:
            p.append("density: 0.2")
        if "amplification" in params:
            p.append("amplification: [1.8, 1.0]")
        if p:
            lines.append(f"    parameters: {{{', '.join(p)}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
