"""Work units: what one task holds, sized from the memory budget, and reading a tensor's range.

A `Unit` is a flat element range [flat_start, flat_stop) of one tensor across every input; a
`WorkUnit` is what one Dask task runs: consecutive units in output order whose memory fits the unit
size, i.e. many whole small tensors (an MoE checkpoint ships tens of thousands of them) or one
piece of a large one, its units kept as columns (`Items`). A task holds one unit at a time: the values of the base and of each
fine-tune (one allocation; raw bit patterns read with one positional read per input, or float32
values decoded by `sources`) plus the output values; or a batch of whole small tensors read
together (`BatchRows`, up to BATCH_MAX_BYTES).

A tensor is split only at multiples of its `multiple` (elements): a row along the last dimension
for methods that work element by element or row by row (so a fused `[experts, out, in]` tensor
splits inside an expert, like the same matrices stored one per tensor), whole first-axis slices
for methods that rank along dimension 1 (DELLA), and whatever a storage format needs on top.
Tensors of at most one dimension are never split (methods that rank or normalise along a vector
need it whole). Units and work units depend only on the inputs' headers, the multiples and the
unit size, so every scheduler, thread count and resumed run sees the same plan.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice, repeat
from operator import attrgetter, itemgetter, ne

import numpy as np

from .checkpoint import DTYPE_SIZES, FLOAT_DTYPES, TensorEntry
from .checkpoint.format import entries_of_columns
from .errors import UsageError

_DTYPE, _SHAPE, _BASE, _MODELS = attrgetter("dtype"), attrgetter("shape"), attrgetter("base"), attrgetter("models")

PROCESS_BASELINE = 300 << 20  # python + numpy + numba + dask/distributed, per process
TASK_OVERHEAD = 16 << 20  # kernel scratch, histograms and Dask bookkeeping per running task
MAX_UNIT_BYTES = 64 << 20  # default unit cap: small tasks balance load and keep memory low
MIN_UNIT_BYTES = 4 << 20
# What the client holds per tensor for the whole run (peak memory of DeepSeek-V3-shaped merges of
# 45k and 90k tensors, benchmarks/bench_moe.py: +2.2 KiB per tensor for ties; dppa's plans see below)
TENSOR_STATE = 512  # its catalogue entry, units, work-unit item, place in the output layout
INPUT_STATE = 512  # ... per input checkpoint: the header entry
# per tensor and fine-tune planned before pass 2 (DPPA, DP): the statistics store's index entry, the
# driver's key for it, DP's row of numbers (signals, densities, thresholds) and its linear. Measured:
# the peak of a dppa merge minus a ties merge of the same 45k-tensor set, over tensors x fine-tunes
# (~1.3-1.45 KiB; tracemalloc of the planning step: 1.3 KiB at its peak, 0.55 KiB held through pass 2)
PLAN_STATE = 1536


# Unit, UnitInputs, WorkUnit: built per unit where one is asked for (statistics passes, lone tensors; pass 2's
# batches read `Items` columns instead) and never changed; hashable like frozen dataclasses, but a frozen
# dataclass's __init__ costs ~1 us more each
@dataclass(slots=True, unsafe_hash=True)
class Unit:
    """Elements [flat_start, flat_stop) of one tensor (C order); `index` is its position among the
    tensor's units."""

    tensor: str
    index: int
    flat_start: int
    flat_stop: int

    @property
    def numel(self) -> int:
        return self.flat_stop - self.flat_start


@dataclass(slots=True, unsafe_hash=True)
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


