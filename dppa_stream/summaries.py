"""Mergeable summaries of |delta| and the exact queries answered from them.

Non-negative IEEE floats order exactly like their bit patterns, so a histogram keyed on the top 16
bits of |delta| as float32 (32,768 bins: the sign bit is always 0) answers order questions:
exactly when the deltas are bf16 values (their low 16 bits are zero), and to within one bin
otherwise, in which case one more round (the "bins" statistic: counts of the low 16 bits inside
one bin) resolves the single boundary bin. All summaries are integer counts, so merging them is
associative and the answers cannot depend on chunking or on the order in which Dask combines
them. Nothing here knows about files, kernels or Dask.
"""

from __future__ import annotations

import math
import struct
import weakref
from dataclasses import dataclass

import numpy as np

HIST_BINS = 1 << 15
KEEP_ALL = -1  # threshold bits below every |delta|
KEEP_NONE = 0x7FFFFFFF  # threshold bits at or above every finite |delta|


class Summary:
    """Exact, mergeable summary of |delta| over some elements of one tensor of one model: the
    element count, Σ|delta| as an exact integer, and a histogram of the top 16 bits.

    The histogram is dense while a task accumulates chunks into it, and sparse (typically ~3k of
    the 32k bins are used) once `compact()`ed or pickled. A summary read back from the statistics
    store holds no histogram at all, only a way to load it (`load`), so that a run can keep one
    summary per tensor and model of an MoE model (tens of thousands) in a few hundred bytes each.
    """

    __slots__ = ("numel", "total", "_dense", "_bins", "_counts", "_cum", "_load", "__weakref__")

    def __init__(self, numel: int = 0, hist: np.ndarray | None = None, mant_sums: np.ndarray | None = None,
                 sparse: tuple[np.ndarray, np.ndarray] | None = None, total: int | None = None, load=None):
        self.numel = numel
        # Σ|delta| in units of 2**-150: exact, from the per-exponent significand sums a kernel adds up
        self.total = total if total is not None else exact_total(mant_sums) if mant_sums is not None else 0
        self._dense = self._bins = self._counts = self._cum = None
        self._load = load
        if sparse is not None:
            self._bins, self._counts = sparse
        elif load is None:
            self._dense = hist if hist is not None else np.zeros(HIST_BINS, np.int64)

    @property
    def hist(self) -> np.ndarray:
        """Dense counts by top-16-bit pattern (a temporary array when the summary is compact)."""
        if self._dense is not None:
            return self._dense
        bins, counts = self.sparse
        dense = np.zeros(HIST_BINS, np.int64)
        dense[bins] = counts
        return dense

    def compact(self) -> "Summary":
        if self._dense is not None:
            nz = np.flatnonzero(self._dense != 0)  # numpy's fast path for booleans
            self._bins, self._counts, self._dense = nz.astype(np.int32), self._dense[nz], None
        return self

    @property
    def sparse(self) -> tuple[np.ndarray, np.ndarray]:
        """(bins in use, in increasing order; their counts)."""
        if self._load is not None:
            return self._loaded()[1:3]
        self.compact()
        return self._bins, self._counts

    def cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """(bins in use; cumulative counts up to and including each), computed once: order queries
        then search the bins in use instead of passing over all 32,768."""
        if self._load is not None:
            loaded = self._loaded()
            return loaded[1], loaded[3]
        if self._cum is None:
            bins, counts = self.sparse
            self._cum = (bins, np.cumsum(counts))
        return self._cum

    def _loaded(self) -> tuple:
        """(weak reference to self, bins, counts, cumulative counts) of a summary that loads its
        histogram: kept for the last one loaded only, since planning queries one tensor's histogram
        several times in a row and must not keep every tensor's (nor, once the run is over, the
        statistics store a summary loads from)."""
        global _last_loaded
        if _last_loaded[0]() is not self:
            bins, counts = self._load[0](*self._load[1:])
            _last_loaded = (weakref.ref(self), bins, counts, np.cumsum(counts))
        return _last_loaded

    def __add__(self, other: "Summary") -> "Summary":
        dense = self.hist.copy()
        bins, counts = other.sparse if other._dense is None else (slice(None), other._dense)
        dense[bins] += counts
        return Summary(self.numel + other.numel, dense, total=self.total + other.total)

    def __reduce__(self):
        bins, counts = self.sparse
        return _unpack_summary, (self.numel, bins, counts, self.total)

    @property
    def sum_abs(self) -> float:
        """Σ|delta|, exactly rounded to float64 (independent of chunking)."""
        return math.ldexp(float(self.total), -150)  # int -> float rounds correctly; the scaling is exact

    @property
    def mean_abs(self) -> float:
        return mean_abs(self.total, self.numel)


