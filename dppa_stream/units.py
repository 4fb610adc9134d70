"""Work units: row ranges of one tensor, sized from the memory budget, and reading one.

A unit is the rows [row_start, row_stop) of one tensor across every input. It is what one Dask
task holds in memory: the rows of the base and of each fine-tune (one allocation; raw bit patterns
read with one positional read per input, or float32 values decoded by `sources`) plus the output
rows. Units never split a row, so anything computed row by row, and every flat index, is the same
whatever the unit size; a format may ask for more (whole 128-row FP8 blocks, whole MXFP4 experts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .checkpoint import FLOAT_DTYPES, TensorEntry
from .errors import UsageError

PROCESS_BASELINE = 300 << 20  # python + numpy + numba + dask/distributed, per process
TASK_OVERHEAD = 16 << 20  # kernel scratch, histograms and Dask bookkeeping per running task
MAX_UNIT_BYTES = 64 << 20  # default unit cap: small tasks balance load and keep memory low
MIN_UNIT_BYTES = 4 << 20


@dataclass(frozen=True)
class Unit:
    """Rows [row_start, row_stop) of one tensor; `index` is its position among the tensor's units."""

    tensor: str
    index: int
    row_start: int
    row_stop: int
    row_numel: int

    @property
    def flat_start(self) -> int:
        return self.row_start * self.row_numel

    @property
    def numel(self) -> int:
        return (self.row_stop - self.row_start) * self.row_numel


@dataclass(frozen=True)
class UnitInputs:
    """What a task needs to read a unit: the base entry (or None) and each model's entry."""

    unit: Unit
    base: TensorEntry | None
    models: tuple[TensorEntry, ...]

    @property
    def entries(self) -> tuple[TensorEntry, ...]:
        return ((self.base,) if self.base else ()) + self.models

    @property
    def nbytes(self) -> int:
        """Stored bytes the unit reads (quantized inputs: their codes and scales)."""
        return sum(self.unit.numel * e.nbytes // max(1, e.numel) for e in self.entries)


def plan_units(names: list[str], entries: dict[str, TensorEntry], per_element: dict[str, int], align: dict[str, int],
               unit_bytes: int) -> dict[str, int]:
    """Rows per unit for every tensor, so that one unit's memory (`per_element` bytes per element:
    inputs and output) fits `unit_bytes`, and its boundaries fall on multiples of `align[name]`
    elements (a multiple or a divisor of the row size). A unit of the alignment is the least a
    tensor can be split into, even when it is larger than `unit_bytes`."""
    rows = {}
    for name in names:
        e = entries[name]
        step = max(1, align.get(name, 1) // max(1, e.row_numel))
        per_row = e.row_numel * per_element[name]
        rows[name] = max(step, unit_bytes // max(1, per_row) // step * step)
    return rows


def units_from_plan(names: list[str], entries: dict[str, TensorEntry], rows_per_unit: dict[str, int]) -> dict[str, list[Unit]]:
    """The units of every tensor. A tensor with no elements (a zero in its shape) is one empty
    unit, and so is a tensor of at most one dimension (biases, norms: small, and methods that rank
    or normalise along a vector need it whole)."""
    units = {}
    for name in names:
        e = entries[name]
        if e.numel == 0 or len(e.shape) <= 1:
            units[name] = [Unit(name, 0, 0, e.rows, e.row_numel)]
            continue
        step = rows_per_unit[name]
        units[name] = [Unit(name, i, s, min(e.rows, s + step), e.row_numel)
                       for i, s in enumerate(range(0, e.rows, step))]
    return units


def unit_budget(memory_limit: int, workers: int, processes: int) -> int:
    """Bytes per unit such that `workers` concurrent tasks fit the memory limit."""
    free = memory_limit - PROCESS_BASELINE * processes - TASK_OVERHEAD * workers
    per_task = free // max(1, workers)
    if per_task < MIN_UNIT_BYTES:
        need = PROCESS_BASELINE * processes + (TASK_OVERHEAD + MIN_UNIT_BYTES) * workers
        raise UsageError(
            f"--memory-limit {memory_limit / 2**20:.0f} MiB is too small for {workers} worker(s); "
            f"need at least {need / 2**20:.0f} MiB (or use fewer workers)"
        )
    return per_task


_scratch = threading.local()


def scratch(slot: str, nbytes: int) -> np.ndarray:
    """`nbytes` of this thread's reusable buffer `slot`, valid until the thread asks for `slot`
    again (i.e. for one task). A fresh 64 MiB array is mapped and zeroed by the kernel page by page
    on first touch every time — ~10 % of a merge's CPU, and contention on the address-space lock
    with two threads — where a reused one is already mapped. Its contents are stale: callers
    overwrite every byte."""
    pool = getattr(_scratch, "pool", None)
    if pool is None:
        pool = _scratch.pool = {}
    buf = pool.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = pool[slot] = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


class UnitRows:
    """The rows of one unit from every input (base first when there is one). `src[i]` holds input
    i's values as unsigned integers of the element size, `dtype` says which: the stored bit
    patterns when every input is stored plain in one dtype, else float32 values decoded from each
    input's format ("F32"). `raw` is the same bytes (integer tensors are copied from it)."""

    def __init__(self, inp: UnitInputs):
        from .kernels import CONTAINER
        from .sources import reads_raw, source

        u = inp.unit
        lo, hi = u.flat_start, u.flat_start + u.numel
        self.inp = inp
        self.has_base = inp.base is not None
        entries = inp.entries
        if reads_raw(entries):
            dtype, itemsize = entries[0].dtype, entries[0].itemsize
            raw = scratch("rows", len(entries) * u.numel * itemsize).reshape(len(entries), u.numel * itemsize)
            for row, e in zip(raw, entries):
                source(e).read_raw(lo, hi, row)
        else:
            dtype = "F32"
            raw = scratch("rows", len(entries) * u.numel * 4).reshape(len(entries), u.numel * 4)
            for row, e in zip(raw, entries):
                source(e).decode(lo, hi, row.view(np.float32))
        self.dtype = dtype
        self.raw = raw
        self.src = raw.view(CONTAINER[dtype]) if dtype in FLOAT_DTYPES else None

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES
