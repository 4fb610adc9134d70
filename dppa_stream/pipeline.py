"""The merge, end to end: open and validate inputs, plan work units from the memory budget,
gather the statistics the method asks for (pass 1), let it plan, merge and write (pass 2), publish.

Only small summaries and decisions cross from pass 1 to pass 2; tensor data never leaves the
task that read it. A local method plans a tensor held in one unit inside its pass-2 task (one
read); tensors split over several units, and every tensor of a method that plans across tensors
(DPPA), are planned up front from statistics passes whose results wait in the statistics store.
What the run keeps per tensor counts against the memory budget, checked before any tensor is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .config import MergeConfig
from .errors import UsageError, short
from .executor import Executor, Progress, SchedulerSpec, ThreadsExecutor, make_executor
from .inputs import Inputs, open_inputs
from .memory import PeakSampler, default_budget
from .methods.base import Catalogue, Plan
from .output import WORK_DIR, check_output, fingerprint, prepare_partial, publish, removed_on_bad_input, space_needed
from .statistics import StatsEngine, drive
from .units import (MAX_UNIT_BYTES, PROCESS_BASELINE, TASK_OVERHEAD, Classes, Items, TensorUnits, UnitInputs, WorkUnit,
                    frozen_bookkeeping, pack, split_tensor, state_bytes, tensor_classes, unit_budget)

log = logging.getLogger("dppa_stream")

DEFAULT_SHARD_SIZE = 5_000_000_000


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
    download: bool = False  # fetch Hub models missing from the local cache (hub.py)
    started: float | None = None  # time.perf_counter() when the command started (its imports count too)
    progress: Callable | None = None  # a progress bar (the CLI's): see executor.Progress
    dask_logs: bool = False  # show distributed's own log lines (the CLI's -vv)
    exiting: bool = False  # the process exits right after (the CLI): the run's bookkeeping is left to the exit


@dataclass(frozen=True)
class MergeResult:
    """What a merge did, built once it is over (the CLI's summary line and --json)."""

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
    dp: dict | None = None  # DP's clamped and emptied linears (dp, dppa)
    startup_seconds: float = 0.0  # of wall_seconds: from the command's start to the merge's (imports)
    requantization: dict | None = None  # what requantizing into the reference's format lost (targets.RequantLoss)

    def summary_line(self) -> str:
        resumed = f" (resumed: {self.resumed_units} units were already done)" if self.resumed_units else ""
        line = (
            f"merged {self.tensors} tensors ({self.units} work units) into {self.out} in {self.wall_seconds:.1f}s"
            f"{f' ({self.startup_seconds:.1f}s start-up)' if self.startup_seconds >= 0.05 else ''}: "
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB "
            f"({self.bytes_read / max(self.wall_seconds, 1e-9) / 1e6:.0f} MB/s read), "
            f"peak memory {self.peak_anon_bytes / 2**20:.0f} MiB (anonymous, process tree){resumed}"
        )
        if self.dp and self.dp["clamped"]:
            per_model = ", ".join(f"{len(m['clamped'])} of {m['linears']} in {os.path.basename(m['path'])}"
                                  for m in self.dp["models"] if m["clamped"])
            line += (f"\nDP clamped the density of {self.dp['clamped']} linear(s) ({per_model}); "
                     f"{self.dp['emptied']} emptied (their whole delta pruned); -v or --json lists them")
        if self.requantization:
            from .targets import loss_summary

            line += "\n" + loss_summary(self.requantization)
        return line

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Session:
    """Everything a run needs once inputs are open and the cluster is up."""

    cfg: MergeConfig
    inputs: Inputs
    method: object
    executor: Executor | ThreadsExecutor
    unit_bytes: int
    progress: Progress
    budget: int
    check_finite: bool = True

    @functools.cached_property
    def classes(self) -> Classes:
        """The output tensors grouped by what planning decides from (`units.tensor_classes`)."""
        return tensor_classes(self.inputs)

    @functools.cached_property
    def unit_needs(self) -> list[tuple[int, int]]:
        """Per class of tensors: task memory per element, and the element multiple its formats need."""
        return unit_needs(self.inputs, self.cfg)

    @functools.cached_property
    def needs(self) -> tuple[dict[str, int], dict[str, int]]:
        """`unit_needs` by tensor name: (task memory per element, element multiple)."""
        needs, c = self.unit_needs, self.classes
        return c.per_tensor([v[0] for v in needs]), c.per_tensor([v[1] for v in needs])

    @functools.cached_property
    def units(self) -> TensorUnits:
        """tensor -> its units, in order."""
        return plan_units(self.inputs, self.method, self.unit_needs, self.unit_bytes)

    @functools.cached_property
    def split_tensors(self) -> list[str]:
        """The tensors held in several units, in output order."""
        return list(self.units.split)

    @functools.cached_property
    def work_units(self) -> list[WorkUnit]:
        """Pass 2's work units: every unit of every tensor, in output order."""
        return work_units(self.inputs, self.units, self.unit_needs, self.unit_bytes)

    @functools.cached_property
    def catalogue(self) -> Catalogue:
        return catalogue(self.cfg, self.inputs)

    @property
    def float_tensors(self) -> list[str]:
        """The tensors that are merged (real-valued: plain floats or quantized)."""
        c = self.classes
        real = {k for k, i in enumerate(c.first) if c.refs[i].real}
        return list(c.names) if len(real) == len(c.first) else [t for t, k in zip(c.names, c.of) if k in real]

    def engine(self, store) -> StatsEngine:
        return StatsEngine(self.executor, self.inputs, self.units, self.progress, self.unit_bytes, store,
                           self.check_finite)

    def plan(self, engine: StatsEngine, method=None) -> Plan:
        """The method's plan for every tensor that is not planned inside its pass-2 task: all
        float tensors of a method that plans across tensors, else those split over several units."""
        method = method or self.method
        if method.local:
            outputs = self.inputs.outputs
            tensors = [t for t in self.split_tensors if outputs[t].entry.real]
        else:
            tensors = self.float_tensors
        return drive(method, self.catalogue, tensors, engine)


def catalogue(cfg: MergeConfig, inputs: Inputs) -> Catalogue:
    """Every output tensor with the parameter values that apply to it (gradients and filters
    resolved at its layer position), and the reference's config.json. A `models:` config's
    per-model parameters are read from `cfg` itself (None below), not from the specs the inputs
    were opened with: the factor search plans candidates of other weights on the same inputs."""
    from .methods.base import Infos

    c = tensor_classes(inputs)
    glob, models = cfg.params_all(c.outs)
    return Catalogue.of_columns(c.names, Infos(c.names, c.dtypes, c.shapes, glob, models),
                                inputs.reference.read_config())


def unit_needs(inputs: Inputs, cfg: MergeConfig) -> list[tuple[int, int]]:
    """Per class of tensors (`units.Classes`): bytes a unit holds per element (inputs as read or
    decoded, and the output), and the element multiple its boundaries must fall on for its
    storage formats (scale blocks of its inputs and output; 1 for plain tensors)."""
    from .sources import align, memory_per_element
    from .targets import class_targets

    targets = class_targets(inputs, cfg.out_dtype, cfg.dtype)
    c = tensor_classes(inputs)
    needs = []
    for i, target in zip(c.first, targets):
        entries = c.entries(i)
        needs.append((memory_per_element(entries) + target.out_bytes, math.lcm(align(entries), target.align)))
    return needs


def client_state(inputs: Inputs, method) -> int:
    """What this run's bookkeeping holds in memory (`units.state_bytes`): every tensor's entries,
    and the plans of those planned before pass 2 (all real-valued tensors of a method that plans
    across tensors; a local method plans most tensors inside their pass-2 task)."""
    c = tensor_classes(inputs)
    planned = 0
    if not method.local:
        planned = sum(n for n, i in zip(c.counts(), c.first) if c.refs[i].real)
    models = max((len(c.models[i]) for i in c.first), default=0)
    return state_bytes(len(inputs.names), len(inputs.all), planned, models)


def plan_units(inputs: Inputs, method, needs: list, unit_bytes: int) -> TensorUnits:
    """Every tensor's units, in output order: as large as `unit_bytes` of task memory allows,
    boundaries where both the method and the tensor's storage formats accept them (`needs`:
    `unit_needs`). Decided once per class of tensors: a method's multiple depends on the shape alone."""
    c = tensor_classes(inputs)
    numel, count, split = [], [], {}
    seen = {}  # (shape, needs) -> (numel, multiple), multiple None where the tensor is one unit
    for k, i in enumerate(c.first):
        shape = c.refs[i].shape
        got = seen.get((shape, needs[k]))
        if got is None:
            per, a = needs[k]
            n, multiple = math.prod(shape), math.lcm(method.unit_multiple(shape), a)
            whole = len(split_tensor(c.names[i], n, len(shape), multiple, per, unit_bytes)) == 1
            got = seen[shape, needs[k]] = (n, None if whole else multiple)
        numel.append(got[0])
        count.append(1)
        if got[1] is not None:
            split[k] = (got[0], len(shape), got[1], needs[k][0])
    units = {}
    if split:
        for t, k in zip(c.names, c.of):
            if k in split:
                units[t] = tuple(split_tensor(t, *split[k], unit_bytes))
                count[k] = len(units[t])
    return TensorUnits(c, numel, count, units)


def work_units(inputs: Inputs, units: TensorUnits, needs: list, unit_bytes: int) -> list[WorkUnit]:
    """Consecutive units packed into work units of at most `unit_bytes` of task memory (`needs`:
    `unit_needs`). A tensor held whole by one unit is one item, whose sizes its class gives."""
    c = tensor_classes(inputs)
    size, nbytes, split = [], [], set()
    for k, i in enumerate(c.first):
        n, entries = units.numel[k], c.entries(i)
        if units.count[k] > 1:
            split.add(k)
            size.append(0)  # an item per unit, below
            nbytes.append(0)
            continue
        size.append(n * needs[k][0])
        shape = entries[0].shape  # the output's (n is its numel): inputs of its shape hold n elements each
        nbytes.append((sum([e.nbytes for e in entries]) if n else 0) if all([e.shape == shape for e in entries])
                      else UnitInputs(units.of(i)[0], c.bases[i], c.models[i]).nbytes)
    zeros = [0] * len(c.names)
    # the items as columns (`Items`: no object per tensor), with their sizes
    cols = [c.names, zeros, zeros, c.column(units.numel), c.bases, c.models, c.column(size), c.column(nbytes)]
    if split:  # a tensor of several units: an item per unit, in its place
        parts, at = tuple([] for _ in cols), 0
        for j in [j for j, k in enumerate(c.of) if k in split]:
            us, per = units.split[c.names[j]], needs[c.of[j]][0]
            new = [UnitInputs(u, c.bases[j], c.models[j]) for u in us]
            add = (*zip(*((u.tensor, u.index, u.flat_start, u.flat_stop) for u in us)), [c.bases[j]] * len(us),
                   [c.models[j]] * len(us), [u.numel * per for u in us], [i.nbytes for i in new])
            for part, whole, more in zip(parts, cols, add):
                part += whole[at:j]
                part += more
            at = j + 1
        for part, whole in zip(parts, cols):
            part += whole[at:]
        cols = parts
    return pack(Items(*cols[:6]), cols[6], unit_bytes, cols[7])


def _check_smallest_units(s: Session, per_task: int) -> None:
    """A tensor whose format makes its smallest unit (whole FP8 blocks, whole MXFP4 experts)
    larger than a task's share of --memory-limit cannot run within it: say so before reading."""
    c, needs, units = s.classes, s.unit_needs, s.units
    over = [i for k, i in enumerate(c.first)
            if needs[k][1] > 1 and units.of(i)[0].numel * needs[k][0] > per_task]
    if over:
        t = c.names[min(over)]
        need = units.of(min(over))[0].numel * needs[c.of[min(over)]][0]
        raise UsageError(f"tensor {short(t)}: one work unit holds at least {need / 2**20:.0f} MiB (whole "
                         f"scale blocks or experts of its format), more than the {per_task / 2**20:.0f} MiB per "
                         "task that --memory-limit leaves; raise --memory-limit or use fewer workers")


def _check_method_memory(s: Session, budget: int, workers: int, processes: int, state: int) -> None:
    """A method that holds more than a unit's rows for a tensor (Iso-C, TSV-M: Gram matrices and
    projections, `MergeMethod.task_bytes`/`held_bytes`) must fit: its largest task on every worker,
    next to what the run holds for the tensors it plans in pass 1. Refused before any read.
    Decided per class of tensors (the largest task: the first tensor of a class with the largest)."""
    c, needs, units = s.classes, s.unit_needs, s.units
    task, worst, held, counts = 0, None, 0, None
    for k, i in enumerate(c.first):
        e, models = c.refs[i], len(c.models[i])
        extra = s.method.task_bytes(e.shape, models) if e.real else 0
        if not extra:
            continue
        us = units.of(i)
        need = max(u.numel for u in us) * needs[k][0] + extra
        if need > task or (need == task and i < worst):
            task, worst = need, i
        if len(us) > 1:
            counts = counts or c.counts()
            held += s.method.held_bytes(e.shape, models) * counts[k]
    total = PROCESS_BASELINE * processes + state + held + max(1, workers) * (TASK_OVERHEAD + task)
    if worst is not None and total > budget:
        kept = (f", and the run keeps {held / 2**20:.0f} MiB of Gram matrices and plans until pass 2 (a --unit-size "
                "that holds whole matrices keeps none)") if held else ""
        raise UsageError(f"--memory-limit {budget / 2**20:.0f} MiB is too small for {s.method.name}: tensor "
                         f"{short(c.names[worst])} needs {task / 2**20:.0f} MiB in one task (its rows, Gram matrix "
                         f"and projection){kept}; need at least {total / 2**20:.0f} MiB (or use fewer workers, or a "
                         "--unit-size that leaves room for it)")


@contextlib.contextmanager
def session(cfg: MergeConfig, opts: MergeOptions, out: str | None = None):
    """Open and validate the inputs, start the scheduler and plan work units from the budget."""
    try:
        with frozen_bookkeeping():
            parts = _start(cfg, opts, out)
        with parts[0]:
            yield parts[1]
    finally:
        gc.unfreeze()


def _start(cfg: MergeConfig, opts: MergeOptions, out: str | None):
    """`session`'s set-up: (the executor, to close when done, and the Session)."""
    inputs = open_inputs(cfg, opts.download, opts.quiet)
    if out is not None:
        check_output(out, inputs, opts.overwrite)
    method = cfg.method(opts.seed)
    spec = SchedulerSpec.parse(opts.scheduler, opts.scheduler_file)
    budget = opts.memory_limit or default_budget()
    local = spec.kind in ("threads", "processes")
    state = client_state(inputs, method)
    # checked before any worker starts or tensor is read: local runs know their memory budget (a
    # cluster's workers enforce their own limits, and only the client's state counts here)
    ub = unit_budget(budget, spec.workers, 1 + (spec.workers if spec.kind == "processes" else 0), state) \
        if local else unit_budget(budget, 0, 1, state)
    ex = make_executor(spec, budget // max(1, spec.workers) if spec.kind == "processes" else 0, opts.dask_logs)
    try:
        files = [(st.path, st.identity[3], st.identity[2]) for ck in inputs.all for st in ck.stamps.values()]
        ex.check_workers(files, os.path.dirname(os.path.abspath(out)) if out is not None else None)
        workers = ex.worker_count
        wanted = opts.unit_bytes or (MAX_UNIT_BYTES if local else MAX_UNIT_BYTES // 4)
        s = Session(cfg, inputs, method, ex, min(wanted, ub) if local else wanted, Progress(opts.progress), budget,
                    not opts.allow_nonfinite)
        s.catalogue  # bookkeeping: made while the collector is off (`frozen_bookkeeping`), like the units below
        if local:
            _check_smallest_units(s, ub)
            _check_method_memory(s, budget, spec.workers, 1 + (spec.workers if spec.kind == "processes" else 0), state)
        log.info("scheduler %s with %d worker thread(s); memory limit %.0f MiB; work unit <= %.1f MiB; "
                 "%d tensors in %d units (%d split), %d work units", spec.kind, workers, budget / 2**20, ub / 2**20,
                 len(inputs.names), len(inputs.names) + sum(len(us) - 1 for us in s.units.split.values()),
                 len(s.split_tensors), len(s.work_units))
    except BaseException:
        ex.close()
        raise
    return contextlib.closing(ex), s


_LEFT_FOR_EXIT: list = []  # sessions of runs whose process exits next (`MergeOptions.exiting`): freeing a 45k-tensor
# set's bookkeeping object by object took ~45 ms of the client's CPU, for memory the exit returns anyway


def merge(cfg: MergeConfig, out: str, opts: MergeOptions | None = None) -> MergeResult:
    """Merge the checkpoints named in `cfg` into the folder `out` (created when complete)."""
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = opts.started if opts.started is not None else time.perf_counter()
    startup = time.perf_counter() - t0
    with PeakSampler() as sampler:
        with removed_on_bad_input(out + ".partial"), session(cfg, opts, out) as s:
            done = _run(cfg, out, opts, s)
    if opts.exiting:
        _LEFT_FOR_EXIT.append(s)
    return MergeResult(out, cfg.merge_method, wall_seconds=time.perf_counter() - t0, peak_anon_bytes=sampler.peak,
                       scheduler=opts.scheduler_file or opts.scheduler or "threads", memory_limit=s.budget,
                       startup_seconds=startup, **done)


def _run(cfg, out, opts, s: Session) -> dict:
    """Both passes into OUT.partial, then publish OUT: what the run did, for `MergeResult`."""
    from .merge_pass import write_output
    from .stats_store import StatsStore

    partial = out + ".partial"
    plan = {"unit_bytes": s.unit_bytes}
    done, saved = prepare_partial(partial, fingerprint(cfg, s.inputs, opts.seed, opts.shard_size), opts.resume,
                                  opts.overwrite, plan, set(s.inputs.names), space_needed(s.inputs, cfg))
    if saved != plan:  # resume with the interrupted run's units: the manifest names work units of that plan
        log.info("reusing the work-unit plan of the interrupted run")
        s = dataclasses.replace(s, unit_bytes=saved["unit_bytes"])
    engine = s.engine(StatsStore(os.path.join(partial, WORK_DIR, "stats.zarr")))
    plan = s.plan(engine)
    dp = None
    if plan.report is not None:
        from .methods.dppa import clamp_notes

        dp = clamp_notes(plan.report, [m.path for m in cfg.models])
        for m in dp["models"]:
            for c in m["clamped"]:
                log.info("DP clamped %s of %s: densities %s, kept %s", c["tensor"], m["path"], c["densities"], c["kept"])
    plans = plan.tensors  # DPPA's: made per work unit from its report's arrays as pass 2 runs
    del plan
    written, read, requant = write_output(cfg, out, s, plans, done, opts.shard_size)
    publish(partial, out, opts.overwrite)
    return dict(bytes_read=engine.bytes_read + read, bytes_written=written, tensors=len(s.inputs.names),
                units=len(s.work_units), split_tensors=len(s.split_tensors),
                resumed_units=len(done), dp=dp, requantization=requant)
