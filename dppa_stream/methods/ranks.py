"""One exact-rank protocol: the r-th smallest key of a tensor's statistic, whatever the chunking.

Keys are 32-bit patterns that order like what they stand for (|delta| or a variance as float32
bits, Arcee's importance as `kernels.sort_key`). Round 1 is a histogram of their top 16 bits (a
statistic the caller names); it locates the bin holding each wanted rank. Round 2 counts the low
16 bits inside those boundary bins, per work unit. Together they give, per rank, the key itself,
how many keys lie below it, how many equal it, and how many of those ties come before each unit in
flat order: everything a threshold that keeps ties lowest flat index first needs.

A method declares its ranks (`Ranks.needs`) round after round until it can `resolve` them. TIES and
magnitude pruning (`sparsify.py`), breadcrumbs' two boundaries, SCE's variance threshold
(`selective.py`), Arcee fusion's quartiles (`interp.py`) and DPA's nested thresholds (`dppa.py`)
all go through here. (DPPA's outlier counts are counts above a value, not ranks: `count_gt_bits`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .. import summaries
from ..statistics import Abs, Bins, ExactRanks, Stat


@dataclass(frozen=True)
class Boundary:
    """The key at one rank: its bits, the keys below it, the keys equal to it (its ties) and, per
    unit holding part of the tensor (flat order), the ties before that unit."""

    bits: int
    below: int
    ties: int
    starts: tuple = ()  # ((unit, ties before it), ...)

    @property
    def value(self) -> float:
        """The key as a float32 value (|delta|, a variance)."""
        return summaries.bits_to_float(self.bits)

    def threshold(self, numel: int, keep: int) -> summaries.Threshold:
        """Keep the `keep` largest keys when this boundary is the (numel - keep + 1)-th smallest:
        everything above it and the first of its ties."""
        above = numel - self.below - self.ties
        return summaries.Threshold(self.bits, keep - above, self.ties)


RankSpec = Sequence[int] | Callable[[object], Sequence[int]]


def summary_hist(summary: summaries.Summary):
    return summary  # the histogram queries take a Summary (loaded from the store on demand)


class Ranks:
    """Exact ranks (1-based, ascending) of one statistic: round 1 is `hist`, whose result's
    histogram `histogram` returns; round 2 is a statistic of kind `bins` (a `PerUnitBins`) on the
    same model and span, whose arguments are the boundary bins. `ranks` may be a function of round 1's result
    (SCE's k depends on how many variances are non-zero)."""

    def __init__(self, hist: Stat, bins: type[Stat] = Bins, histogram: Callable = summary_hist):
        self.hist, self.bins, self.histogram = hist, bins, histogram

    def first(self, got):
        """Round 1's result, or None while it is missing."""
        return got[self.hist] if self.hist in got else None

    def _exact(self, got, ranks: RankSpec) -> Stat | None:
        """Both rounds as one statistic ("ranks"), when a small tensor is held whole in the rows
        at hand (`statistics.inline`) and the keys are |delta|: one selection per rank instead of
        two histograms, the same answer."""
        if not getattr(got, "direct_ranks", False) or type(self.hist) is not Abs or self.bins is not Bins \
                or callable(ranks):
            return None
        h = self.hist
        return ExactRanks(h.model, h.span, h.bf16, tuple(sorted(set(ranks))))

    def needs(self, got, ranks: RankSpec) -> list[Stat]:
        """The statistic still missing to resolve `ranks`: round 1, round 2, or none."""
        exact = self._exact(got, ranks)
        if exact is not None:
            return [] if not exact.args or exact in got else [exact]
        if self.hist not in got:
            return [self.hist]
        bins = self._bins(got, ranks)
        return [bins] if bins is not None and bins not in got else []

    def resolve(self, got, ranks: RankSpec) -> list[Boundary]:
        """One `Boundary` per rank (both rounds must be in `got`)."""
        exact = self._exact(got, ranks)
        if exact is not None:
            unit, found = got[exact] if exact.args else (0, ())
            at = dict(zip(exact.args, found))
            return [Boundary(at[r][0], at[r][1], at[r][2], ((unit, 0),)) for r in ranks]
        hist = self.histogram(got[self.hist])
        ranks = self._ranks(got, ranks)
        if not ranks:
            return []
        stat = self._bins(got, ranks)
        per_unit = got[stat]
        units = sorted(per_unit)
        out = []
        for rank in ranks:
            i = stat.args.index(summaries.locate(hist, rank)[0])
            details = [per_unit[u][i] for u in units]
            t = summaries.smallest(rank, hist, details)
            starts, run = [], 0
            for u, (vals, counts) in zip(units, details):
                starts.append((u, run))
                run += int(counts[vals == (t.bits & 0xFFFF)].sum())
            out.append(Boundary(t.bits, summaries.count_lt(hist, details, t.bits), t.ties_total, tuple(starts)))
        return out

    def _ranks(self, got, ranks: RankSpec) -> list[int]:
        return list(ranks(got[self.hist]) if callable(ranks) else ranks)

    def _bins(self, got, ranks: RankSpec) -> Stat | None:
        ranks = self._ranks(got, ranks)
        if not ranks:
            return None
        hist = self.histogram(got[self.hist])
        bins = tuple(sorted({summaries.locate(hist, r)[0] for r in ranks}))
        return self.bins(self.hist.model, self.hist.span, self.hist.bf16, bins)