class Items(Sequence):
    """Units and their inputs kept as columns, item k being `UnitInputs(Unit(tensors[k],
    indexes[k], starts[k], stops[k]), bases[k], models[k])`: a UnitInputs is made only where
    one is asked for, and a slice stays columns. A work unit's items (`WorkUnit`): pass 2 hands
    thousands of an MoE checkpoint's whole tensors to one task, whose batches read these
    columns as they are (`merge_pass`), so no object is made per tensor for them at all."""

    __slots__ = ("tensors", "indexes", "starts", "stops", "bases", "models")

    def __init__(self, tensors: list[str], indexes: list[int], starts: list[int], stops: list[int], bases: list,
                 models: list[tuple]):
        self.tensors, self.indexes, self.starts, self.stops = tensors, indexes, starts, stops
        self.bases, self.models = bases, models

    @classmethod
    def of(cls, items) -> "Items":
        """The columns of a sequence of UnitInputs (or Items as they are)."""
        if isinstance(items, Items):
            return items
        units = list(map(_UNIT, items))
        return cls(*(list(map(get, units)) for get in _UNIT_FIELDS), list(map(_BASE, items)), list(map(_MODELS, items)))

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Items(self.tensors[k], self.indexes[k], self.starts[k], self.stops[k], self.bases[k], self.models[k])
        return UnitInputs(Unit(self.tensors[k], self.indexes[k], self.starts[k], self.stops[k]), self.bases[k],
                          self.models[k])

    def __iter__(self):
        return map(UnitInputs, map(Unit, self.tensors, self.indexes, self.starts, self.stops), self.bases, self.models)

    def __eq__(self, other) -> bool:  # equal to the same items as a tuple or Items
        return isinstance(other, (Items, tuple)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def model_columns(self) -> list[list]:
        """Each model's entries, a column per model (the items have as many models as the first)."""
        return [list(map(itemgetter(m), self.models)) for m in range(len(self.models[0]))]

    def per_input(self) -> list[list]:
        """The items' entries per input: the base's column (where the first item has a base), then
        each model's."""
        return ([self.bases] if self.bases[0] is not None else []) + self.model_columns()

    def __reduce__(self):
        """Pickled (for a cluster's workers) with each input's entries as columns of their fields:
        a work unit of thousands of small tensors pickled entry by entry cost ~2 µs per entry each
        way, in the client and in the worker."""
        models = tuple(map(_packed, self.model_columns())) if len(set(map(len, self.models))) == 1 \
            else self.models  # per model, its column (a tuple); else as they are (a list)
        return _unpacked_items, (self.tensors, self.indexes, self.starts, self.stops, _packed(self.bases), models,
                                 len(self.tensors))


def _packed(entries: list):
    """A column of entries as it pickles fastest: the fields' columns where all are plain entries,
    the count where all are None (no base), else the entries themselves (a list)."""
    kinds = set(map(type, entries))
    if kinds == {TensorEntry}:
        return tuple(zip(*entries))
    if kinds == {type(None)}:
        return len(entries)
    return entries


def _unpacked(column) -> list:
    """`_packed`'s inverse."""
    if isinstance(column, int):
        return [None] * column
    if isinstance(column, tuple):
        return entries_of_columns(*column)
    return column


def _unpacked_items(tensors, indexes, starts, stops, bases, models, n: int) -> "Items":
    """`Items.__reduce__`'s inverse. Built with the collector paused: a work unit's tens of
    thousands of new entries would set off collections of the whole heap, for no garbage."""
    with collector_paused():
        if isinstance(models, tuple):  # per model, its column
            models = list(zip(*map(_unpacked, models))) if models else [()] * n
        return Items(tensors, indexes, starts, stops, _unpacked(bases), models)


_UNIT = attrgetter("unit")
_UNIT_FIELDS = tuple(map(attrgetter, ("tensor", "index", "flat_start", "flat_stop")))


@dataclass(slots=True, unsafe_hash=True)
class WorkUnit:
    """Consecutive units that one task runs (`Items`); `nbytes` is what it reads. The manifest
    names a work unit by its first unit."""

    items: Items
    nbytes: int

    @property
    def key(self) -> tuple[str, int]:
        return self.items.tensors[0], self.items.indexes[0]


@dataclass
class Classes:
    """The output tensors (output order) grouped by everything planning decides from: a tensor
    whose inputs are all stored plain in one shape is planned like every other one with the same
    input dtypes and shape, so targets, unit sizes and memory checks are decided once per class
    (an MoE checkpoint's tens of thousands of tensors fall into a few dozen). A tensor with any
    other input (quantized, adapted, remapped, of another shape) is a class of its own."""

    names: list[str]
    outs: list  # per tensor: its inputs.Output
    refs: list  # per tensor: the entry whose dtype and shape the output has
    dtypes: list  # per tensor: that entry's dtype
    shapes: list  # per tensor: that entry's shape
    bases: list  # per tensor: the base entry or None
    models: list  # per tensor: each model's entry
    of: list[int]  # per tensor: its class
    first: list[int]  # per class: the position of its first tensor
    alone: list[int]  # the positions of the tensors in a class of their own (inputs not plain, or of other shapes)

    def entries(self, i: int) -> tuple:
        base = self.bases[i]
        return (base, *self.models[i]) if base is not None else self.models[i]

    def column(self, values: list) -> list:
        """Per tensor, the value of its class (`values`: one per class)."""
        return list(map(values.__getitem__, self.of))

    def per_tensor(self, values: list) -> dict:
        """Tensor name -> the value of its class."""
        return dict(zip(self.names, map(values.__getitem__, self.of)))

    def counts(self) -> list[int]:
        """Per class, its number of tensors."""
        return np.bincount(np.array(self.of, np.int64), minlength=len(self.first)).tolist()


class TensorUnits(Mapping):
    """Tensor name -> its units (a tuple, in order), in output order (`pipeline.plan_units`).
    Decided per class: `numel` (each tensor's element count) and `count` (its number of units)
    per class, the units of split tensors kept in `split`. The mapping of every tensor is made the
    first time one is looked up by name (statistics passes): pass 2's work units are made from
    the columns (`pipeline.work_units`), an MoE checkpoint's tens of thousands of whole tensors
    need no entry here."""

    def __init__(self, classes: Classes, numel: list[int], count: list[int], split: dict[str, tuple]):
        self.classes, self.numel, self.count, self.split = classes, numel, count, split
        self._by_name = None

    def of(self, i: int) -> tuple:
        """The units of the tensor at position i."""
        c = self.classes
        got = self.split.get(c.names[i]) if self.split else None
        return got or (Unit(c.names[i], 0, 0, self.numel[c.of[i]]),)

    def __getitem__(self, tensor: str) -> tuple:
        if self._by_name is None:
            c, zeros = self.classes, repeat(0)
            by_name = dict(zip(c.names, zip(map(Unit, c.names, zeros, zeros, c.column(self.numel)))))
            by_name.update(self.split)  # in place: output order kept
            self._by_name = by_name
        return self._by_name[tensor]

    def __iter__(self):
        return iter(self.classes.names)

    def __len__(self) -> int:
        return len(self.classes.names)


def tensor_classes(inputs) -> Classes:
    """The `Classes` of `inputs`' output tensors, made once per inputs (kept on them). A tensor's
    key holds its inputs' dtypes and shapes, and their types; built column by column at C speed
    where every tensor has the same inputs (base or not, number of models), a column left out
    where it says nothing (one type or dtype for every tensor, shapes equal to the output's)."""
    memo = getattr(inputs, "classes", None)  # test doubles of Inputs may not have the field
    if memo is not None and memo[0] is inputs.outputs and memo[1] == len(inputs.names):
        return memo[2]
    names = list(inputs.names)
    outs = list(inputs.outputs.values())  # made in output order: checked (the same string objects) before used
    if list(inputs.outputs) != names:
        outs = list(map(inputs.outputs.__getitem__, names))
    bases, models = list(map(_BASE, outs)), list(map(_MODELS, outs))
    nones = list(map(type, bases)).count(type(None))  # by type: `==` on an entry is a Python call each
    if not names:
        keys, refs, dtypes, shapes = [], [], [], []
    elif nones in (0, len(bases)) and len(set(map(len, models))) == 1:
        # the models' columns of checkpoints laid out like the reference's (`Inputs.one_layout`) repeat its
        # kinds, dtypes and shapes entry for entry: they would add nothing to the keys
        kept = range(len(models[0])) if not getattr(inputs, "one_layout", False) else range(1 if nones else 0)
        cols = ([bases] if not nones else []) + [list(map(itemgetter(m), models)) for m in kept]
        refs = cols[0]
        dtypes, shapes = list(map(_DTYPE, refs)), list(map(_SHAPE, refs))
        parts = [shapes] + ([dtypes] if len(set(dtypes)) > 1 else [])
        for col in cols:
            if len(set(map(type, col))) > 1:
                parts.append(list(map(type, col)))
        for col in cols[1:]:
            for mine, ref in ((list(map(_DTYPE, col)), dtypes), (list(map(_SHAPE, col)), shapes)):
                if mine != ref:
                    parts.append(mine)
        keys = parts[0] if len(parts) == 1 else list(zip(*parts))
    else:  # inputs differ between tensors (slices of other models): one key at a time
        refs = [b if b is not None else m[0] for b, m in zip(bases, models)]
        dtypes, shapes = list(map(_DTYPE, refs)), list(map(_SHAPE, refs))
        keys = [(b is None, *map(type, es), *map(_DTYPE, es), *map(_SHAPE, es))
                for b, es in zip(bases, ((b, *m) if b is not None else m for b, m in zip(bases, models)))]
    firsts = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))  # the last write wins: the lowest position
    first = sorted(firsts.values())
    at = {keys[i]: k for k, i in enumerate(first)}
    of = list(map(at.__getitem__, keys))
    single = set()
    for k, i in enumerate(first):
        es = (bases[i], *models[i]) if bases[i] is not None else models[i]
        if not all([type(e) is TensorEntry and e.shape == es[0].shape for e in es]):
            single.add(k)
    alone = [j for j, k in enumerate(of) if k in single] if single else []
    for j in alone:  # a class of its own for each of their tensors
        if first[of[j]] != j:
            of[j] = len(first)
            first.append(j)
    classes = Classes(names, outs, list(refs), dtypes, shapes, bases, models, of, first, alone)
    inputs.classes = (inputs.outputs, len(names), classes)
    return classes


