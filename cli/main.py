"""The `dppa-stream` command line: a thin layer over the library.

Errors the user can fix print one line and exit with their kind's code (2 usage, 3 input,
4 output); anything else is a bug (exit 1). `--debug` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import time
import warnings

# numpy's OpenBLAS starts a spinning thread per core when imported (~2 % of a merge's CPU); nothing
# here multiplies more than K x K matrices, so one thread, set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

from dppa_stream import __version__
from dppa_stream.errors import EXIT_INTERNAL, EXIT_OUTPUT, EXIT_USAGE, DppaError, OutputError, UsageError, printable

_SCHED_HELP = "threads (default), threads:N, processes:N (a local Dask cluster) or tcp://HOST:PORT (an existing cluster)"
EXIT_INTERRUPTED = 130
# errno values that mean "the output could not be written", wherever they escape from
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


STARTED = time.perf_counter()  # the command's clock: reported times include its imports
EXITS_AFTER = False  # set by `entry`: the process ends with the command (not a test calling `main`)


def _fail(message: str, code: int) -> None:
    """The last line of defence: whatever the message holds, the user sees exactly one line."""
    click.echo(printable(message, 4000), err=True)
    sys.exit(code)


def _interrupt(*_):
    raise KeyboardInterrupt


def _resume_hint(out: str | None, interrupted: bool = False) -> str:
    """How to continue after an interruption or a write failure of `merge OUT`: --resume when
    OUT.partial holds a run to continue; otherwise nothing was kept (and for a failure, the
    message itself says what to fix)."""
    partial = os.path.abspath(out) + ".partial" if out else None
    if partial and os.path.isfile(os.path.join(partial, ".dppa-stream", "run.json")):
        return f"; the finished work is kept in {partial}: rerun the same command with --resume to continue"
    return "; nothing was kept: rerun the command" if interrupted else ""


def _run(debug: bool, fn, out: str | None = None):
    """Run a command: DppaError -> one line and its exit code; Ctrl-C or SIGTERM -> one line saying
    how to resume, exit 130; a full disk anywhere -> exit 4; anything else is a bug (exit 1)."""
    handlers = {}
    for sig, handler in ((getattr(signal, "SIGXFSZ", None), signal.SIG_IGN), (signal.SIGTERM, _interrupt)):
        # SIGXFSZ: a file-size limit (ulimit -f) must surface as a write error (EFBIG), not kill us
        if sig is not None:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                handlers[sig] = signal.signal(sig, handler)
    try:
        return fn()
    except DppaError as e:
        if debug:
            raise
        msg = str(e)
        if e.exit_code == EXIT_OUTPUT and out is not None and "--resume" not in msg and "--overwrite" not in msg:
            msg += _resume_hint(out)
        _fail(f"error: {msg}", e.exit_code)
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError):  # a second Ctrl-C while shutting down must not cut the message short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # the signal may have landed between a library making a coroutine and running it (zarr's
        # synchronous calls): freeing it later would print a "never awaited" warning after our line
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        _fail("interrupted" + _resume_hint(out, interrupted=True), EXIT_INTERRUPTED)
    except OSError as e:
        if debug:
            raise
        if e.errno in _WRITE_ERRNOS:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"error: {where}write failed ({e.strerror}){_resume_hint(out) if out is not None else ''}", EXIT_OUTPUT)
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", EXIT_INTERNAL)
    except Exception as e:  # a bug: say so, briefly
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", EXIT_INTERNAL)
    finally:
        for sig, old in handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)


def _size(value, option: str):
    """Sizes are parsed inside the run so a bad one is a one-line usage error like the others."""
    from dppa_stream.config import parse_size

    return None if value is None else parse_size(value, option)


def _out_file(path: str | None, option: str, suffixes: tuple = ()) -> None:
    """An output file named by an option (--json, --plot) must be writable before the run starts,
    not fail after it."""
    if path is None or path == "-":
        return
    if "\0" in path:
        raise UsageError(f"{option} {path}: not a valid file name")
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if os.path.lexists(full) and not os.path.isfile(full):
        raise UsageError(f"{option} {path}: exists and is not a regular file")
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if suffixes and ext and ext not in suffixes:
        raise UsageError(f"{option} {path}: unsupported file type {ext!r}; use one of {', '.join(suffixes)}")


def _not_an_input(cfg, *paths) -> None:
    """A report file (--json, --plot) must not overwrite an input or land inside a model folder."""
    from dppa_stream.checkpoint.reader import model_roots

    from dppa_stream.lora import split_key

    models = ([cfg.base_model] if cfg.base_model else []) + [m.path for m in cfg.models]
    models = [p for m in models for p in (split_key(m) or (m,))]  # BASE+ADAPTER: both folders
    for option, path in paths:
        if not path or path == "-":
            continue
        real = os.path.realpath(path)
        for m in models:
            roots = model_roots(m) if os.path.isdir(m) else (os.path.realpath(m),)
            if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                raise UsageError(f"{option} {path}: would write into the input {m}")


def _write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(f"{path}: write failed ({e.strerror})") from None


def _scheduler(scheduler, scheduler_file) -> None:
    """Check --scheduler / --scheduler-file before anything is read."""
    from dppa_stream.executor import SchedulerSpec

    SchedulerSpec.parse(scheduler, scheduler_file)


def _finite(value: float, option: str, positive: bool = False) -> None:
    if not math.isfinite(value) or (positive and value <= 0) or value < 0:
        raise UsageError(f"{option} {value}: must be a finite {'positive' if positive else 'non-negative'} number")


class _Group(click.Group):
    """Click's own usage errors (unknown option, missing argument) also print one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(f"error: {e.format_message()}{see}", EXIT_USAGE)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
