"""Sparsifiers: how one fine-tune's delta of one tensor (or span of it) is thinned before merging.

Each says which statistics it needs given what is known (`needs`: a threshold's boundary-bin
round comes once its histogram is known) and turns them into a `Sparse` decision for the pass-2
kernel (`decide`). Exact thresholds come from bit-pattern histograms (`summaries`), so they equal
an in-memory sort whatever the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import kernels, summaries
from ..statistics import Stat
from ..summaries import KEEP_ALL, KEEP_NONE, Threshold


@dataclass(frozen=True)
class Sparse:
    """What the kernel does to one model's delta on one span (see `kernels.gta`).

    Threshold levels (SP_SHRINK uses level 0; SP_BANDS all): `kinds` (TH_*), `values` (float32
    thresholds), `ties` (ties kept at each level, lowest flat index first) and `tie_starts`
    ((unit index, per-level ties before that unit), ...); `factors` per level (DPA).
    """

    mode: int = kernels.SP_NONE
    kinds: tuple = ()
    values: tuple = ()
    ties: tuple = ()
    tie_starts: tuple = ()
    factors: tuple = ()
    dense: float = 1.0  # SP_NONE: multiply the delta (DPA on tensors DP does not prune)
    key: int = 0  # SP_BERNOULLI: counter RNG stream and keep limit
    limit: int = 0
    scale: float = 1.0  # SP_BERNOULLI: L1 rescale

    def budgets(self, unit: int) -> list[int]:
        """Ties each level may still keep in this unit."""
        starts = dict(self.tie_starts).get(unit, (0,) * len(self.ties))
        return [max(0, t - s) for t, s in zip(self.ties, starts)]


def level(t: Threshold, tracked: bool) -> tuple[int, float]:
    """(kind, value) of a threshold level: keep all, keep none, or compare with the value
    (`tracked`: keep |x| == value while the tie budget lasts)."""
    if t.bits == KEEP_ALL:
        return kernels.TH_ALL, 0.0
    if t.bits == KEEP_NONE:
        return kernels.TH_NONE, 0.0
    return (kernels.TH_VALUE if tracked else kernels.TH_GT), t.value


def tie_starts(units: list[int], prefixes: list[list[int]]) -> tuple:
    """((unit, (ties before it at each level)), ...) from per-level prefix lists in unit order."""
    return tuple((u, tuple(p[i] for p in prefixes)) for i, u in enumerate(units))


def unit_details(got, stat: Stat) -> tuple[list[int], list[list]]:
    """The units and, per unit in flat order, the (values, counts) of each requested bin."""
    per_unit = got[stat]
    units = sorted(per_unit)
    return units, [per_unit[u] for u in units]


class Sparsifier:
    """No sparsification."""

    def needs(self, model: int, numel: int, span, got) -> list[Stat]:
        return []

    def decide(self, model: int, numel: int, span, got) -> Sparse:
        return Sparse()


class TopK(Sparsifier):
    """TIES trimming (mergekit `magnitude`): keep exactly k = max(1, int(density*n)) largest |delta|.

    mergekit breaks ties at the threshold arbitrarily (an unstable parallel argsort); we keep the
    lowest flat indices, so the result is deterministic.
    """

    def __init__(self, density: float):
        self.density = density

    def _k(self, numel):
        return summaries.top_k_count(numel, self.density)

    def needs(self, model, numel, span, got):
        if self._k(numel) >= numel:
            return []
        hist = Stat("abs", model, span)
        if hist not in got:
            return [hist]
        return [Stat("bins", model, span, args=(summaries.locate(got[hist].hist, numel - self._k(numel) + 1)[0],))]

    def decide(self, model, numel, span, got):
        k = self._k(numel)
        if k >= numel:
            return Sparse()
        hist = got[Stat("abs", model, span)].hist
        bins = self.needs(model, numel, span, got)[0]
        units, details = unit_details(got, bins)
        t, prefixes = summaries.keep_top(numel, k, hist, [d[0] for d in details])
        kind, value = level(t, tracked=True)
        return Sparse(kernels.SP_SHRINK, (kind,), (value,), (t.ties_kept,), tie_starts(units, [prefixes]))


class PruneLE(Sparsifier):
    """Reference magnitude pruning (DPPA code): t = |delta| at 0-based index int(n*s) of the
    ascending order; every element <= t is pruned (ties pruned too); survivors keep their value."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def needs(self, model, numel, span, got):
        if numel == 0:
            return []
        hist = Stat("abs", model, span)
        if hist not in got:
            return [hist]
        rank = summaries.rank_for_prune_le(numel, self.sparsity)
        return [Stat("bins", model, span, args=(summaries.locate(got[hist].hist, rank)[0],))]

    def decide(self, model, numel, span, got):
        if numel == 0:
            return Sparse()
        hist = got[Stat("abs", model, span)].hist
        _, details = unit_details(got, self.needs(model, numel, span, got)[0])
        t = summaries.smallest(summaries.rank_for_prune_le(numel, self.sparsity), hist, [d[0] for d in details])
        kind, value = level(t, tracked=False)
        return Sparse(kernels.SP_SHRINK, (kind,), (value,), (0,))


class Bernoulli(Sparsifier):
    """DARE: keep each element with probability `density`, drawn from a counter-based stream keyed
    by (seed, model, tensor, index). `rescale` follows mergekit 0.1.5: multiply the survivors by
    ||delta||_1 / ||kept delta||_1 (skipped when either is below 1e-7)."""

    def __init__(self, density: float, rescale: bool, key: int):
        self.density, self.rescale, self.key = density, rescale, key
        self.limit = int(density * (1 << 24))

    def needs(self, model, numel, span, got):
        if self.density >= 1 or not self.rescale:
            return []
        return [Stat("dare", model, span, args=(self.key, self.limit))]

    def decide(self, model, numel, span, got):
        if self.density >= 1:
            return Sparse()
        scale = 1.0
        if self.rescale:
            sums = got[self.needs(model, numel, span, got)[0]]
            if sums.full >= 1e-7 and sums.kept >= 1e-7:
                scale = sums.full / sums.kept
        return Sparse(kernels.SP_BERNOULLI, key=self.key, limit=self.limit, scale=scale)
