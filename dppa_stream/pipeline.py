"""The merge, end to end: open and validate inputs, plan work units from the memory budget,
gather the statistics the method asks for (pass 1), let it plan, merge and write (pass 2), publish.

Only small summaries and decisions cross from pass 1 to pass 2; tensor data never leaves the
task that read it. A local method plans a tensor held in one work unit inside that unit's pass-2
task (one read); tensors split over several units, and every tensor of a method that plans
across tensors (DPPA), are planned up front from Dask passes with tree reductions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

from .config import MergeConfig
from .errors import UsageError, short
from .executor import Executor, Progress, SchedulerSpec, ThreadsExecutor, make_executor
from .inputs import Inputs, open_inputs
from .memory import PeakSampler, default_budget
from .methods.base import Catalogue, Plan
from .output import WORK_DIR, check_output, fingerprint, prepare_partial, publish, removed_on_bad_input, space_needed
from .statistics import StatsEngine, drive
from .units import MAX_UNIT_BYTES, plan_units, unit_budget, units_from_plan

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
    units: dict
    progress: Progress
    budget: int
    check_finite: bool = True

    @functools.cached_property
    def catalogue(self) -> Catalogue:
        return catalogue(self.cfg, self.inputs)

    @property
    def float_tensors(self) -> list[str]:
        """The tensors that are merged (real-valued: plain floats or quantized)."""
        return [t for t in self.inputs.names if self.inputs.entry(t).real]

    def engine(self, store=None) -> StatsEngine:
        return StatsEngine(self.executor, self.inputs, self.units, self.progress, store, self.check_finite)

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
    resolved at its layer position), and the reference's config.json. A `models:` config's
    per-model parameters are read from `cfg` itself (None below), not from the specs the inputs
    were opened with: the factor search plans candidates of other weights on the same inputs."""
    from .methods.base import TensorInfo

    infos = {}
    for name in inputs.names:
        out = inputs.outputs[name]
        specs = out.specs if cfg.slices else None
        glob, models = cfg.tensor_params(name, out.t, specs, [m.name for m in out.models], out.slice_params)
        infos[name] = TensorInfo(name, out.entry.dtype, out.entry.shape, glob, models)
    return Catalogue(infos, inputs.reference.read_config())


def _unit_needs(inputs: Inputs, cfg: MergeConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Per tensor: bytes a unit holds per element (inputs as read or decoded, and the output), and
    the element multiple its boundaries must fall on (scale blocks of its inputs and output)."""
    from .sources import align, memory_per_element
    from .targets import output_targets

    targets = output_targets(inputs, cfg.out_dtype, cfg.dtype)
    per_element, aligns = {}, {}
    for t in inputs.names:
        out = inputs.outputs[t]
        entries = [e for e in (out.base, *out.models) if e is not None]
        per_element[t] = memory_per_element(entries) + targets[t].out_bytes
        aligns[t] = math.lcm(align(entries), targets[t].align)
    return per_element, aligns


def _check_aligned_units(inputs: Inputs, rows: dict[str, int], per_element: dict[str, int], aligns: dict[str, int],
                         per_task: int) -> None:
    """A tensor whose format makes its smallest unit (whole FP8 blocks, whole MXFP4 experts)
    larger than a task's share of --memory-limit cannot run within it: say so before reading."""
    for t in inputs.names:
        e = inputs.entry(t)
        need = rows[t] * e.row_numel * per_element[t]
        if aligns[t] > 1 and need > per_task:
            raise UsageError(f"tensor {short(t)}: one work unit holds at least {need / 2**20:.0f} MiB (whole "
                             f"scale blocks or experts of its format), more than the {per_task / 2**20:.0f} MiB per "
                             "task that --memory-limit leaves; raise --memory-limit or use fewer workers")


def _entries(inputs: Inputs) -> dict:
    return {t: inputs.entry(t) for t in inputs.names}


@contextlib.contextmanager
def session(cfg: MergeConfig, opts: MergeOptions, out: str | None = None):
    """Open and validate the inputs, start the scheduler and plan work units from the budget."""
    inputs = open_inputs(cfg, opts.download, opts.quiet)
    if out is not None:
        check_output(out, inputs, opts.overwrite)
    method = cfg.method(opts.seed)
    spec = SchedulerSpec.parse(opts.scheduler, opts.scheduler_file)
    budget = opts.memory_limit or default_budget()
    ex = make_executor(spec, budget // max(1, spec.workers) if spec.kind == "processes" else 0)
    try:
        workers = ex.worker_count
        procs = 1 + (workers if spec.kind == "processes" else 0)
        wanted = opts.unit_bytes or (MAX_UNIT_BYTES if spec.kind in ("threads", "processes") else MAX_UNIT_BYTES // 4)
        # local runs know their memory budget; a cluster's workers enforce their own limits
        local = spec.kind in ("threads", "processes")
        ub = min(wanted, unit_budget(budget, workers, procs)) if local else wanted
        needs = _unit_needs(inputs, cfg)
        rows = plan_units(inputs.names, _entries(inputs), *needs, ub)
        if local:
            _check_aligned_units(inputs, rows, *needs, unit_budget(budget, workers, procs))
        units = units_from_plan(inputs.names, _entries(inputs), rows)
        log.info("scheduler %s with %d worker thread(s); memory limit %.0f MiB; work unit <= %.1f MiB; "
                 "%d tensors in %d units (%d split)", spec.kind, workers, budget / 2**20, ub / 2**20, len(units),
                 sum(len(u) for u in units.values()), sum(1 for u in units.values() if len(u) > 1))
        yield Session(cfg, inputs, method, ex, units, Progress(opts.quiet), budget, not opts.allow_nonfinite)
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
    rows = {t: us[0].row_stop - us[0].row_start for t, us in s.units.items()}
    done, saved = prepare_partial(partial, fingerprint(cfg, s.inputs, opts.seed, opts.shard_size), opts.resume,
                                  opts.overwrite, rows,
                                  space_needed(s.inputs, cfg))
    if saved != rows:  # resume with the interrupted run's units: the manifest names units of that plan
        log.info("reusing the work-unit plan of the interrupted run")
        s.units = units_from_plan(s.inputs.names, _entries(s.inputs), saved)
    engine = s.engine(StatsStore(os.path.join(partial, WORK_DIR, "stats.zarr")))
    plan = s.plan(engine)
    dp = None
    if plan.report is not None:
        from .methods.dppa import clamp_notes

        dp = clamp_notes(plan.report, [m.path for m in cfg.models])
        for m in dp["models"]:
            for c in m["clamped"]:
                log.info("DP clamped %s of %s: densities %s, kept %s", c["tensor"], m["path"], c["densities"], c["kept"])
    written, read, requant = write_output(cfg, out, s, plan.tensors, done, opts.shard_size)
    publish(partial, out, opts.overwrite)
    n_units = sum(len(u) for u in s.units.values())
    return MergeResult(out, cfg.merge_method, 0.0, engine.bytes_read + read, written, 0, len(s.inputs.names), n_units,
                       sum(1 for u in s.units.values() if len(u) > 1), "", 0, resumed_units=len(done), dp=dp,
                       requantization=requant)