def mean_abs(total: int, numel: int) -> float:
    """Mean |delta| of `numel` elements whose Σ|delta| is `total` (a `Summary.total`)."""
    return math.ldexp(float(total), -150) / numel if numel else 0.0


_last_loaded: tuple = (lambda: None,)  # see Summary._loaded


def _unpack_summary(numel, bins, counts, total):
    return Summary(numel, sparse=(bins, counts), total=total)


_LIMB = 62  # a record stores Σ|delta| (an integer of up to ~350 bits) as non-negative 62-bit limbs


_PACK_SHIFT = 32  # a packed record holds each bin in use as bin << 32 | its count
_COUNT_MASK = (1 << _PACK_SHIFT) - 1


def to_record(value: Summary) -> np.ndarray:
    """A summary as int64 values: numel, bins in use, limbs of the total, the limbs, then the
    bins and their counts. A summary of fewer than 2**31 elements (every count fits 32 bits)
    packs each bin with its count into one value and says so by a negative bins-in-use: half the
    values, so half the bytes to store and read back of a model of many small tensors. Records
    with the count apart (the form before packing, and any larger summary) stay readable."""
    return np.concatenate(record_parts(value)).astype(np.int64, copy=False)


def record_parts(value: Summary) -> list[np.ndarray]:
    """`to_record`'s values as the arrays that make them up, for a store that writes many
    records back to back."""
    bins, counts = value.sparse
    limbs, rest = [], value.total
    while rest:
        limbs.append(rest & ((1 << _LIMB) - 1))
        rest >>= _LIMB
    if value.numel < 1 << 31:
        packed = bins.astype(np.int64) << _PACK_SHIFT
        packed |= counts
        return [np.array([value.numel, -len(bins), len(limbs), *limbs], np.int64), packed]
    return [np.array([value.numel, len(bins), len(limbs), *limbs], np.int64), bins, counts]


def from_record(a: np.ndarray, reread: tuple | None = None) -> Summary:
    """The summary `to_record` packed. With `reread` ((function, argument) that returns the record
    again) it holds no histogram, only a way to load it when queried."""
    numel, n, k = int(a[0]), int(a[1]), int(a[2])
    total = sum(int(limb) << (_LIMB * i) for i, limb in enumerate(a[3:3 + k]))
    at = 3 + k
    if reread is not None:
        return Summary(numel, total=total, load=(_record_bins, *reread, at, n))
    return Summary(numel, sparse=_bins_of(a, at, n), total=total)