@click.option("--download", is_flag=True, help="Fetch Hub models (ORG/NAME) missing from the Hugging Face cache "
              "(only safetensors, config and tokenizer files; the set is checked from its headers first).")
@click.option("--unit-size", help="Memory per work unit: the values of every input plus the output, for many small "
              "tensors or a piece of a large one [default: 64MiB, lowered to fit --memory-limit]. Larger units mean "
              "fewer reads for ties/magnitude.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary line.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the run summary as JSON to this file ('-' for stdout).")
@click.option("--verbose", "-v", count=True, help="Log the plan and passes (-vv: also Dask's logs).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def merge(config, out, memory_limit, scheduler, scheduler_file, shard_size, seed, overwrite, resume, allow_nonfinite,
          download, unit_size, quiet, json_out, verbose, debug):
    """Merge the models named in CONFIG (mergekit-style YAML) into the folder OUT.

    OUT appears only when complete; until then work goes to OUT.partial, which --resume continues."""

    _logging(verbose)

    def go():
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions, merge as run_merge

        if not -(2**63) <= seed < 2**63:
            raise UsageError(f"--seed {seed}: must fit in 64 bits")
        opts = MergeOptions(_size(memory_limit, "--memory-limit"), scheduler, scheduler_file,
                            _size(shard_size, "--shard-size"), seed, overwrite, quiet,
                            _size(unit_size, "--unit-size"), resume, allow_nonfinite, download, started=STARTED,
                            progress=_bar(quiet), dask_logs=verbose > 1, exiting=EXITS_AFTER)
        _scheduler(scheduler, scheduler_file)
        if not out.strip():
            raise UsageError("OUT is empty; give the folder to create")
        _out_file(json_out, "--json")
        cfg = load_config(config)
        _not_an_input(cfg, ("--json", json_out))
        res = run_merge(cfg, out, opts)
        _report(res, quiet, json_out)

    _run(debug, go, out)


def _logging(verbose: int) -> None:
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("dppa_stream").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _bar(quiet: bool):
    """The progress bar the library calls per phase (`executor.Progress`): bytes done, ETA and
    MB/s on stderr; none when quiet or not a terminal (-v logs each phase's size and speed)."""
    if quiet or not sys.stderr.isatty():
        return None

    @contextlib.contextmanager
    def bar(label: str, total: int):
        t0, done = time.perf_counter(), [0]

        def rate(_):
            dt = time.perf_counter() - t0
            return f"{done[0] / dt / 1e6:7.0f} MB/s" if dt > 0 else ""

        with click.progressbar(length=max(total, 1), label=f"{label:<10}", show_eta=True, show_percent=True,
                               item_show_func=rate, file=sys.stderr) as b:
            def update(n):
                done[0] += n
                b.update(n, done[0])

            yield update

    return bar


