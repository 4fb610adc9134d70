"""Pass 1: statistics of the deltas, and the one driver that gathers whatever a method asks for.

A method names the statistics it needs as `Stat`s (what, of which fine-tune, over which span of a
tensor). Each kind is a reduction in the spirit of dask's: `compute` a partial result on one unit's
rows, `combine` partials (associatively, so results cannot depend on chunking or on the order Dask
merges them), and `finalize`. `drive` asks the method for statistics round after round — the
exact threshold's second round is just a statistic whose arguments come from the first — until it
can plan. Where the numbers come from is the caller's choice: `StatsEngine` runs Dask passes over
the work units holding the tensors (partial results folded per tensor as they arrive, results kept
in the zarr store), `inline` computes them from the rows a pass-2 task already holds (a tensor
that is one unit: same functions, one read less).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import kernels, summaries
from .errors import InputError
from .summaries import Summary
from .units import scratch

log = logging.getLogger("dppa_stream")


@dataclass(frozen=True, slots=True)
class Stat:
    """One statistic of one tensor's deltas.

    kind   "abs": `Summary` of |delta| (histogram of its top 16 bits; `args=("sums",)` adds exact sums
           when deltas are float32 — bf16 deltas get them from the histogram for free);
           "bins": per unit, the low-16-bit counts of |delta| inside the top-16-bit bins `args`
           (resolves a threshold exactly and gives the ties before each unit);
           "ranks": (unit, ((key, below, equal) per rank)) of |delta| at the 1-based ranks `args`,
           for a small tensor held whole in one unit (`inline`: both rounds above in one);
           "dare": exact Σ|delta| and Σ|delta * keep-mask| for the counter RNG `args = (key, limit)`;
           "della": the same for DELLA's rank-based mask, `args = (key, density, epsilon)`;
           "gram": exact pairwise dot products of the models' deltas (`args=("deltas",)`) or of
           the inputs themselves (`("inputs",)`), upper triangle in row-major order;
           "var" / "var_bins": histogram (and non-zero count) / boundary-bin counts of the
           per-element variance of the deltas across models (SCE);
           "sce_sq": per model, exact Σ delta² over the elements SCE selects, `args = (kind,
           value, ties kept, ties before each unit)`;
           "ram": per model, its changed elements shared with others and unique to it (`args=(eps,)`);
           "arcee" / "arcee_bins": histogram / boundary-bin counts of Arcee fusion's importance.
    model  the fine-tune (0-based, excluding the base).
    span   flat element range inside the tensor (one expert of a fused tensor), None for all of it.
    bf16   deltas rounded to bfloat16 (DPPA's reference semantics).
    """

    kind: str
    model: int
    span: tuple[int, int] | None = None
    bf16: bool = False
    args: tuple = ()

    def key(self) -> str:
        span = "" if self.span is None else f"{self.span[0]}-{self.span[1]}"
        return f"{self.kind}|{self.model}|{span}|{int(self.bf16)}|{','.join(map(str, self.args))}"


@dataclass(frozen=True, slots=True)
class DareSums:
    full: float  # Σ|delta|, exactly rounded
    kept: float  # Σ|delta * mask|


def _local_range(stat: Stat, unit, numel: int) -> tuple[int, int] | None:
    """The unit-local element range of a stat's span, or None when they do not overlap."""
    lo, hi = stat.span if stat.span is not None else (0, numel)
    a, b = max(lo, unit.flat_start), min(hi, unit.flat_start + unit.numel)
    return (a - unit.flat_start, b - unit.flat_start) if a < b else None


def compute(rows, stats: list[Stat], check_finite: bool) -> dict[Stat, object]:
    """Partial results of `stats` (all of one tensor) on one unit's rows."""
    unit = rows.inp.unit
    code = kernels.CODES[rows.dtype]
    bad = np.zeros(rows.src.shape[0], np.int64)
    out: dict[Stat, object] = {}
    numel = rows.inp.models[0].numel
    groups: dict[tuple, list[Stat]] = {}
    for st in stats:
        rng = _local_range(st, unit, numel)
        if rng is None:
            out[st] = _empty(st, unit)
        elif st.kind == "abs":
            groups.setdefault((rng, st.bf16, "sums" in st.args), []).append(st)
        elif st.kind == "bins":
            bins = np.array(st.args, np.int64)
            counts = _zeroed("bins", len(bins), 1 << 16)
            kernels.bin_counts(rows.src, code, st.model, rng[0], rng[1], st.bf16, bins, counts, bad)
            out[st] = {unit.index: [_take(c) for c in counts]}
        elif st.kind == "ranks":
            ranks = np.array(st.args, np.int64)
            if ranks.size and not (ranks.min() >= 1 and ranks.max() <= rng[1] - rng[0]):
                raise ValueError(f"ranks {st.args} outside 1..{rng[1] - rng[0]}")
            found = np.zeros((len(ranks), 3), np.int64)
            keys = scratch("keys", 8 * (rng[1] - rng[0])).view(np.int64)  # this thread's (`direct_ranks`: small)
            kernels.exact_ranks(rows.src, code, st.model, rng[0], rng[1], st.bf16, ranks, found, keys,
                                scratch("digits", 8 << 11).view(np.int64), bad)
            out[st] = (unit.index, tuple(tuple(int(x) for x in f) for f in found))
        elif st.kind == "dare":
            full, kept = np.zeros(256, np.int64), np.zeros(256, np.int64)
            key, limit = st.args
            kernels.dare_sums(rows.src, code, st.model, rng[0], rng[1], unit.flat_start + rng[0], np.uint64(key),
                              np.uint64(limit), full, kept, bad)
            out[st] = (full, kept)
        else:
            out[st] = _compute_more(rows, st, code, rng, bad)
    for (rng, bf16, sums), group in groups.items():
        models = np.array([st.model for st in group], np.int64)
        hists = _zeroed("hist", len(group), summaries.HIST_BINS)
        mants = np.zeros((len(group), 256), np.int64)
        kernels.abs_summaries(rows.src, code, models, rng[0], rng[1], bf16, sums and not bf16, hists, mants, bad)
        for st, h, mt in zip(group, hists, mants):
            bins, counts = _take(h)
            narrow = np.int32 if rng[1] - rng[0] < 1 << 31 else np.int64  # counts of fewer elements fit 32 bits
            out[st] = Summary(rng[1] - rng[0], None, summaries.hist_mant_sums(bins, counts) if bf16 else mt,
                              sparse=(bins.astype(np.int32), counts.astype(narrow)))
    if check_finite:
        check_nonfinite(rows, bad)
    return out


def _compute_more(rows, st: Stat, code: int, rng: tuple[int, int], bad: np.ndarray):
    """The statistics of the methods beyond the delta family (whole units: no spans)."""
    unit = rows.inp.unit
    lo, hi = rng
    if st.kind == "gram":
        deltas = st.args[0] == "deltas"
        n = rows.src.shape[0] - (1 if deltas else 0)
        words = np.zeros((2, n * (n + 1) // 2, kernels.GRAM_BUCKETS), np.int64)
        kernels.gram_sums(rows.src, code, lo, hi, deltas, words[0], words[1], bad)
        return words
    if st.kind in ("var", "var_bins", "arcee", "arcee_bins"):
        bins = np.array(st.args, np.int64)
        hist = np.zeros(summaries.HIST_BINS * (2 if st.kind.startswith("arcee") else 1), np.int64)
        counts = _zeroed("bins", len(bins), 1 << 16)
        if st.kind.startswith("var"):
            if bins.size:
                kernels.variance_bins(rows.src, code, lo, hi, bins, counts, bad)
            else:
                nnz = kernels.variance_hist(rows.src, code, lo, hi, hist, bad)
                return Summary(hi - lo, hist).compact(), int(nnz)
        else:
            row_len = rows.inp.models[0].shape[-1] if rows.inp.models[0].shape else 1
            kernels.arcee_importance(rows.src, code, lo // row_len, hi // row_len, row_len, bins, hist, counts, bad)
            if not bins.size:
                return hist
        return {unit.index: [_take(c) for c in counts]}
    if st.kind == "sce_sq":
        kind, value, _, starts = st.args
        budget = np.array([dict(starts).get(unit.index, (0,))[0]], np.int64)
        budget[0] = max(0, st.args[2] - budget[0])
        K = rows.src.shape[0] - 1
        words = np.zeros((2, K, kernels.GRAM_BUCKETS), np.int64)
        kernels.sce_squares(rows.src, code, lo, hi, kind, np.float32(value), budget, words[0], words[1], bad)
        return words
    if st.kind == "ram":
        K = rows.src.shape[0] - 1
        shared, unique = np.zeros(K, np.int64), np.zeros(K, np.int64)
        kernels.ram_counts(rows.src, code, lo, hi, np.float32(st.args[0]), shared, unique, bad)
        return shared, unique
    if st.kind == "della":
        from .methods.gta import della_layout

        key, density, epsilon = st.args
        mask = np.zeros(unit.numel, np.uint8)
        d1, rest, slices = della_layout(rows.inp.models[0].shape, unit)
        kernels.della_mask(rows.src, code, st.model, 0, slices, d1, rest, unit.flat_start, np.uint64(key), density,
                           epsilon, mask, bad)
        full, kept = np.zeros(256, np.int64), np.zeros(256, np.int64)
        kernels.masked_abs_sums(rows.src, code, st.model, lo, hi, mask, full, kept, bad)
        return full, kept
    raise ValueError(f"unknown statistic {st.kind!r}")


def exact_products(words: np.ndarray) -> list[float]:
    """The sums `gram_sums`/`sce_squares` accumulated (two int64 words per exponent bucket),
    exactly rounded to float64."""
    return [float(Fraction(total, 1 << 300)) for total in exact_integers(words)]


def exact_integers(words: np.ndarray) -> list[int]:
    """Sums kept as two int64 words per exponent bucket e (value (high * 2**30 + low) * 2**e units)
    as exact integers in units (they add exactly)."""
    out = []
    for high, low in zip(words[0], words[1]):
        total = 0
        nz = np.flatnonzero(high | low)
        for e, h, lo in zip(nz.tolist(), high[nz].tolist(), low[nz].tolist()):  # Python ints: exact
            total += ((h << 30) + lo) << e
        out.append(total)
    return out


_buffers = threading.local()


def _zeroed(slot: str, rows: int, width: int) -> np.ndarray:
    """This thread's reusable int64 counts of shape (rows, width), all zero: the kernels add into
    them and `_take` hands the counts in use back zeroed. A fresh 256-512 KiB array per tensor
    (mapped and zeroed page by page) cost more than counting a small tensor's elements."""
    pool = getattr(_buffers, "pool", None)
    if pool is None:
        pool = _buffers.pool = {}
    buf = pool.get(slot)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
        buf = pool[slot] = np.zeros((max(rows, 2), width), np.int64)
    return buf[:rows]


def _take(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices in use, their counts) of one row of `_zeroed` counts, which is left all zero.
    Callers take every row a kernel filled before anything can raise."""
    nz = np.flatnonzero(counts != 0)  # numpy's fast path for booleans: 5x faster than on int64
    taken = counts[nz]
    counts[nz] = 0
    return nz, taken


_PER_UNIT = ("bins", "var_bins", "arcee_bins")


def _empty(stat: Stat, unit):
    if stat.kind == "abs":
        return Summary()
    if stat.kind == "arcee":
        return np.zeros(2 * summaries.HIST_BINS, np.int64)
    if stat.kind in _PER_UNIT:
        return {}
    if stat.kind == "var":
        return Summary(), 0
    if stat.kind in ("gram", "sce_sq"):
        return None
    return (np.zeros(256, np.int64), np.zeros(256, np.int64))


def combine(stat: Stat, a, b):
    """Merge two partial results of the same statistic (associative and commutative)."""
    if stat.kind == "abs":
        return (a + b).compact()
    if stat.kind == "arcee":
        return a + b
    if stat.kind in _PER_UNIT:
        return {**a, **b}
    if stat.kind in ("gram", "sce_sq"):
        return b if a is None else a if b is None else a + b
    if stat.kind == "var":
        return (a[0] + b[0]).compact(), a[1] + b[1]
    return (a[0] + b[0], a[1] + b[1])


def finalize(stat: Stat, partial):
    if stat.kind in ("dare", "della"):
        return DareSums(summaries.exact_sum(partial[0]), summaries.exact_sum(partial[1]))
    if stat.kind in ("gram", "sce_sq"):
        return [] if partial is None else exact_products(partial)
    if stat.kind == "ram":
        return [int(x) for x in partial[0]], [int(x) for x in partial[1]]
    return partial


def check_nonfinite(rows, bad: np.ndarray) -> None:
    """Refuse NaN/Inf inputs (they would silently poison statistics and merges): one line naming
    the file, the tensor, how many and where."""
    for i, n in enumerate(bad):
        if n:
            e = rows.inp.entries[i]
            u = rows.inp.unit
            count = kernels.count_nonfinite(rows.src[i], kernels.CODES[rows.dtype])
            raise InputError(f"{e.file}: tensor {e.name!r} has {count} NaN/Inf values in elements "
                             f"{u.flat_start}..{u.flat_stop - 1}; pass --allow-nonfinite to merge anyway")


# --- the driver ------------------------------------------------------------------------------------

class Results:
    """Statistics gathered so far, by (tensor, Stat)."""

    def __init__(self, direct_ranks: bool = False):
        self.values: dict[tuple[str, Stat], object] = {}
        self.direct_ranks = direct_ranks  # ranks may be selected from the rows at hand (`inline`)

    def __contains__(self, key) -> bool:
        return key in self.values

    def get(self, tensor: str, stat: Stat):
        return self.values.get((tensor, stat))

    def of(self, tensor: str) -> "TensorResults":
        return TensorResults(self, tensor)

    def update(self, values: dict) -> None:
        self.values.update(values)


@dataclass(frozen=True)
class TensorResults:
    """The statistics of one tensor (what a per-tensor sparsifier sees)."""

    results: Results
    tensor: str

    def __getitem__(self, stat: Stat):
        return self.results.values[(self.tensor, stat)]

    def __contains__(self, stat: Stat) -> bool:
        return (self.tensor, stat) in self.results.values

    @property
    def direct_ranks(self) -> bool:
        return self.results.direct_ranks


def drive(method, catalogue, tensors: list[str], compute_fn):
    """Gather every statistic `method` asks for on `tensors` (rounds until it asks for nothing
    new), then return its plan. `compute_fn({tensor: [Stat]}) -> {(tensor, Stat): result}`."""
    got = Results(getattr(compute_fn, "direct_ranks", False))
    while True:
        wanted = method.statistics(catalogue, tensors, got)
        missing = {t: [s for s in dict.fromkeys(ss) if (t, s) not in got] for t, ss in wanted.items()}
        missing = {t: ss for t, ss in missing.items() if ss}
        if not missing:
            return method.plan(catalogue, tensors, got)
        got.update(compute_fn(missing))


DIRECT_RANKS_MAX = 1 << 16  # elements of a tensor whose exact ranks `inline` selects directly ("ranks")


def inline(rows, check_finite: bool):
    """A `compute_fn` answering from one unit's rows (the whole tensor)."""

    def compute_fn(wanted: dict[str, list[Stat]]) -> dict:
        out = {}
        for t, stats in wanted.items():
            for st, partial in compute(rows, stats, check_finite).items():
                out[(t, st)] = finalize(st, partial)
        return out

    # a small tensor's ranks are selected from its keys (one pass, scratch of 8 bytes per element),
    # a larger one's found from histograms (fixed memory; their cost vanishes next to its elements)
    compute_fn.direct_ranks = rows.inp.unit.numel <= DIRECT_RANKS_MAX
    return compute_fn


def result_bytes(stat: Stat, numel: int) -> int:
    """About what a statistic's partial result on `numel` elements holds in memory: for a small
    tensor a histogram holds more than its data, so pass 1 packs work units by this too."""
    if stat.kind in ("abs", "var", "arcee"):
        return 256 + 8 * min(numel, summaries.HIST_BINS)
    if stat.kind in ("gram", "sce_sq"):
        return 2 * 8 * kernels.GRAM_BUCKETS * 16  # two words per bucket, for the pairs of up to 5 inputs
    if stat.kind in _PER_UNIT:
        return 256 + 16 * min(numel, 1 << 16) * max(1, len(stat.args))
    return 4096


def stats_task(work, stats: tuple, check_finite: bool) -> list[dict]:
    """Dask task: partial results of each unit's statistics (`stats[i]` for unit i of the work unit)."""
    from .units import UnitRows

    return [compute(UnitRows(inp), wanted, check_finite) for inp, wanted in zip(work.items, stats)]


def combine_parts(a: dict, b: dict) -> dict:
    """Partial results of one tensor from two sets of its units, merged."""
    out = dict(a)
    for st, v in b.items():
        out[st] = combine(st, out[st], v) if st in out else v
    return out


FLUSH_BYTES = 16 << 20  # finished results held (as the store packs them) before they go to the store


def _held(value) -> int:
    """About the bytes a finished result takes packed (int64 values; more in memory)."""
    if isinstance(value, Summary):
        return 200 + 16 * len(value.sparse[0])
    if isinstance(value, dict):  # per-unit boundary-bin details
        return 200 + sum(16 * len(v) for bins in value.values() for v, _ in bins)
    return 256


class StatsEngine:
    """A `compute_fn` that runs statistics passes over the work units holding the wanted tensors on
    the executor, folds each tensor's partial results as they arrive (exact integer sums: the
    order does not matter) and saves finished ones to the store in batches, keeping only what the
    store hands back (summaries load their histograms when queried). So resume and the factor
    search never recompute statistics, and memory does not grow with the tensor count."""

    def __init__(self, executor, inputs, units: dict, progress, unit_bytes: int, store, check_finite: bool = True):
        self.ex, self.inputs, self.units, self.progress = executor, inputs, units, progress
        self.unit_bytes, self.store, self.check_finite = unit_bytes, store, check_finite
        self.bytes_read = 0
        self.rounds = 0

    def __call__(self, wanted: dict[str, list[Stat]]) -> dict:
        from .units import UnitInputs, pack

        out, todo = {}, {}
        for t, stats in wanted.items():
            for st in stats:
                got = self.store.get(t, st)
                if got is None:
                    todo.setdefault(t, []).append(st)
                else:
                    out[(t, st)] = got
        if not todo:
            return out
        items, needs, remaining = [], {}, {}
        for t, stats in todo.items():
            entries = self.inputs.entries(t)
            numel = self.inputs.entry(t).numel
            for u in self.units[t]:
                need = [st for st in stats if _local_range(st, u, numel) is not None]
                if need:
                    inp = UnitInputs(u, *entries)
                    items.append(inp)
                    needs[id(inp)] = need
                    remaining[t] = remaining.get(t, 0) + 1
        held = [inp.nbytes + sum(result_bytes(st, inp.unit.numel) for st in needs[id(inp)]) for inp in items]
        works = pack(items, held, self.unit_bytes)
        calls = [(w, tuple(needs[id(inp)] for inp in w.items), self.check_finite) for w in works]
        sizes = [w.nbytes for w in works]
        needs.clear()
        partial: dict[str, dict] = {}
        finished: dict = {}
        waiting = [0]

        def keep(t, st, value):
            finished[(t, st)] = value
            waiting[0] += _held(value)
            if waiting[0] >= FLUSH_BYTES:
                self._save(finished, out)
                waiting[0] = 0

        def fold(i, results):
            for inp, part in zip(works[i].items, results):
                t = inp.unit.tensor
                partial[t] = combine_parts(partial[t], part) if t in partial else part
                remaining[t] -= 1
                if not remaining[t]:
                    parts = partial.pop(t)
                    for st in todo[t]:
                        keep(t, st, finalize(st, parts.get(st, _empty(st, None))))

        self.rounds += 1
        self.bytes_read += sum(sizes)
        kinds = sorted({st.kind for ss in todo.values() for st in ss})
        with self.progress.phase("stats" if kinds == ["abs"] else "+".join(kinds), sum(sizes)) as step:
            self.ex.map(stats_task, calls, sizes, step, fold)
        for t, stats in todo.items():  # a tensor none of whose units holds a wanted span
            for st in stats:
                if (t, st) not in finished and (t, st) not in out:
                    keep(t, st, finalize(st, _empty(st, None)))
        self._save(finished, out)
        self.ex.trim()
        return out

    def _save(self, finished: dict, out: dict) -> None:
        """Move finished results to the store, and what it hands back to `out`."""
        self.store.put(finished)
        for t, st in finished:
            out[(t, st)] = self.store.get(t, st)
        finished.clear()