def _record_bins(read, arg, at: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return _bins_of(read(arg), at, n)


def _bins_of(rec: np.ndarray, at: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(bins, counts) of a record whose bins begin at `at`; `n` bins in use, negative if packed."""
    if n < 0:
        vals = rec[at:at - n]
        return (vals >> _PACK_SHIFT).astype(np.int32), vals & _COUNT_MASK
    return rec[at:at + n].astype(np.int32), rec[at + n:at + 2 * n].copy()


def size_batches(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive records of these `lengths` as ranges [lo, hi) of about `limit` values each,
    cut greedily (a record longer than `limit` is a batch of its own): how `Histograms` are read,
    a bounded batch at a time."""
    spans, lo, n = [], 0, len(lengths)
    while lo < n:
        hi, size = lo + 1, lengths[lo]
        while hi < n and size + lengths[hi] <= limit:
            size += lengths[hi]
            hi += 1
        spans.append((lo, hi))
        lo = hi
    return spans


class Histograms:
    """The summaries of many records (`to_record`, concatenated in `values`, record i from
    `starts[i]` to `starts[i + 1]`) as columns, and the order queries of one summary asked of all
    of them at once. DPPA plans ~100k linears of an MoE model from their histograms: one summary
    at a time, that was ~0.2 ms of Python per linear and fine-tune; here it is a few numpy passes
    over the bins of a batch of records.

    Summary i's bins in use are `bins[at[i]:at[i + 1]]` (increasing), their counts `counts[...]`;
    `numel` and `totals` (exact Σ|delta|, Python ints) are per summary."""

    def __init__(self, values: np.ndarray, starts: np.ndarray):
        first = starts[:-1]
        self.numel = values[first]
        used, limbs = values[first + 1], values[first + 2]
        packed = used < 0  # (`to_record`: each bin and its count in one value)
        used = np.abs(used)
        self._values, self._first, self._limbs = values, first, limbs
        self.at = np.zeros(len(first) + 1, np.int64)
        np.cumsum(used, out=self.at[1:])
        gather = np.repeat(first + 3 + limbs - self.at[:-1], used) + np.arange(int(self.at[-1]))
        if packed.all():
            vals = values[gather]
            self.bins, self.counts = vals >> _PACK_SHIFT, vals & _COUNT_MASK
        else:
            apart = np.repeat(~packed, used)
            self.bins = np.where(apart, values[gather], values[gather] >> _PACK_SHIFT)
            self.counts = np.where(apart, values[gather + np.repeat(np.where(packed, 0, used), used)],
                                   values[gather] & _COUNT_MASK)
        self.of = np.repeat(np.arange(len(first)), used)  # the summary of each bin in use
        self.cum = np.zeros(len(self.bins) + 1, np.int64)  # counts of every bin before each, over all summaries
        np.cumsum(self.counts, out=self.cum[1:])

    def __len__(self) -> int:
        return len(self.numel)

    @property
    def totals(self) -> list[int]:
        """Per summary, Σ|delta| exactly (`Summary.total`)."""
        values = self._values
        return [sum(int(limb) << (_LIMB * j) for j, limb in enumerate(values[s + 3:s + 3 + k].tolist())) if k else 0
                for s, k in zip(self._first.tolist(), self._limbs.tolist())]

    def count(self) -> np.ndarray:
        """Per summary, the elements its histogram holds (`total`)."""
        return self.cum[self.at[1:]] - self.cum[self.at[:-1]]

    def count_below(self, b: np.ndarray) -> np.ndarray:
        """Per summary i, its elements in bins < b[i] (`count_below`; 0 <= b <= HIST_BINS)."""
        keys = self.of * (HIST_BINS + 1) + self.bins  # increasing over all summaries: one search for all
        j = np.searchsorted(keys, np.arange(len(self)) * (HIST_BINS + 1) + b)
        return self.cum[j] - self.cum[self.at[:-1]]

    def thresholds_le(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`thresholds_le` of every summary (row i of `ranks`: its ranks, each >= 1), as arrays of
        the shape of `ranks`: each threshold's bits, the elements at or below it, and the
        elements in its bin (`Threshold.ties_total`)."""
        before = self.cum[self.at[:-1]][:, None]
        end = self.at[1:][:, None]
        j = np.minimum(np.searchsorted(self.cum[1:], before + ranks), end)  # the bin of each rank, or the end
        inside = j < end
        at_or_below = np.where(inside, self.cum[np.minimum(j + 1, len(self.bins))], self.cum[end]) - before
        bins = np.where(inside, self.bins[np.minimum(j, max(len(self.bins) - 1, 0))] if len(self.bins) else 0,
                        HIST_BINS)
        return bins << 16, at_or_below, at_or_below - (self.cum[j] - before)


def exact_total(mant_sums: np.ndarray) -> int:
    """Σ of values given as per-exponent sums of float32 significands, as one integer in units of
    2**-150 (exact: the significand of exponent e counts 2**(max(e, 1) - 150))."""
    return sum(int(mant_sums[e]) << max(int(e), 1) for e in np.flatnonzero(mant_sums))


def exact_sum(mant_sums: np.ndarray) -> float:
    """Σ of values given as per-exponent sums of float32 significands, exactly rounded to float64:
    one Python integer rounded once by int -> float (correctly rounded) and scaled by a power of
    two (exact). Fractions gave the same result 10x slower, in DPPA's serial plan step."""
    return math.ldexp(float(exact_total(mant_sums)), -150)


_BIN_MANT = (np.arange(HIST_BINS, dtype=np.int64) & 0x7F) << 16
_BIN_MANT[128:] |= 1 << 23  # implicit leading one of normal numbers (exponent > 0)


def hist_mant_sums(bins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact `mant_sums` of values that are all bf16 (each bin holds a single value), from the
    bins in use and their counts."""
    mant = np.zeros(256, np.int64)
    np.add.at(mant, bins >> 7, counts * _BIN_MANT[bins])
    return mant


def cumulative(hist) -> tuple[np.ndarray, np.ndarray]:
    """(bins in use, cumulative counts) of a histogram given as a Summary or as a dense array."""
    if isinstance(hist, Summary):
        return hist.cumulative()
    bins = np.flatnonzero(hist)
    return bins, np.cumsum(hist[bins])


def count_below(hist, b: int) -> int:
    """Elements in bins < b."""
    bins, cum = cumulative(hist)
    j = int(np.searchsorted(bins, b))
    return int(cum[j - 1]) if j else 0


def count_in(hist, b: int) -> int:
    """Elements in bin b."""
    return count_below(hist, b + 1) - count_below(hist, b)


def total(hist) -> int:
    cum = cumulative(hist)[1]
    return int(cum[-1]) if len(cum) else 0


def count_above(hist, value: float) -> int:
    """Number of |delta| > value, exact when every |delta| is a bf16 value."""
    # A bf16 |delta| in bin (bits(value) >> 16) equals that bin's start, which is <= value.
    return total(hist) - count_below(hist, (_bits(value) >> 16) + 1)


def _bits(value: float) -> int:
    return int(np.array(value, np.float32).view(np.int32))


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def locate(hist, rank: int) -> tuple[int, int]:
    """Bin holding the rank-th smallest element (1-based, rank >= 1) and its rank inside that bin."""
    bins, cum = cumulative(hist)
    j = int(np.searchsorted(cum, rank))
    before = int(cum[j - 1]) if j else 0
    return (int(bins[j]) if j < len(bins) else HIST_BINS), rank - before


@dataclass(frozen=True)
class Threshold:
    """Keep an element iff bits(|delta|) > bits, or it is one of the first `ties_kept` elements
    (in flat index order) whose |delta| equals the threshold exactly."""

    bits: int
    ties_kept: int = 0
    ties_total: int = 0

    @property
    def value(self) -> float:
        return bits_to_float(self.bits) if self.bits >= 0 else -1.0


def threshold_from_hist(hist, rank: int) -> Threshold:
    """The rank-th smallest |delta| (1-based) when deltas are bf16 values (low bits all zero)."""
    b, _ = locate(hist, rank)
    return Threshold(b << 16, 0, count_in(hist, b))


def thresholds_le(hist, ranks: list[int]) -> list[tuple[Threshold, int]]:
    """For each rank, `threshold_from_hist(hist, rank)` and how many elements are at or below it,
    from one search of the cumulative counts (DPPA asks this of every linear and fine-tune)."""
    bins, cum = cumulative(hist)
    out = []
    for j in np.searchsorted(cum, ranks).tolist():
        at_or_below = int(cum[j]) if j < len(cum) else total(hist)
        b = int(bins[j]) if j < len(bins) else HIST_BINS
        out.append((Threshold(b << 16, 0, at_or_below - (int(cum[j - 1]) if j else 0)), at_or_below))
    return out


def smallest(rank: int, hist, details: list[tuple[np.ndarray, np.ndarray]] | None) -> Threshold:
    """The rank-th smallest |delta| (1-based) exactly, from the histogram and boundary-bin details."""
    b, r = locate(hist, rank)
    if details is None:
        return Threshold(b << 16, 0, count_in(hist, b))
    merged: dict[int, int] = {}
    for vals, counts in details:
        for v, c in zip(vals.tolist(), counts.tolist()):
            merged[v] = merged.get(v, 0) + c
    cum = 0
    for v in sorted(merged):
        cum += merged[v]
        if cum >= r:
            return Threshold((b << 16) | v, 0, merged[v])
    raise AssertionError("bucket details do not match the histogram")


def count_lt(hist, details, bits: int) -> int:
    """Exact count of |delta| whose bits are below `bits`, given the details of bin bits >> 16."""
    low = bits & 0xFFFF
    return count_below(hist, bits >> 16) + sum(int(c[v < low].sum()) for v, c in details)


def count_gt_bits(hist, details: list[tuple[np.ndarray, np.ndarray]], bits: int) -> int:
    """Exact count of |delta| whose bits exceed `bits`, given the details of bin bits >> 16."""
    low = bits & 0xFFFF
    return total(hist) - count_below(hist, (bits >> 16) + 1) + sum(int(c[v > low].sum()) for v, c in details)


def rank_for_prune_le(numel: int, sparsity: float) -> int:
    """Reference pruning (DPPA's magnitude): threshold = element at 0-based index int(n*s) of the
    ascending |delta|; everything <= it is pruned. Returns that element's 1-based rank."""
    return min(int(numel * sparsity), numel - 1) + 1


def top_k_count(numel: int, density: float) -> int:
    """mergekit's TIES count: k = max(1, int(density * numel)); density >= 1 keeps all."""
    if density >= 1:
        return numel
    return max(1, int(density * numel)) if numel else 0