def _report(res, quiet, json_out):
    if not quiet:
        for line in res.summary_line().splitlines():  # printable() escapes a newline: one echo per line
            click.echo(printable(line), err=True)
    _write_json(json_out, res.to_json())


def _write_json(path: str | None, obj) -> None:
    """--json: the summary to stdout ('-') or to the file."""
    if not path:
        return
    text = json.dumps(obj, indent=2)
    if path == "-":
        click.echo(text)
    else:
        _write_text(path, text + "\n")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all statistics as JSON ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of outlier ratios and densities across blocks.")
@click.option("--experts", type=click.Choice(["auto", "each", "summary"]), default="auto", show_default=True,
              metavar="MODE",
              help="Table rows for MoE experts: auto, each (a row per expert) or summary (a row per expert tensor "
              "and block: medians and the density range); auto is each up to 4 experts, summary above.")
@click.option("--memory-limit", help="Memory budget, e.g. 4GiB [default: half the available memory].")
@click.option("--scheduler", default=None, help=_SCHED_HELP)
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Connect to the Dask scheduler described in this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or table.")
@click.option("--download", is_flag=True, help="Fetch Hub models (ORG/NAME) missing from the Hugging Face cache "
              "(only safetensors, config and tokenizer files; the set is checked from its headers first).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def stats(config, json_out, plot, experts, memory_limit, scheduler, scheduler_file, quiet, download, debug):
    """Run pass 1 of a dp/dppa CONFIG and report DP statistics: outlier ratios, densities, thresholds.

    The table has a section per fine-tune and per stack of blocks; --json has every stack, block and linear;
    --plot draws, per stack, the block signal, the linear outlier ratios and the densities across the blocks,
    coloured by linear kind."""

    def go():
        from dppa_stream import stats_report
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions

        opts = MergeOptions(_size(memory_limit, "--memory-limit"), scheduler, scheduler_file, quiet=quiet, download=download,
                            progress=_bar(quiet))
        _scheduler(scheduler, scheduler_file)
        _out_file(json_out, "--json")
        _out_file(plot, "--plot", ("png", "pdf", "svg"))
        cfg = load_config(config)
        _not_an_input(cfg, ("--json", json_out), ("--plot", plot))
        res = stats_report.collect_stats(cfg, opts)
        if not quiet:
            click.echo(stats_report.table(res, experts))
            click.echo(f"pass 1 read {res.bytes_read / 1e9:.2f} GB in {res.wall_seconds:.1f}s; "
                       f"peak memory {res.peak_anon_bytes / 2**20:.0f} MiB", err=True)
        for path, write in ((json_out, stats_report.write_json), (plot, stats_report.plot)):
            if path:
                try:
                    write(res, path)
                except OSError as e:
                    raise OutputError(f"{path}: write failed ({e.strerror})") from None

    _run(debug, go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--eval-cmd", "eval_cmds", multiple=True, required=True,
              help="Command scoring a model folder, with {model} in it; its last printed number is the score. Repeatable.")
@click.option("--dense-score", "dense", type=float, multiple=True,
              help="Reference score per --eval-cmd (e.g. the dense fine-tune's): each score is divided by it before "
                   "the scores are combined.")
@click.option("--tune", default="factors", show_default=True,
              help="What to search, comma-separated: factors (DPA's, per fine-tune, as the effective factor of each "
                   "partition), rates (DP's pruning rates, 0.05 grid), lamda (0.01 grid), weight (per fine-tune, 0.05 "
                   "grid; not with factors under combine sum or mean, where it only scales them).")
@click.option("--strategy", type=click.Choice(["refine", "reference", "tpe", "cmaes"]), default="refine",
              show_default=True,
              help="refine: the reference walk, then a compass search (every tuned value up and down, per fine-tune); "
                   "reference: the authors' greedy walk (one shared factor vector, +--step moves only); tpe / cmaes: "
                   "optuna's seeded samplers.")
@click.option("--objective", type=click.Choice(["mean", "geomean", "min"]), default="geomean", show_default=True,
              help="How several scores (each / its --dense-score) combine. geomean: a score below 1 % of its dense "
                   "score (0 included) counts as 1 %; mean: a 0 counts as 0; min: a 0 makes the objective 0. With "
                   "one --eval-cmd all three are the score.")
@click.option("--min-gain", type=float, default=None,
              help="Noise margin in score units: a candidate replaces the best so far only if it beats it with every "
                   "score of the best raised by this much; if none beats the start, the start is kept "
                   "[default: 0 for refine and reference, 0.01 for tpe and cmaes].")
@click.option("--max-evals", type=int, default=100, show_default=True,
              help="Budget: at most this many models merged and evaluated (a proposal that is a model already "
                   "evaluated is answered from memory and costs nothing).")
@click.option("--start", help="Starting factors: one vector for every fine-tune ('1.8,0.0') or one per fine-tune "
              "('1.8,0.0;1.5,0.5') [default: the config's amplification].")
@click.option("--step", type=float, default=0.1, show_default=True, help="Grid step of the factors.")
@click.option("--max-factor", type=float, default=4.0, show_default=True, help="Upper bound of every factor.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the optimiser (tpe, cmaes).")
@click.option("--resume", is_flag=True, help="Replay the evaluations logged by an interrupted search "
              "(OUT.search) or a finished one (OUT/search_log.jsonl; OUT is then replaced by the new kept model); "
              "none is run again, and the search continues to --max-evals.")
@click.option("--memory-limit", help="Memory budget, e.g. 4GiB [default: half the available memory].")
@click.option("--scheduler", default=None, help=_SCHED_HELP)
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Connect to the Dask scheduler described in this file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No per-evaluation lines or final report.")
@click.option("--download", is_flag=True, help="Fetch Hub models (ORG/NAME) missing from the Hugging Face cache "
              "(only safetensors, config and tokenizer files; the set is checked from its headers first).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def search(config, out, eval_cmds, dense, tune, strategy, objective, min_gain, max_evals, start, step, max_factor,
           seed, resume, memory_limit, scheduler, scheduler_file, overwrite, quiet, download, debug):
    """Search the DPA factors (and optionally rates, lamda, weights) of a dppa CONFIG on validation scores; keep
    the best model in OUT.

    Pass 1 runs once (statistics in OUT.search/stats.zarr); each candidate is planned from them and costs one
    pass 2 and one run of every --eval-cmd. No model is merged or evaluated twice. Every evaluation is logged
    in OUT.search/search_log.jsonl; the final report (stderr, OUT/search_log.json, OUT/search_log.md) gives the
    start and kept settings and scores, what changed per model, what an evaluation cost, and ends with the
    command that merges the kept settings (OUT/dppa_stream_config.yml) again.

    Score on a validation split, not on the test set you report (the reference tuned on test data)."""

    def go():
        from dppa_stream.config import load_config
        from dppa_stream.pipeline import MergeOptions
        from dppa_stream.search import parse_start, search as run_search

        start_m = parse_start(start)
        for x in dense:
            _finite(x, "--dense-score", positive=True)
        _finite(step, "--step", positive=True)
        if max_evals < 1:
            raise UsageError(f"--max-evals {max_evals}: must be at least 1")
        opts = MergeOptions(_size(memory_limit, "--memory-limit"), scheduler, scheduler_file, seed=seed,
                            overwrite=overwrite, quiet=True, download=download)
        _scheduler(scheduler, scheduler_file)
        res = run_search(load_config(config), out, list(eval_cmds), opts, start_m, step, list(dense) or None,
                         max_evals, echo=(lambda *a: None) if quiet else (lambda m: click.echo(m, err=True)),
                         strategy=strategy, objective=objective, min_gain=min_gain, max_factor=max_factor,
                         resume=resume, tune=tune)
        if not quiet:
            click.echo(res.report(), err=True)

    _run(debug, go)


@main.command("extract-lora")
@click.argument("finetuned")
@click.argument("base")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rank", "--max-rank", "rank", type=int, default=128, show_default=True,
              help="Maximum rank of every module's adapter.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True,
              help="Keep only singular values above this (a module's rank may then be lower).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction (0-1] of the "
              "delta's energy (squared Frobenius norm), at most --rank.")
