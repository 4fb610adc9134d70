"""Pass 1: statistics of the deltas, and the one driver that gathers whatever a method asks for.

A method names the statistics it needs as `Stat`s (what, of which fine-tune, over which span of a
tensor). Each kind is a reduction in the spirit of dask's: `compute` a partial result on one unit's
rows, `combine` partials (associatively, so results cannot depend on chunking or on the order Dask
merges them), and `finalize`. `drive` asks the method for statistics round after round — the
exact threshold's second round is just a statistic whose arguments come from the first — until it
can plan. Where the numbers come from is the caller's choice: `StatsEngine` runs Dask passes over
the work units holding the tensors (partial results folded per tensor as they arrive, results kept
in the zarr store, read back when asked for), `inline` computes them from the rows a pass-2 task already holds (a tensor
that is one unit: same functions, one read less).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate
from typing import ClassVar

import numpy as np

from . import kernels, summaries
from .errors import InputError
from .summaries import Summary
from .units import scratch

log = logging.getLogger("dppa_stream")


@dataclass(frozen=True, slots=True)
class Stat:
    """One statistic of one tensor's deltas; each kind is a subclass that computes, combines,
    finalizes and stores itself, so the driver and the store know no kind (adding one is one
    class: see the README's layout section).

    model  the fine-tune (0-based, excluding the base).
    span   flat element range inside the tensor (one expert of a fused tensor), None for all of it.
    bf16   deltas rounded to bfloat16 (DPPA's reference semantics).
    args   what else the kind needs (hashable: a Stat is a dictionary key).
    """

    model: int
    span: tuple[int, int] | None = None
    bf16: bool = False
    args: tuple = ()

    name: ClassVar[str] = ""  # the kind's name in store keys and progress labels: never reuse one

    def key(self) -> str:
        span = "" if self.span is None else f"{self.span[0]}-{self.span[1]}"
        return f"{self.name}|{self.model}|{span}|{int(self.bf16)}|{','.join(map(str, self.args))}"

    # --- what a kind defines (compute, empty, combine, pack, unpack at least) ----------------------

    @classmethod
    def compute_all(cls, rows, code: int, todo: list[tuple["Stat", tuple[int, int]]], bad) -> dict:
        """Partial results of `todo` ((stat, unit-local element range), all of this kind) on one
        unit's rows; a kind whose kernel serves many stats in one pass overrides this."""
        return {st: st.compute(rows, code, lo, hi, bad) for st, (lo, hi) in todo}

    def compute(self, rows, code: int, lo: int, hi: int, bad: np.ndarray):
        """The partial result on the unit's elements [lo, hi) (`bad` counts NaN/Inf per input)."""
        raise NotImplementedError

    @classmethod
    def compute_batch(cls, batch, todo: list[list["Stat"]], check_finite: bool) -> list[dict] | None:
        """Partial results of many small whole tensors read as one `units.BatchRows` (`todo[k]`:
        item k's stats, all of this kind), or None: then each is computed on its own (`compute`)."""
        return None

    def empty(self):
        """The partial result of no elements (a unit outside the span)."""
        raise NotImplementedError

    def combine(self, a, b):
        """Two partial results merged: associative and commutative (exact integers), so results
        cannot depend on chunking or on the order Dask merges them."""
        raise NotImplementedError

    def finalize(self, partial):
        """What a method sees, from the tensor's combined partial result."""
        return partial

    def pack(self, value) -> np.ndarray | list[np.ndarray]:
        """A finalized result as int64 values for the store (float64 values by their bits): an
        array, or a list of integer arrays that the store writes back to back."""
        raise NotImplementedError

    def unpack(self, record: np.ndarray, reread: tuple | None = None):
        """The result `pack` stored; `reread` is (function, argument) that returns the record
        again, for results that load lazily (a summary's histogram)."""
        raise NotImplementedError

    def result_bytes(self, numel: int) -> int:
        """About what a partial result on `numel` elements holds in memory: for a small tensor a
        histogram holds more than its data, so pass 1 packs work units by this too."""
        return 4096

    def held_bytes(self, value) -> int:
        """About the bytes a finished result takes packed, while it waits for the store."""
        return 256


# --- histograms of |delta| and exact ranks -----------------------------------------------------------

_TOTAL_WORDS = 6  # Σ|delta| of a summary in units of 2**-150 fits 6 64-bit words: < 256 exponents of < 2**63 each
SPARSE_MAX = 1 << 16  # ranges of up to this many elements are summarised sparse, many per kernel call (a dense
# histogram's 32k bins cost more to scan than such a range's elements; past it, the scan is noise)
SPARSE_ROOM = 1 << 18  # bins a sparse kernel call has room for: 2 MiB of scratch per thread, inside TASK_OVERHEAD
# (room for a whole batch, 16 MiB of rows, was up to 45 MiB: the DPPA MoE merge's peak grew by ~40 MiB)


class Abs(Stat):
    """`Summary` of |delta| (histogram of its top 16 bits); `args=("sums",)` adds exact sums when
    deltas are float32 (bf16 deltas get them from the histogram for free). One kernel pass serves
    every model's (`compute_all`)."""

    __slots__ = ()
    name = "abs"

    @classmethod
    def compute_all(cls, rows, code, todo, bad):
        groups: dict[tuple, list[Stat]] = {}
        for st, rng in todo:
            groups.setdefault((rng, st.bf16, "sums" in st.args), []).append(st)
        out, small = {}, {}
        for (rng, bf16, sums), group in groups.items():
            if rng[1] - rng[0] <= SPARSE_MAX:  # (the experts of a fused tensor: many ranges, one kernel call)
                small.setdefault((bf16, sums, tuple(st.model for st in group)), []).append((rng, group))
                continue
            models = np.array([st.model for st in group], np.int64)
            hists = _zeroed("hist", len(group), summaries.HIST_BINS)
            mants = np.zeros((len(group), 256), np.int64)
            kernels.abs_summaries(rows.src, code, models, rng[0], rng[1], bf16, sums and not bf16, hists, mants, bad)
            for st, h, mt in zip(group, hists, mants):
                bins, counts = _take(h)
                narrow = np.int32 if rng[1] - rng[0] < 1 << 31 else np.int64  # counts of fewer elements fit 32 bits
                out[st] = Summary(rng[1] - rng[0], None, summaries.hist_mant_sums(bins, counts) if bf16 else mt,
                                  sparse=(bins.astype(np.int32), counts.astype(narrow)))
        for (bf16, sums, _), ranges in small.items():
            found, range_bad = cls._sparse(rows.src, code, np.array([r for r, _ in ranges], np.int64).reshape(-1, 2),
                                           [g for _, g in ranges], bf16, sums)
            bad += range_bad.sum(axis=0)
            for part in found:
                out.update(part)
        return out

    @classmethod
    def compute_batch(cls, batch, todo, check_finite):
        """Summaries of a batch of small whole tensors in one kernel call (`_sparse`), when every
        item wants the same summaries, each of the whole tensor; an MoE model's experts all do."""
        first = todo[0]
        bf16, sums = first[0].bf16, "sums" in first[0].args
        wanted = [(st.model, bf16, st.args) for st in first]
        numel = np.diff(batch.starts)
        if any(st.bf16 != bf16 or ("sums" in st.args) != sums for st in first) or \
                any([(st.model, st.bf16, st.args) for st in sts] != wanted or
                    any(st.span is not None and st.span != (0, n) for st in sts) for sts, n in zip(todo, numel.tolist())):
            return None
        out, bad = cls._sparse(batch.src, kernels.CODES[batch.dtype], np.stack([batch.starts[:-1], batch.starts[1:]], 1),
                               todo, bf16, sums)
        if check_finite:
            for k in np.flatnonzero(bad.any(axis=1)).tolist():
                check_nonfinite(batch.rows(k), bad[k])
        return out

    @staticmethod
    def _sparse(src, code, ranges: np.ndarray, stats: list[list[Stat]], bf16: bool, sums: bool):
        """The summaries of columns ranges[k] of `src` for stats[k] (one per fine-tune, the same
        fine-tunes for every range), from `kernels.abs_batch_summaries` calls that write them
        sparse: ([{stat: Summary} per range], NaN/Inf counts per range and input). Each call
        takes ranges with room for SPARSE_ROOM bins in this thread's scratch (a bin per element
        and fine-tune at most; an MoE expert uses about a third); the bins in use are copied out,
        and the summaries' arrays are views of that copy, which pass 1 counts (`result_bytes`)."""
        models = np.array([st.model for st in stats[0]], np.int64)
        numel = (ranges[:, 1] - ranges[:, 0]).tolist()
        room = [min(n, summaries.HIST_BINS) * len(models) for n in numel]
        bad = np.zeros((len(ranges), src.shape[0]), np.int64)
        out, size = [], 8 * _TOTAL_WORDS
        for lo, hi in summaries.size_batches(room, SPARSE_ROOM):
            space = sum(room[lo:hi])
            bins = scratch("sparse_bins", 4 * space).view(np.int32)  # ranges of < 2**31 elements: 32-bit counts
            counts = scratch("sparse_counts", 4 * space).view(np.int32)
            at = np.empty((hi - lo, len(models) + 1), np.int64)
            words = np.empty((hi - lo, len(models), _TOTAL_WORDS), np.uint64)
            used = kernels.abs_batch_summaries(src, code, np.ascontiguousarray(ranges[lo:hi, 0]),
                                               np.ascontiguousarray(ranges[lo:hi, 1]), models, bf16, sums and not bf16,
                                               _zeroed("hist", len(models), summaries.HIST_BINS),
                                               _zeroed("touched", len(models), summaries.HIST_BINS), bins, counts, at,
                                               words, bad[lo:hi])
            bins, counts, blob = bins[:used].copy(), counts[:used].copy(), memoryview(words.tobytes())
            for k, (sts, n, bounds) in enumerate(zip(stats[lo:hi], numel[lo:hi], at.tolist())):
                o = k * len(models) * size
                out.append({st: Summary(n, sparse=(bins[a:b], counts[a:b]),
                                        total=int.from_bytes(blob[o + i * size:o + (i + 1) * size], "little"))
                            for i, (st, a, b) in enumerate(zip(sts, bounds, bounds[1:]))})
        return out, bad

    def empty(self):
        return Summary()

    def combine(self, a, b):
        return (a + b).compact()

    def pack(self, value):
        return summaries.record_parts(value)

    def unpack(self, record, reread=None):
        return summaries.from_record(record, reread)  # a run keeps one per tensor and model: load lazily

    def result_bytes(self, numel):
        return 256 + 8 * min(numel, summaries.HIST_BINS)

    def held_bytes(self, value):
        return 200 + 16 * len(value.sparse[0])


class PerUnitBins(Stat):
    """Per unit, the low-16-bit counts of a key inside the top-16-bit bins `args`: resolves a
    threshold exactly and gives the ties before each unit (round 2 of `methods.ranks.Ranks`).
    Result: {unit index: [(low bits in use, their counts) per bin]}."""

    __slots__ = ()

    def compute(self, rows, code, lo, hi, bad):
        counts = _zeroed("bins", len(self.args), 1 << 16)
        self.count(rows, code, lo, hi, np.array(self.args, np.int64), counts, bad)
        return {rows.inp.unit.index: [_take(c) for c in counts]}

    def count(self, rows, code, lo, hi, bins, counts, bad) -> None:
        raise NotImplementedError

    def empty(self):
        return {}

    def combine(self, a, b):
        return {**a, **b}

    def pack(self, value):
        out = [len(value)]
        for unit in sorted(value):
            out += [unit, len(value[unit])]
            for vals, counts in value[unit]:
                out += [len(vals), *vals.tolist(), *counts.tolist()]
        return np.array(out, np.int64)

    def unpack(self, record, reread=None):
        a, pos, out = record, 1, {}
        for _ in range(int(a[0])):
            unit, nb = int(a[pos]), int(a[pos + 1])
            pos += 2
            bins = []
            for _ in range(nb):
                n = int(a[pos])
                bins.append((a[pos + 1:pos + 1 + n].copy(), a[pos + 1 + n:pos + 1 + 2 * n].copy()))
                pos += 1 + 2 * n
            out[unit] = bins
        return out

    def result_bytes(self, numel):
        return 256 + 16 * min(numel, 1 << 16) * max(1, len(self.args))

    def held_bytes(self, value):
        return 200 + sum(16 * len(v) for bins in value.values() for v, _ in bins)


class Bins(PerUnitBins):
    """Boundary bins of |delta| (round 2 of `Abs`)."""

    __slots__ = ()
    name = "bins"

    def count(self, rows, code, lo, hi, bins, counts, bad):
        kernels.bin_counts(rows.src, code, self.model, lo, hi, self.bf16, bins, counts, bad)



class ExactRanks(Stat):
    """Both rounds of `methods.ranks.Ranks` in one, for a small tensor held whole in the unit at
    hand (`inline`, `direct_ranks`): the keys |delta| at the 1-based ranks `args`, selected from
    the keys themselves in one pass instead of two histograms; the same answer.
    Result: (unit index, ((key bits, below, equal) per rank))."""

    __slots__ = ()
    name = "ranks"

    def compute(self, rows, code, lo, hi, bad):
        ranks = np.array(self.args, np.int64)
        if ranks.size and not (ranks.min() >= 1 and ranks.max() <= hi - lo):
            raise ValueError(f"ranks {self.args} outside 1..{hi - lo}")
        found = np.zeros((len(ranks), 3), np.int64)
        keys = scratch("keys", 16 * (hi - lo)).view(np.int64)  # this thread's (`direct_ranks`: small)
        kernels.exact_ranks(rows.src, code, self.model, lo, hi, self.bf16, ranks, found, keys,
                            scratch("digits", 8 << 11).view(np.int64), bad)
        return (rows.inp.unit.index, tuple(tuple(int(x) for x in f) for f in found))

    def empty(self):
        return None

    def combine(self, a, b):
        if a is not None and b is not None:
            raise ValueError("exact ranks come from the one unit holding the whole tensor")
        return b if a is None else a

    def pack(self, value):
        unit, found = value
        return np.array([unit, len(found), *(x for f in found for x in f)], np.int64)

    def unpack(self, record, reread=None):
        n = int(record[1])
        return (int(record[0]), tuple(tuple(int(x) for x in record[2 + 3 * i:5 + 3 * i]) for i in range(n)))

    def result_bytes(self, numel):
        return 256 + 16 * numel  # the keys (and a copy of some), on this thread's scratch

# --- exact sums -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DareSums:
    full: float  # Σ|delta|, exactly rounded
    kept: float  # Σ|delta * mask|


class KeptSums(Stat):
    """Exact Σ|delta| and Σ|delta * keep-mask| of one model (as per-exponent significand sums
    while partial; `DareSums` once finalized)."""

    __slots__ = ()

    def empty(self):
        return np.zeros(256, np.int64), np.zeros(256, np.int64)

    def combine(self, a, b):
        return a[0] + b[0], a[1] + b[1]

    def finalize(self, partial):
        return DareSums(summaries.exact_sum(partial[0]), summaries.exact_sum(partial[1]))

    def pack(self, value):
        return np.array([value.full, value.kept], np.float64).view(np.int64)

    def unpack(self, record, reread=None):
        full, kept = record.view(np.float64)
        return DareSums(float(full), float(kept))


class Dare(KeptSums):
    """DARE's mask from the counter RNG, `args = (key, limit)`."""

    __slots__ = ()
    name = "dare"

    def compute(self, rows, code, lo, hi, bad):
        full, kept = self.empty()
        key, limit = self.args
        kernels.dare_sums(rows.src, code, self.model, lo, hi, rows.inp.unit.flat_start + lo, np.uint64(key),
                          np.uint64(limit), full, kept, bad)
        return full, kept


class Della(KeptSums):
    """DELLA's rank-based mask, `args = (key, density, epsilon)` (whole units: no spans)."""

    __slots__ = ()
    name = "della"

    def compute(self, rows, code, lo, hi, bad):
        unit = rows.inp.unit
        key, density, epsilon = self.args
        if rows.della_keys is not None:  # a unit planned in its pass-2 task: its merge takes the mask
            if rows.della_masks is None:
                rows.della_masks = np.zeros((len(rows.inp.models), unit.numel), np.uint8)
            mask = rows.della_masks[self.model]
            rows.della_keys[self.model] = della_mask_key(self.model, key, density, epsilon)
        else:
            mask = np.zeros(unit.numel, np.uint8)
        d1, rest, slices = kernels.della_layout(rows.inp.models[0].shape, unit)
        kernels.della_mask(rows.src, code, self.model, 0, slices, d1, rest, unit.flat_start, np.uint64(key), density,
                           epsilon, mask, bad)
        full, kept = self.empty()
        kernels.masked_abs_sums(rows.src, code, self.model, lo, hi, mask, full, kept, bad)
        return full, kept


def della_mask_key(model: int, key, density, epsilon) -> tuple:
    """What a unit's DELLA mask of one model depends on, besides the unit's rows."""
    return model, int(key), float(density), float(epsilon)


class ExactProducts(Stat):
    """Sums of products kept exactly (`exact_products`' two words per exponent bucket): a list of
    float64 values, each exactly rounded, once finalized."""

    __slots__ = ()

    def empty(self):
        return None

    def combine(self, a, b):
        return b if a is None else a if b is None else a + b

    def finalize(self, partial):
        return [] if partial is None else exact_products(partial)

    def pack(self, value):
        return np.array(value, np.float64).view(np.int64)

    def unpack(self, record, reread=None):
        return record.view(np.float64).tolist()

    def result_bytes(self, numel):
        return 2 * 8 * kernels.GRAM_BUCKETS * 16  # two words per bucket, for the pairs of up to 5 inputs


class Gram(ExactProducts):
    """Exact pairwise dot products of the models' deltas (`args=("deltas",)`) or of the inputs
    themselves (`("inputs",)`), upper triangle in row-major order (whole units: no spans)."""

    __slots__ = ()
    name = "gram"

    def compute(self, rows, code, lo, hi, bad):
        deltas = self.args[0] == "deltas"
        n = rows.src.shape[0] - (1 if deltas else 0)
        words = np.zeros((2, n * (n + 1) // 2, kernels.GRAM_BUCKETS), np.int64)
        kernels.gram_sums(rows.src, code, lo, hi, deltas, words[0], words[1], bad)
        return words


# --- the statistics of SCE, RAM and Arcee fusion (whole units: no spans) --------------------------

class Var(Stat):
    """SCE: (`Summary` of the per-element variance of the deltas across models, its non-zero count)."""

    __slots__ = ()
    name = "var"

    def compute(self, rows, code, lo, hi, bad):
        hist = np.zeros(summaries.HIST_BINS, np.int64)
        nnz = kernels.variance_hist(rows.src, code, lo, hi, hist, bad)
        return Summary(hi - lo, hist).compact(), int(nnz)

    def empty(self):
        return Summary(), 0

    def combine(self, a, b):
        return (a[0] + b[0]).compact(), a[1] + b[1]

    def pack(self, value):
        return np.concatenate([[value[1]], summaries.to_record(value[0])]).astype(np.int64)

    def unpack(self, record, reread=None):
        return summaries.from_record(record[1:]), int(record[0])

    def result_bytes(self, numel):
        return 256 + 8 * min(numel, summaries.HIST_BINS)


class VarBins(PerUnitBins):
    """SCE: boundary bins of the variance (round 2 of `Var`)."""

    __slots__ = ()
    name = "var_bins"

    def count(self, rows, code, lo, hi, bins, counts, bad):
        kernels.variance_bins(rows.src, code, lo, hi, bins, counts, bad)


class SceSquares(ExactProducts):
    """SCE: per model, exact Σ delta² over the elements SCE selects, `args = (kind, value, ties
    kept, ties before each unit)`."""

    __slots__ = ()
    name = "sce_sq"

    def compute(self, rows, code, lo, hi, bad):
        kind, value, kept, starts = self.args
        budget = np.array([max(0, kept - dict(starts).get(rows.inp.unit.index, (0,))[0])], np.int64)
        K = rows.src.shape[0] - 1
        words = np.zeros((2, K, kernels.GRAM_BUCKETS), np.int64)
        kernels.sce_squares(rows.src, code, lo, hi, kind, np.float32(value), budget, words[0], words[1], bad)
        return words


class RamCounts(Stat):
    """RAM: per model, its changed elements shared with others and unique to it (`args=(eps,)`)."""

    __slots__ = ()
    name = "ram"

    def compute(self, rows, code, lo, hi, bad):
        K = rows.src.shape[0] - 1
        shared, unique = np.zeros(K, np.int64), np.zeros(K, np.int64)
        kernels.ram_counts(rows.src, code, lo, hi, np.float32(self.args[0]), shared, unique, bad)
        return shared, unique

    def empty(self):
        return np.zeros(256, np.int64), np.zeros(256, np.int64)

    def combine(self, a, b):
        return a[0] + b[0], a[1] + b[1]

    def finalize(self, partial):
        return [int(x) for x in partial[0]], [int(x) for x in partial[1]]

    def pack(self, value):
        return np.array([*value[0], *value[1]], np.int64)

    def unpack(self, record, reread=None):
        half = len(record) // 2
        return [int(x) for x in record[:half]], [int(x) for x in record[half:]]


def _arcee_rows(rows, lo: int, hi: int) -> tuple[int, int, int]:
    row_len = rows.inp.models[0].shape[-1] if rows.inp.models[0].shape else 1
    return lo // row_len, hi // row_len, row_len


class Arcee(Stat):
    """Arcee fusion: histogram (dense, 2 x 32,768 bins) of its importance keys."""

    __slots__ = ()
    name = "arcee"

    def compute(self, rows, code, lo, hi, bad):
        hist = np.zeros(summaries.HIST_BINS * 2, np.int64)
        counts = _zeroed("bins", 0, 1 << 16)
        kernels.arcee_importance(rows.src, code, *_arcee_rows(rows, lo, hi), np.zeros(0, np.int64), hist, counts, bad)
        return hist

    def empty(self):
        return np.zeros(2 * summaries.HIST_BINS, np.int64)

    def combine(self, a, b):
        return a + b

    def pack(self, value):
        nz = np.flatnonzero(value)
        return np.concatenate([[len(value)], nz, value[nz]]).astype(np.int64)

    def unpack(self, record, reread=None):
        hist = np.zeros(int(record[0]), np.int64)
        n = (len(record) - 1) // 2
        hist[record[1:1 + n]] = record[1 + n:]
        return hist

    def result_bytes(self, numel):
        return 256 + 8 * min(numel, summaries.HIST_BINS)


class ArceeBins(PerUnitBins):
    """Arcee fusion: boundary bins of the importance (round 2 of `Arcee`)."""

    __slots__ = ()
    name = "arcee_bins"

    def count(self, rows, code, lo, hi, bins, counts, bad):
        hist = np.zeros(summaries.HIST_BINS * 2, np.int64)
        kernels.arcee_importance(rows.src, code, *_arcee_rows(rows, lo, hi), bins, hist, counts, bad)


# --- helpers ----------------------------------------------------------------------------------------

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
    by_kind: dict[type, list] = {}
    for st in stats:
        rng = _local_range(st, unit, numel)
        if rng is None:
            out[st] = st.empty()
        else:
            by_kind.setdefault(type(st), []).append((st, rng))
    for kind, todo in by_kind.items():
        out.update(kind.compute_all(rows, code, todo, bad))
    if check_finite:
        check_nonfinite(rows, bad)
    return out


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

HISTOGRAM_BATCH = 1 << 17  # record values read back as columns at a time (`Results.histograms`): ~8 MiB in all
# (a packed record holds a bin per value, so a batch holds as many bins as 1 << 18 values did before packing)
IN_STORE = object()  # a result that waits in the statistics store (`StatsEngine`), read back when asked for


class Results:
    """Statistics gathered so far, by (tensor, Stat); those in `store` are read back when asked for
    (an MoE model has ~100k, which the run must not hold)."""

    def __init__(self, direct_ranks: bool = False, store=None):
        self.values: dict[tuple[str, Stat], object] = {}
        self.direct_ranks = direct_ranks  # ranks may be selected from the rows at hand (`inline`)
        self.store = store

    def __contains__(self, key) -> bool:
        return key in self.values

    def get(self, tensor: str, stat: Stat):
        value = self.values.get((tensor, stat))
        return self.store.get(tensor, stat) if value is IN_STORE else value

    def of(self, tensor: str) -> "TensorResults":
        return TensorResults(self, tensor)

    def histograms(self, pairs: list[tuple[str, Stat]], limit: int = HISTOGRAM_BATCH):
        """The `Abs` summaries of `pairs` ((tensor, Stat), each gathered) as columns, a batch of
        about `limit` record values at a time (bounded memory whatever the count), in the order
        the store holds them: (the batch's positions in `pairs`, `summaries.Histograms`)."""
        if self.store is not None and all(self.values.get(p) is IN_STORE for p in pairs):
            for at, values, starts in self.store.batches((f"{t}|{st.key()}" for t, st in pairs), limit):
                yield at, summaries.Histograms(values, starts)
            return
        # results held in memory (a run without a store, never the CLI's): their records are copies
        records = [summaries.to_record(self.get(t, st)) for t, st in pairs]
        for lo, hi in summaries.size_batches(list(map(len, records)), limit):
            starts = np.zeros(hi - lo + 1, np.int64)
            np.cumsum([len(r) for r in records[lo:hi]], out=starts[1:])
            yield np.arange(lo, hi), summaries.Histograms(np.concatenate(records[lo:hi]), starts)

    def update(self, values: dict) -> None:
        self.values.update(values)


@dataclass(frozen=True)
class TensorResults:
    """The statistics of one tensor (what a per-tensor sparsifier sees)."""

    results: Results
    tensor: str

    def __getitem__(self, stat: Stat):
        value = self.results.values[(self.tensor, stat)]
        return self.results.store.get(self.tensor, stat) if value is IN_STORE else value

    def __contains__(self, stat: Stat) -> bool:
        return (self.tensor, stat) in self.results.values

    @property
    def direct_ranks(self) -> bool:
        return self.results.direct_ranks


def drive(method, catalogue, tensors: list[str], compute_fn):
    """Gather every statistic `method` asks for on `tensors` (rounds until it asks for nothing
    new), then return its plan. `compute_fn({tensor: [Stat]}) -> {(tensor, Stat): result}`."""
    got = Results(getattr(compute_fn, "direct_ranks", False), getattr(compute_fn, "store", None))
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
                out[(t, st)] = st.finalize(partial)
        return out

    # a small tensor's ranks are selected from its keys (one pass, scratch of 8 bytes per element),
    # a larger one's found from histograms (fixed memory; their cost vanishes next to its elements)
    compute_fn.direct_ranks = rows.inp.unit.numel <= DIRECT_RANKS_MAX
    return compute_fn


def stats_task(work, stats: tuple, check_finite: bool) -> list[dict]:
    """Dask task: partial results of each unit's statistics (`stats[i]` for unit i of the work unit).
    Consecutive whole small tensors that could merge in one batch are read in one (`BatchRows`:
    a read per run of tensors stored back to back, not one per tensor and input), cut as pass 2
    cuts its batches (`units.batch_spans`, on the rows a batch reads)."""
    from .checkpoint import DTYPE_SIZES
    from .units import BatchRows, UnitRows, batch_key, batch_spans, key_codes

    items = work.items
    keys = list(map(batch_key, items))
    held = [0 if k is None else stop * (k[1] + k[2]) * DTYPE_SIZES[k[0]] for stop, k in zip(items.stops, keys)]
    out, k = [], 0
    for lo, hi in batch_spans(key_codes(keys), held) + [(len(items), len(items))]:
        out += [compute(UnitRows(items[i]), stats[i], check_finite) for i in range(k, lo)]
        if hi - lo == 1:
            out.append(compute(UnitRows(items[lo]), stats[lo], check_finite))
        elif hi > lo:
            batch = BatchRows(items[lo:hi])
            kinds = {type(st) for sts in stats[lo:hi] for st in sts}
            done = kinds.pop().compute_batch(batch, stats[lo:hi], check_finite) if len(kinds) == 1 else None
            out += done if done is not None else [compute(batch.rows(i), stats[lo + i], check_finite)
                                                  for i in range(hi - lo)]
        k = hi
    return out


def combine_parts(a: dict, b: dict) -> dict:
    """Partial results of one tensor from two sets of its units, merged."""
    out = dict(a)
    for st, v in b.items():
        out[st] = st.combine(out[st], v) if st in out else v
    return out


FLUSH_BYTES = 16 << 20  # finished results held (as the store packs them) before they go to the store


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
                if self.store.has(t, st):
                    out[(t, st)] = IN_STORE
                else:
                    todo.setdefault(t, []).append(st)
        if not todo:
            return out
        items, needs, remaining = [], [], {}  # needs[k]: the statistics item k computes
        for t, stats in todo.items():
            entries = self.inputs.entries(t)
            numel = self.inputs.entry(t).numel
            for u in self.units[t]:
                need = [st for st in stats if _local_range(st, u, numel) is not None]
                if need:
                    items.append(UnitInputs(u, *entries))
                    needs.append(need)
                    remaining[t] = remaining.get(t, 0) + 1
        held = [inp.nbytes + sum(st.result_bytes(inp.unit.numel) for st in need) for inp, need in zip(items, needs)]
        works = pack(items, held, self.unit_bytes)
        first = list(accumulate((len(w.items) for w in works), initial=0))
        calls = [(w, tuple(needs[a:b]), self.check_finite) for w, a, b in zip(works, first, first[1:])]
        sizes = [w.nbytes for w in works]
        del needs, items
        partial: dict[str, dict] = {}
        finished: dict = {}
        waiting = [0]

        def keep(t, st, value):
            finished[(t, st)] = value
            waiting[0] += st.held_bytes(value)
            if waiting[0] >= FLUSH_BYTES:
                self._save(finished, out)
                waiting[0] = 0

        def fold(i, results):
            for t, part in zip(works[i].items.tensors, results):
                partial[t] = combine_parts(partial[t], part) if t in partial else part
                remaining[t] -= 1
                if not remaining[t]:
                    parts = partial.pop(t)
                    for st in todo[t]:
                        keep(t, st, st.finalize(parts[st] if st in parts else st.empty()))

        self.rounds += 1
        self.bytes_read += sum(sizes)
        kinds = sorted({st.name for ss in todo.values() for st in ss})
        with self.progress.phase("stats" if kinds == ["abs"] else "+".join(kinds), sum(sizes)) as step:
            self.ex.map(stats_task, calls, sizes, step, fold)
        for t, stats in todo.items():  # a tensor none of whose units holds a wanted span
            for st in stats:
                if (t, st) not in finished and (t, st) not in out:
                    keep(t, st, st.finalize(st.empty()))
        self._save(finished, out)
        self.ex.trim()
        return out

    def _save(self, finished: dict, out: dict) -> None:
        """Move finished results to the store (`out` marks them `IN_STORE`: `Results` reads them back)."""
        self.store.put(finished)
        for key in finished:
            out[key] = IN_STORE
        finished.clear()
