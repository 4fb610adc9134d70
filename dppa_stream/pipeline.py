"""The merge, end to end: open and validate inputs, plan work units from the memory budget,
gather statistics (pass 1), let the method plan, merge and write (pass 2), then finalise.

Only small summaries and decisions cross from pass 1 to pass 2; tensor data never leaves the
task that read it. A tensor held in a single work unit gets its statistics inline, in pass 2,
from the rows the task already holds (same functions, one read less); tensors split over
several units get them from Dask passes with tree reductions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

from .checkpoint import FLOAT_DTYPES, ShardLayout
from .config import MergeConfig
from .errors import UsageError
from .executor import Executor, Progress, SchedulerSpec
from .hf_files import copy_model_files, write_model_card
from .inputs import Inputs, open_inputs, verify_unchanged
from .memory import PeakSampler, default_budget
from .output import (WORK_DIR, Manifest, check_output, fingerprint, prepare_partial, publish, release_reserve,
                     removed_on_bad_input, space_needed)
from .stats_store import StatsStore
from .tasks import Unit, UnitInputs, combine_summaries, merge_task, stats_task

log = logging.getLogger("dppa_stream")

DEFAULT_SHARD_SIZE = 5_000_000_000
PROCESS_BASELINE = 400 << 20  # python + torch + dask/distributed, per process (measured ~300 MiB)
TASK_OVERHEAD = 48 << 20  # float32 temporaries of one 256K-element sub-chunk per running task
MAX_UNIT_BYTES = 64 << 20  # default unit cap: small tasks balance load and keep memory low


@dataclass
class MergeOptions:
    memory_limit: int | None = None  # bytes for the whole run; default: half the available memory
    scheduler: str | None = None  # threads | threads:N | processes:N | tcp://HOST:PORT
    scheduler_file: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False
    unit_bytes: int | None = None  # unit size instead of the 64 MiB default (still bounded by the memory limit)
    resume: bool = False  # continue an interrupted run found at OUT.partial
    allow_nonfinite: bool = False  # merge inputs that contain NaN/Inf instead of refusing them


@dataclass
class MergeResult:
    out: str
    method: str
    wall_seconds: float
    bytes_read: int
    bytes_written: int
    peak_anon_bytes: int
    tensors: int
    units: int
    split_tensors: int
    scheduler: str
    memory_limit: int
    resumed_units: int = 0

    def summary_line(self) -> str:
        resumed = f" (resumed: {self.resumed_units} units were already done)" if self.resumed_units else ""
        return (
            f"merged {self.tensors} tensors ({self.units} work units) into {self.out} in {self.wall_seconds:.1f}s: "
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB "
            f"({self.bytes_read / max(self.wall_seconds, 1e-9) / 1e6:.0f} MB/s read), "
            f"peak memory {self.peak_anon_bytes / 2**20:.0f} MiB (anonymous, process tree){resumed}"
        )

    def to_json(self) -> dict:
        return asdict(self)


def plan_units(inputs: Inputs, unit_bytes: int, method=None) -> dict[str, list[Unit]]:
    """Split every tensor into row ranges whose memory (raw rows of every input, plus the float32
    deltas a unit keeps when its method decides inline) fits `unit_bytes`."""
    rows = {}
    k = len(inputs.models)
    for name in inputs.names:
        e = inputs.reference.tensors[name]
        per_elem = e.itemsize * (k + (1 if inputs.base else 0))
        if method is not None and e.dtype in FLOAT_DTYPES and any(method.sparsifier(i, name).needs_summary for i in range(k)):
            per_elem += 4 * k
        rows[name] = max(1, unit_bytes // max(1, e.row_numel * per_elem))
    return units_from_plan(inputs, rows)


def units_from_plan(inputs: Inputs, rows_per_unit: dict[str, int]) -> dict[str, list[Unit]]:
    units = {}
    for name in inputs.names:
        e = inputs.reference.tensors[name]
        step = rows_per_unit[name]
        starts = list(range(0, e.rows, step)) or [0]
        units[name] = [Unit(name, i, s, min(e.rows, s + step), e.row_numel) for i, s in enumerate(starts)]
    return units


def unit_budget(memory_limit: int, workers: int, processes: int) -> int:
    """Input bytes per unit such that `workers` concurrent tasks fit the memory limit."""
    free = memory_limit - PROCESS_BASELINE * processes - TASK_OVERHEAD * workers
    per_task = free // max(1, workers)
    if per_task < (4 << 20):
        need = PROCESS_BASELINE * processes + (TASK_OVERHEAD + (4 << 20)) * workers
        raise UsageError(
            f"--memory-limit {memory_limit / 2**20:.0f} MiB is too small for {workers} worker(s); "
            f"need at least {need / 2**20:.0f} MiB (or use fewer workers)"
        )
    return per_task


class StatsEngine:
    """Runs statistics rounds (pass 1) over work units on the executor; with a store, results
    are persisted and never recomputed (resume, factor search)."""

    def __init__(self, executor: Executor, inputs: Inputs, units: dict[str, list[Unit]], method, progress: Progress,
                 store: StatsStore | None = None, check_finite: bool = True):
        self.ex, self.inputs, self.units, self.method, self.progress = executor, inputs, units, method, progress
        self.store, self.check_finite = store, check_finite
        self.bytes_read = 0

    def summaries(self, wanted: dict[str, list[int]], label: str = "pass 1") -> dict[str, dict]:
        """tensor -> {model index: Summary} over every unit of each wanted tensor."""
        found: dict[str, dict] = {}
        missing: dict[str, list[int]] = {}
        for t, models in wanted.items():
            for i in models:
                got = self.store.get_summary(i, t) if self.store else None
                if got is None:
                    missing.setdefault(t, []).append(i)
                else:
                    found.setdefault(t, {})[i] = got
        calls, sizes, groups = [], [], []
        method = self.ex.share(self.method) if missing else None
        for t, models in missing.items():
            for u in self.units[t]:
                inp = UnitInputs(u, *self.inputs.entries(t))
                calls.append((method, inp, {i: None for i in models}, self.check_finite))
                sizes.append(inp.nbytes)
                groups.append(t)
        if calls:
            self.bytes_read += sum(sizes)
            with self.progress.phase(label, sum(sizes)) as step:
                computed = self.ex.map_reduce(stats_task, calls, sizes, groups, combine_summaries, step)
            for t, per_model in computed.items():
                for i, summ in per_model.items():
                    found.setdefault(t, {})[i] = summ.compact()
            if self.store:
                self.store.put_summaries({(i, t): sm for t, pm in computed.items() for i, sm in pm.items()})
        return found

    def details(self, buckets: dict[tuple[str, int], tuple], label: str = "refine") -> dict[tuple[str, int], list]:
        """(tensor, model) -> per unit, per requested bin, (values, counts) of the low 16 bits of the
        |delta| inside that histogram bin."""
        out: dict[tuple[str, int], list] = {}
        by_tensor: dict[str, dict[int, tuple]] = {}
        for (t, i), b in buckets.items():
            got = self.store.get_details(i, t, b) if self.store else None
            if got is None:
                by_tensor.setdefault(t, {})[i] = b
            else:
                out[(t, i)] = got
        calls, sizes, keys = [], [], []
        method = self.ex.share(self.method) if by_tensor else None
        for t, req in by_tensor.items():
            for u in self.units[t]:
                inp = UnitInputs(u, *self.inputs.entries(t))
                calls.append((method, inp, req, self.check_finite))
                sizes.append(inp.nbytes)
                keys.append(t)
        if not calls:
            return out
        self.bytes_read += sum(sizes)
        with self.progress.phase(label, sum(sizes)) as step:
            results = self.ex.map(stats_task, calls, sizes, step)
        fresh: dict[tuple[str, int], list] = {}
        for t, res in zip(keys, results):  # calls were made in unit order
            for i, detail in res.items():
                fresh.setdefault((t, i), []).append(detail)
        out.update(fresh)
        if self.store:
            self.store.put_details({(i, t, buckets[(t, i)]): units for (t, i), units in fresh.items()})
        return out


def sparsifier_decisions(method, inputs: Inputs, units: dict[str, list[Unit]], engine: StatsEngine) -> dict[str, list]:
    """Per tensor, per model `Decision`; None where the tensor is one unit and decides inline."""
    k = len(inputs.models)
    decisions: dict[str, list] = {}
    wanted: dict[str, list[int]] = {}
    for t in inputs.names:
        if inputs.reference.tensors[t].dtype not in FLOAT_DTYPES:
            decisions[t] = [None] * k
            continue
        numel = inputs.reference.tensors[t].numel
        sps = [method.sparsifier(i, t) for i in range(k)]
        decisions[t] = [None if sp.needs_summary else sp.decide(numel, None, None) for sp in sps]
        if len(units[t]) > 1:
            need = [i for i, sp in enumerate(sps) if sp.needs_summary]
            if need:
                wanted[t] = need
    sums = engine.summaries(wanted)
    buckets = {}
    for t, per_model in sums.items():
        numel = inputs.reference.tensors[t].numel
        for i, s in per_model.items():
            b = method.sparsifier(i, t).bucket(numel, s)
            if b is not None:
                buckets[(t, i)] = b
    details = engine.details(buckets)
    for t, per_model in sums.items():
        numel = inputs.reference.tensors[t].numel
        for i, s in per_model.items():
            decisions[t][i] = method.sparsifier(i, t).decide(numel, s, details.get((t, i)))
    return decisions


@dataclass
class Session:
    """Everything a run needs once inputs are open and the cluster is up."""

    inputs: Inputs
    method: object
    executor: Executor
    units: dict
    progress: Progress
    budget: int

    check_finite: bool = True

    def engine(self, store: StatsStore | None = None) -> StatsEngine:
        return StatsEngine(self.executor, self.inputs, self.units, self.method, self.progress, store, self.check_finite)


@contextlib.contextmanager
def session(cfg: MergeConfig, opts: MergeOptions, out: str | None = None):
    """Open and validate the inputs, start the scheduler and plan work units from the budget."""
    inputs = open_inputs(cfg)
    if out is not None:
        check_output(out, inputs, opts.overwrite)
    method = cfg.method(opts.seed)
    spec = SchedulerSpec.parse(opts.scheduler, opts.scheduler_file)
    budget = opts.memory_limit or default_budget()
    ex = Executor(spec, budget // max(1, spec.workers) if spec.kind == "processes" else 0)
    try:
        workers = ex.worker_count
        procs = 1 + (workers if spec.kind == "processes" else 0)
        wanted = opts.unit_bytes or (MAX_UNIT_BYTES if spec.kind in ("threads", "processes") else MAX_UNIT_BYTES // 4)
        # local runs know their memory budget; a cluster's workers enforce their own limits
        ub = min(wanted, unit_budget(budget, workers, procs)) if spec.kind in ("threads", "processes") else wanted
        units = plan_units(inputs, ub, method)
        log.info("scheduler %s with %d worker thread(s); memory limit %.0f MiB; work unit <= %.1f MiB of input; "
                 "%d tensors in %d units (%d split)", spec.kind, workers, budget / 2**20, ub / 2**20, len(units),
                 sum(len(u) for u in units.values()), sum(1 for u in units.values() if len(u) > 1))
        yield Session(inputs, method, ex, units, Progress(opts.quiet), budget, not opts.allow_nonfinite)
    finally:
        ex.close()


def merge(cfg: MergeConfig, out: str, opts: MergeOptions | None = None) -> MergeResult:
    """Merge the checkpoints named in `cfg` into the folder `out` (created when complete)."""
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        with removed_on_bad_input(out + ".partial"), session(cfg, opts, out) as s:
            result = _run(cfg, out, opts, s)
    result.wall_seconds = time.perf_counter() - t0
    result.peak_anon_bytes = sampler.peak
    result.scheduler = opts.scheduler_file or opts.scheduler or "threads"
    result.memory_limit = s.budget
    return result


def _run(cfg, out, opts, s: Session) -> MergeResult:
    partial = out + ".partial"
    plan = {t: us[0].row_stop - us[0].row_start for t, us in s.units.items()}
    done, saved = prepare_partial(partial, fingerprint(cfg, s.inputs, opts.seed, opts.shard_size), opts.resume, opts.overwrite, plan,
                                  space_needed(s.inputs, cfg))
    if saved != plan:  # resume with the interrupted run's units: the manifest names units of that plan
        log.info("reusing the work-unit plan of the interrupted run")
        s.units = units_from_plan(s.inputs, saved)
    engine = s.engine(StatsStore(os.path.join(partial, WORK_DIR, "stats.zarr")))
    extra = s.method.plan(engine) or {}
    decisions = sparsifier_decisions(s.method, s.inputs, s.units, engine)
    written, read = write_output(cfg, out, opts, s, decisions, extra, done)
    n_units = sum(len(u) for u in s.units.values())
    return MergeResult(out, cfg.merge_method, 0.0, engine.bytes_read + read, written, 0, len(s.inputs.names), n_units,
                       sum(1 for u in s.units.values() if len(u) > 1), "", 0, resumed_units=len(done))


def write_output(cfg: MergeConfig, out: str, opts: MergeOptions, s: Session, decisions: dict, extra: dict,
                 done: set | None = None) -> tuple[int, int]:
    """Pass 2: merge every unit not yet `done` into pre-laid-out shards under OUT.partial, record
    each finished unit in the manifest, then finalise and rename to OUT. Returns (written, read)."""
    inputs, method = s.inputs, s.method
    partial = out + ".partial"
    if done is None:
        done, _ = prepare_partial(partial, "", False, True, {})
    ref = inputs.reference
    out_dtypes = {t: (cfg.output_dtype or e.dtype) if e.dtype in FLOAT_DTYPES else e.dtype
                  for t, e in ref.tensors.items()}
    layout = ShardLayout([(t, out_dtypes[t], ref.tensors[t].shape) for t in inputs.names], opts.shard_size)
    if done:
        layout.check_preallocated(partial)
    else:
        layout.preallocate(partial)

    calls, sizes = [], []
    shared = s.executor.share(method)
    for t in inputs.names:
        for u in s.units[t]:
            if (t, u.index) in done:
                continue
            inp = UnitInputs(u, *inputs.entries(t))
            calls.append((shared, inp, decisions[t], extra.get(t), partial, layout.placements[t], out_dtypes[t],
                          s.check_finite))
            sizes.append(inp.nbytes)
    with Manifest(partial) as manifest:
        def record(i, _):
            u = calls[i][1].unit
            manifest.record(u.tensor, u.index)

        with s.progress.phase("merge", sum(sizes)) as step:
            written = s.executor.map(merge_task, calls, sizes, step, record)

    release_reserve(partial)
    layout.finish(partial)
    copy_model_files(ref.folder, partial, cfg.output_dtype)
    write_model_card(partial, cfg, method.describe(), cfg.base_model, [m.path for m in cfg.models])
    verify_unchanged(inputs)
    shutil.rmtree(os.path.join(partial, WORK_DIR))
    publish(partial, out, opts.overwrite)
    return sum(written), sum(sizes)