@click.option("--embeddings/--no-embeddings", "--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="LoRA on the embeddings and output head (else they are saved whole, as mergekit does).")
@click.option("--save-module", "save_modules", multiple=True, help="Save this module whole (modules_to_save); repeatable.")
@click.option("--skip-undecomposable", is_flag=True, help="Drop changed tensors a LoRA cannot hold (norms, biases) "
              "instead of saving them whole.")
@click.option("--exact-below", type=int, default=1 << 22, show_default=True,
              help="Tensors of at most this many elements get an exact SVD; bigger ones a randomized one in row passes.")
@click.option("--power-iters", type=int, default=2, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the adapter's factors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD's test matrices.")
@click.option("--memory-limit", help="Memory budget, e.g. 4GiB [default: half the available memory].")
@click.option("--overwrite", is_flag=True, help="Replace OUT (once the new adapter is complete).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the energy report as JSON ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the energy each tensor keeps.")
@click.option("--quiet", "-q", is_flag=True, help="No table.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def extract_lora(finetuned, base, out, rank, sv_epsilon, energy, embeddings, save_modules, skip_undecomposable,
                 exact_below, power_iters, dtype, seed, memory_limit, overwrite, json_out, plot, quiet, debug):
    """Extract a PEFT LoRA adapter that turns BASE into FINETUNED, into the folder OUT.

    Models are folders, cached Hub IDs or BASE+ADAPTER. Each changed 2-D weight gets a truncated SVD of
    its delta, in bounded memory; the energy each rank keeps is reported per tensor and overall."""

    def go():
        from dppa_stream.config import DTYPE_NAMES
        from dppa_stream.extract_lora import ExtractOptions, extract, plot as plot_energy

        if rank < 1:
            raise UsageError(f"--rank {rank}: must be at least 1")
        _finite(sv_epsilon, "--sv-epsilon")
        if sv_epsilon < 0:
            raise UsageError(f"--sv-epsilon {sv_epsilon}: must not be negative")
        if energy is not None and not (0 < energy <= 1):
            raise UsageError(f"--energy {energy}: must be in (0, 1]")
        if exact_below < 0 or power_iters < 0 or power_iters > 20:
            raise UsageError("--exact-below must not be negative and --power-iters must be 0..20")
        if not -(2**63) <= seed < 2**63:
            raise UsageError(f"--seed {seed}: must fit in 64 bits")
        if not out.strip():
            raise UsageError("OUT is empty; give the folder to create")
        _out_file(json_out, "--json")
        _out_file(plot, "--plot", ("png",))
        opts = ExtractOptions(rank, sv_epsilon, energy, embeddings, tuple(save_modules), skip_undecomposable,
                              _size(memory_limit, "--memory-limit"), exact_below, power_iters, seed=seed,
                              dtype=DTYPE_NAMES[dtype], overwrite=overwrite, quiet=quiet)
        res = extract(finetuned, base, out, opts)
        if not quiet:
            for line in res.table().splitlines():
                click.echo(printable(line), err=True)
        if plot:
            plot_energy(res, plot)
        _write_json(json_out, res.to_json())

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

        inputs = os.path.abspath(os.path.join(out, "inputs"))  # the config works from any folder
        if not os.path.isdir(os.path.join(inputs, "ft2")):
            if not quiet:
                click.echo(f"writing demo checkpoints to {inputs}", err=True)
            write_llama_set(inputs)
        cfg_path = os.path.join(out, f"{method}.yml")
        with open(cfg_path, "w") as f:
            f.write(_demo_config(method, inputs))
        cfg = load_config(cfg_path)
        res = run_merge(cfg, os.path.join(out, "merged"), MergeOptions(overwrite=overwrite, quiet=quiet, progress=_bar(quiet)))
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
    def path(name: str) -> str:  # a JSON string is a YAML string, whatever the path holds
        return json.dumps(os.path.join(inputs, name))

    lines = [f"merge_method: {method}", f"base_model: {path('base')}", "models:"]
    for k in (1, 2):
        lines.append(f"  - model: {path(f'ft{k}')}")
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


def entry() -> None:
    """The console script: the command, then a quick exit. Tearing the interpreter down (a garbage
    collection and module teardown over everything numpy, numba, zarr and Dask loaded) took ~0.4 s
    after every merge; by then every file is closed and synced, the scheduler shut down and the
    output published, so only the standard streams need flushing."""
    global EXITS_AFTER
    EXITS_AFTER = True
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