def split_tensor(name: str, numel: int, ndim: int, multiple: int, per_element: int, unit_bytes: int) -> list[Unit]:
    """The units of one tensor: as many elements as fit `unit_bytes` (at `per_element` bytes of
    task memory each), rounded down to a multiple of `multiple` (at least one multiple): the
    method's requirement (`MergeMethod.unit_multiple`), which a storage format that needs coarser
    boundaries (blocks of rows) may raise."""
    if numel == 0 or ndim <= 1:
        return [Unit(name, 0, 0, numel)]
    step = max(1, unit_bytes // max(1, per_element) // multiple) * multiple
    if step >= numel:
        return [Unit(name, 0, 0, numel)]
    return [Unit(name, i, s, min(numel, s + step)) for i, s in enumerate(range(0, numel, step))]


def pack(items, sizes: list[int], unit_bytes: int, nbytes: list[int] | None = None) -> list[WorkUnit]:
    """Work units of consecutive `items` (UnitInputs, or `Items`; in order) whose `sizes` (task
    memory) add up to at most `unit_bytes`; an item larger than that is a work unit of its own.
    `nbytes`: each item's `UnitInputs.nbytes` where the caller has it at hand. Each work unit's end
    is found by bisecting the running total of sizes (tens of thousands of small items, a few
    hundred work units); its items are a slice of the columns."""
    if nbytes is None:
        nbytes = [i.nbytes for i in items]
    items = Items.of(items)
    held, read = list(accumulate(sizes, initial=0)), list(accumulate(nbytes, initial=0))
    out, start, count = [], 0, len(items)
    while start < count:
        # the first item after `start` that the work unit has no room for (sizes are >= 0)
        stop = bisect_right(held, held[start] + unit_bytes, start + 2) - 1
        out.append(WorkUnit(items[start:stop], read[stop] - read[start]))
        start = stop
    return out


def state_bytes(tensors: int, inputs: int, planned: int, models: int) -> int:
    """Memory the client holds for the run's bookkeeping: `tensors` tensors read from `inputs`
    checkpoints, `planned` of them planned before pass 2 for `models` fine-tunes each."""
    return tensors * (TENSOR_STATE + INPUT_STATE * inputs) + planned * models * PLAN_STATE


def unit_budget(memory_limit: int, workers: int, processes: int, state: int = 0) -> int:
    """Bytes per unit such that `workers` concurrent tasks fit the memory limit, next to the
    processes themselves and the client's `state` (see `state_bytes`)."""
    free = memory_limit - PROCESS_BASELINE * processes - state - TASK_OVERHEAD * workers
    per_task = free // max(1, workers)
    if per_task < MIN_UNIT_BYTES:
        need = PROCESS_BASELINE * processes + state + (TASK_OVERHEAD + MIN_UNIT_BYTES) * workers
        held = f", {state / 2**20:.0f} MiB of it to keep track of every tensor" if state >= 64 << 20 else ""
        who, fewer = (f"{workers} worker(s)", " (or use fewer workers)") if workers else ("the client of a cluster", "")
        raise UsageError(f"--memory-limit {memory_limit / 2**20:.0f} MiB is too small for {who}; "
                         f"need at least {need / 2**20:.0f} MiB{held}{fewer}")
    return per_task


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection inside: building tens of thousands of long-lived objects (and
    no cycles) makes the collector walk a growing heap again and again, for no garbage."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def frozen_bookkeeping():
    """The run's bookkeeping built with the collector paused (a catalogue of 100k tensors: a sixth
    of the start-up otherwise), then frozen out of later collections for the rest of the run.
    Frozen before the collector resumes: the first collection after it would otherwise walk every
    object made in the pause (~35 ms for a 45k-tensor set's bookkeeping), all of them young."""
    with collector_paused():
        yield
        gc.freeze()


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
        # DELLA keep masks of a unit planned in its own pass-2 task (`merge_pass._merged` asks for
        # them with `keep_della_masks`): one row per model and what each row was made with
        # (`statistics.Della`), which its merge takes instead of ranking the rows again
        # (`methods.gta.della_masks`); None elsewhere (pass 1 keeps no mask)
        self.della_masks: np.ndarray | None = None
        self.della_keys: dict | None = None

    def keep_della_masks(self) -> None:
        """Keep the DELLA masks its statistics make, for its merge."""
        self.della_keys = {}

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


BATCH_MAX_NUMEL = 1 << 16  # elements of a whole tensor that pass 2 merges in a batch (`BatchRows`)
BATCH_MAX_ITEMS = 4096  # tensors per batch: planning arrays of ~0.5 KB per tensor stay within TASK_OVERHEAD
BATCH_MAX_BYTES = 16 << 20  # rows and output of a batch: a work unit of many tensors runs as several batches, so a
# thread's buffers stay near this size, not the whole work unit's. Each batch costs ~0.5 ms of bookkeeping (reads,
# writes, parameter records): 16 MiB against 4 MiB cut a 45k-tensor task arithmetic merge's batches 190 -> 55 and its
# workers' CPU by 0.06-0.14 s (7 runs each), for +27 MB max RSS (unfused ties: 269 -> 296 MB)


def batch_key(inp: UnitInputs) -> tuple | None:
    """Consecutive units with equal keys may share one `BatchRows`; None when a unit may not join
    one: it must be a whole small tensor whose inputs are all stored plain in one float dtype
    (read raw, nothing decoded or adapted). The key: (dtype, fine-tunes, has a base)."""
    u, base, models = inp.unit, inp.base, inp.models
    first = models[0]
    n = u.flat_stop - u.flat_start
    dtype = first.dtype
    if u.flat_start or n > BATCH_MAX_NUMEL or dtype not in FLOAT_DTYPES or n * DTYPE_SIZES[dtype] != first.nbytes:
        return None
    for e in models:
        if type(e) is not TensorEntry or e.dtype != dtype:
            return None
    if base is not None and (type(base) is not TensorEntry or base.dtype != dtype):
        return None
    return dtype, len(models), base is not None


def batch_spans(code: np.ndarray, held: list[int]) -> list[tuple[int, int]]:
    """The batches of a work unit's items as ranges [lo, hi): each run of equal non-zero `code`s
    (items that may share a `BatchRows`, 0 for one that may not) cut greedily where the next item
    would pass BATCH_MAX_ITEMS items or BATCH_MAX_BYTES of `held` bytes (at least one item each).
    Both passes batch by this one rule."""
    n = len(held)
    change = [0, *(np.flatnonzero(code[1:] != code[:-1]) + 1).tolist(), n]
    total = [0, *accumulate(held)]
    spans = []
    for a, b in zip(change, change[1:]):
        if not code[a]:
            continue
        lo = a
        while lo < b:
            hi = max(bisect_right(total, total[lo] + BATCH_MAX_BYTES, lo + 1, b + 1) - 1, lo + 1)
            hi = min(hi, lo + BATCH_MAX_ITEMS)
            spans.append((lo, hi))
            lo = hi
    return spans


def key_codes(keys: list) -> np.ndarray:
    """`batch_spans`' codes of items given their batch keys (None: may not join a batch): equal
    keys, equal non-zero codes."""
    codes: dict = {}
    return np.array([0 if k is None else codes.setdefault(k, len(codes) + 1) for k in keys], np.int64)


class BatchRows:
    """Consecutive whole small tensors of one work unit with one `batch_key`, read
    together: one positional read per input per run of tensors stored back to back in one file,
    where per-tensor reads and per-tensor Python cost more than the merging itself (an MoE
    checkpoint ships tens of thousands of such tensors).

    `src[i]` holds input i's values (base first when there is one) as raw bit patterns of
    `dtype`, item k in columns starts[k]:starts[k+1]; `raw` is the same bytes. `items`: whole
    tensors (`Items`); `inputs`: their entries per input (base first), when the caller has them at hand."""

    def __init__(self, items: Items, inputs: list[list[TensorEntry]] | None = None):
        from .kernels import CONTAINER

        self.items = items
        self.has_base = items.bases[0] is not None
        self.dtype = items.models[0][0].dtype
        if inputs is None:
            inputs = items.per_input()
        itemsize = DTYPE_SIZES[self.dtype]
        nbytes = np.fromiter(map(_NBYTES, inputs[0]), np.int64, len(items))
        self.starts = np.zeros(len(items) + 1, np.int64)  # whole tensors of one dtype: bytes / itemsize
        np.cumsum(nbytes // itemsize, out=self.starts[1:])
        total = int(self.starts[-1])
        self.raw = scratch("rows", len(inputs) * total * itemsize).reshape(len(inputs), total * itemsize)
        for row, entries in zip(self.raw, inputs):
            _read_runs(entries, nbytes, row)
        self.src = self.raw.view(CONTAINER[self.dtype])

    is_float = True

    def rows(self, k: int) -> "UnitRows":
        """Item k as a `UnitRows` (a contiguous copy of its columns: they are small), for the
        per-tensor path and error messages."""
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        rows = UnitRows.__new__(UnitRows)
        rows.inp, rows.has_base, rows.dtype = self.items[k], self.has_base, self.dtype
        rows.src = np.ascontiguousarray(self.src[:, a:b])
        rows.raw = rows.src.view(np.uint8)
        rows.della_masks, rows.della_keys = None, None
        return rows


_NBYTES, _OFFSET, _FILE = attrgetter("nbytes"), attrgetter("offset"), attrgetter("file")


def run_bounds(offsets: np.ndarray, nbytes: np.ndarray, files: list[str]) -> list[int]:
    """Where runs of byte ranges stored back to back in one file begin (and, last, their count):
    range k+1 continues range k when it starts where k ends, in the same file. Compared as
    columns, not range by range: a batch holds thousands."""
    n = len(files)
    apart = offsets[1:] != offsets[:-1] + nbytes[:-1]
    apart |= np.fromiter(map(ne, islice(files, 1, None), files), np.bool_, n - 1)
    return [0, *(np.flatnonzero(apart) + 1).tolist(), n]


def _read_runs(entries: list[TensorEntry], nbytes: np.ndarray, dst: np.ndarray) -> None:
    """Read whole tensors `entries` (of `nbytes` bytes each) back to back into `dst` (bytes): one
    positional read per run of entries adjacent in one file. A failed run is read again entry by
    entry, so the error names the tensor."""
    from .checkpoint import read_range
    from .checkpoint.reader import read_run
    from .errors import InputError

    offsets = np.fromiter(map(_OFFSET, entries), np.int64, len(entries))
    bounds = run_bounds(offsets, nbytes, list(map(_FILE, entries)))
    at = [0, *np.cumsum(nbytes).tolist()]
    for i, j in zip(bounds, bounds[1:]):
        first, buf = entries[i], dst[at[i]:at[j]]
        try:
            if j - i == 1:
                read_range(first, 0, first.numel, buf)
            else:
                read_run(first, buf)
        except InputError:
            if j - i == 1:
                raise
            for k in range(i, j):
                e = entries[k]
                read_range(e, 0, e.numel, dst[at[k]:at[k + 1]])
