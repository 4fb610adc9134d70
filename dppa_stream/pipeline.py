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
import logging
import os
import time
from dataclasses import asdict, dataclass

from .checkpoint import FLOAT_DTYPES
from .config import MergeConfig
from .executor import Executor, Progress, SchedulerSpec, ThreadsExecutor, make_executor
from .inputs import Inputs, open_inputs
from .memory import PeakSampler, default_budget
from .methods.base import Catalogue, Plan
from .output import WORK_DIR, check_output, fingerprint, prepare_partial, publish, removed_on_bad_input, space_needed
from .statistics import StatsEngine, drive
from .units import (MAX_UNIT_BYTES, UnitInputs, WorkUnit, pack, split_tensor, state_bytes, unit_budget,
                    unit_memory_per_element)

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
    started: float | None = None  # time.perf_counter() when the command started (its imports count too)


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
    dp: dict | None = None  # DP's clamped and emptied linears (dp, dppa)
    startup_seconds: float = 0.0  # of wall_seconds: from the command's start to the merge's (imports)

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
    def units(self) -> dict:
        """tensor -> its units, in order."""
        return plan_units(self.cfg, self.inputs, self.method, self.unit_bytes)

    @functools.cached_property
    def work_units(self) -> list[WorkUnit]:
        """Pass 2's work units: every unit of every tensor, in output order."""
        return work_units(self.cfg, self.inputs, self.units, self.unit_bytes)

    @functools.cached_property
    def catalogue(self) -> Catalogue:
        return catalogue(self.cfg, self.inputs)

    @property
    def float_tensors(self) -> list[str]:
        return [t for t in self.inputs.names if self.inputs.entry(t).dtype in FLOAT_DTYPES]

    def engine(self, store) -> StatsEngine:
        return StatsEngine(self.executor, self.inputs, self.units, self.progress, self.unit_bytes, store,
                           self.check_finite)

    def plan(self, engine: StatsEngine, method=None) -> Plan:
        """The method's plan for every tensor that is not planned inside its pass-2 task: all
        float tensors of a method that plans across tensors, else those split over several units."""
        method = method or self.method
        tensors = self.float_tensors
        if method.local:
            tensors = [t for t in tensors if len(self.units[t]) > 1]
        return drive(method, self.catalogue, tensors, engine)


def catalogue(cfg: MergeConfig, inputs: Inputs) -> Catalogue:
    """Every output tensor with the parameter values that apply to it (gradients and filters
    resolved at its layer position), and the reference's config.json."""
    from .methods.base import TensorInfo

    infos, same = {}, {}
    for name in inputs.names:
        out = inputs.outputs[name]
        glob, models = cfg.tensor_params(name, out.t, out.specs, [m.name for m in out.models], out.slice_params)
        # one copy of each set of values (most tensors share theirs); repr tells 1, 1.0 and True apart
        glob, models = same.setdefault(repr((glob, models)), (glob, models))
        infos[name] = TensorInfo(name, out.entry.dtype, out.entry.shape, glob, models)
    return Catalogue(infos, inputs.reference.read_config())


def client_state(inputs: Inputs, method) -> int:
    """What this run's bookkeeping holds in memory (`units.state_bytes`): every tensor's entries,
    and the plans of those planned before pass 2 (all float tensors of a method that plans across
    tensors; a local method plans most tensors inside their pass-2 task)."""
    planned = 0 if method.local else sum(1 for t in inputs.names if inputs.entry(t).dtype in FLOAT_DTYPES)
    models = max((len(o.models) for o in inputs.outputs.values()), default=0)
    return state_bytes(len(inputs.names), len(inputs.all), planned, models)


def _out_itemsizes(cfg: MergeConfig, inputs: Inputs) -> dict[str, int]:
    from .checkpoint import DTYPE_SIZES
    from .merge_pass import output_dtypes

    return {t: DTYPE_SIZES[d] for t, d in output_dtypes(inputs, cfg.output_dtype).items()}


def plan_units(cfg: MergeConfig, inputs: Inputs, method, unit_bytes: int) -> dict[str, list]:
    """Every tensor's units: as large as `unit_bytes` of task memory allows, boundaries where the
    method accepts them."""
    out = _out_itemsizes(cfg, inputs)
    units = {}
    for t in inputs.names:
        e, o = inputs.entry(t), inputs.outputs[t]
        per_element = unit_memory_per_element(e, (o.base is not None) + len(o.models), out[t])
        units[t] = split_tensor(t, e.numel, len(e.shape), method.unit_multiple(e.shape), per_element, unit_bytes)
    return units


def work_units(cfg: MergeConfig, inputs: Inputs, units: dict, unit_bytes: int) -> list[WorkUnit]:
    """Consecutive units packed into work units of at most `unit_bytes` of task memory."""
    out = _out_itemsizes(cfg, inputs)
    items = [UnitInputs(u, *inputs.entries(t)) for t in inputs.names for u in units[t]]
    return pack(items, [i.nbytes + i.unit.numel * out[i.unit.tensor] for i in items], unit_bytes)


@contextlib.contextmanager
def session(cfg: MergeConfig, opts: MergeOptions, out: str | None = None):
    """Open and validate the inputs, start the scheduler and plan work units from the budget."""
    inputs = open_inputs(cfg)
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
    ex = make_executor(spec, budget // max(1, spec.workers) if spec.kind == "processes" else 0)
    try:
        files = [(st.path, st.identity[3], st.identity[2]) for ck in inputs.all for st in ck.stamps.values()]
        ex.check_workers(files, os.path.dirname(os.path.abspath(out)) if out is not None else None)
        workers = ex.worker_count
        wanted = opts.unit_bytes or (MAX_UNIT_BYTES if local else MAX_UNIT_BYTES // 4)
        ub = min(wanted, ub) if local else wanted
        s = Session(cfg, inputs, method, ex, ub, Progress(opts.quiet), budget, not opts.allow_nonfinite)
        log.info("scheduler %s with %d worker thread(s); memory limit %.0f MiB; work unit <= %.1f MiB; "
                 "%d tensors in %d units (%d split), %d work units", spec.kind, workers, budget / 2**20, ub / 2**20,
                 len(inputs.names), sum(len(u) for u in s.units.values()),
                 sum(1 for u in s.units.values() if len(u) > 1), len(s.work_units))
        yield s
    finally:
        ex.close()


def merge(cfg: MergeConfig, out: str, opts: MergeOptions | None = None) -> MergeResult:
    """Merge the checkpoints named in `cfg` into the folder `out` (created when complete)."""
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = opts.started if opts.started is not None else time.perf_counter()
    startup = time.perf_counter() - t0
    with PeakSampler() as sampler:
        with removed_on_bad_input(out + ".partial"), session(cfg, opts, out) as s:
            result = _run(cfg, out, opts, s)
    result.wall_seconds = time.perf_counter() - t0
    result.startup_seconds = startup
    result.peak_anon_bytes = sampler.peak
    result.scheduler = opts.scheduler_file or opts.scheduler or "threads"
    result.memory_limit = s.budget
    return result


def _run(cfg, out, opts, s: Session) -> MergeResult:
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
    plans = plan.tensors
    del plan  # its report (a record per linear and fine-tune) is not needed in pass 2
    written, read = write_output(cfg, out, s, plans, done, opts.shard_size)
    publish(partial, out, opts.overwrite)
    return MergeResult(out, cfg.merge_method, 0.0, engine.bytes_read + read, written, 0, len(s.inputs.names),
                       len(s.work_units), sum(1 for u in s.units.values() if len(u) > 1), "", 0,
                       resumed_units=len(done), dp=dp)
