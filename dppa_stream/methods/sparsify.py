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


@dataclass(frozen=True, slots=True)
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
    key: int = 0  # SP_BERNOULLI, SP_MASK: counter RNG stream
    limit: int = 0  # SP_BERNOULLI: keep limit
    scale: float = 1.0  # SP_BERNOULLI, SP_MASK, SP_RANGE: L1 rescale
    windows: tuple = ()  # SP_RANGE: tie-index windows (lo start, lo stop, hi stop)
    della: tuple = ()  # SP_MASK: (density, epsilon) of DELLA's rank-based keep probabilities

    def budgets(self, unit: int) -> list[int]:
        """Per level: ties it may still keep in this unit (SP_RANGE: the running tie indices the
        unit starts at)."""
        starts = dict(self.tie_starts).get(unit, (0,) * len(self.ties))
        if self.mode == kernels.SP_RANGE:
            return list(starts)
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
        return [Stat("bins", model, span, args=(summaries.locate(got[hist], numel - self._k(numel) + 1)[0],))]

    def decide(self, model, numel, span, got):
        k = self._k(numel)
        if k >= numel:
            return Sparse()
        hist = got[Stat("abs", model, span)]
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
        return [Stat("bins", model, span, args=(summaries.locate(got[hist], rank)[0],))]

    def decide(self, model, numel, span, got):
        if numel == 0:
            return Sparse()
        hist = got[Stat("abs", model, span)]
        _, details = unit_details(got, self.needs(model, numel, span, got)[0])
        t = summaries.smallest(summaries.rank_for_prune_le(numel, self.sparsity), hist, [d[0] for d in details])
        kind, value = level(t, tracked=False)
        return Sparse(kernels.SP_SHRINK, (kind,), (value,), (0,))


class Band(Sparsifier):
    """Breadcrumbs (mergekit `magnitude_outliers`): drop the n_top = int(gamma n) largest |delta|
    and the smallest, keeping target = int(density n): ranks [n_bot, n_bot + target) of the
    ascending order, n_bot = max(0, n - target - n_top). Ties at either boundary are ranked by flat
    index (mergekit's argsort breaks them arbitrarily)."""

    def __init__(self, density: float, gamma: float):
        self.density, self.gamma = density, gamma

    def _ranks(self, numel: int) -> tuple[int, int]:
        target = int(self.density * numel)
        n_bot = max(0, numel - target - int(self.gamma * numel))
        return n_bot, target

    def needs(self, model, numel, span, got):
        n_bot, target = self._ranks(numel)
        if self.density >= 1 or target <= 0:
            return []
        hist = Stat("abs", model, span)
        if hist not in got:
            return [hist]
        h = got[hist]
        return [Stat("bins", model, span, args=(summaries.locate(h, n_bot + 1)[0], summaries.locate(h, n_bot + target)[0]))]

    def decide(self, model, numel, span, got):
        n_bot, target = self._ranks(numel)
        if self.density >= 1:
            return Sparse()
        if target <= 0:
            return Sparse(kernels.SP_SHRINK, (kernels.TH_NONE,), (0.0,), (0,))
        hist = got[Stat("abs", model, span)]
        stat = self.needs(model, numel, span, got)[0]
        units, details = unit_details(got, stat)
        lo = summaries.smallest(n_bot + 1, hist, [d[0] for d in details])
        hi = summaries.smallest(n_bot + target, hist, [d[1] for d in details])
        below_lo = summaries.count_lt(hist, [d[0] for d in details], lo.bits)
        below_hi = summaries.count_lt(hist, [d[1] for d in details], hi.bits)
        if lo.bits == hi.bits:  # one tie class holds both boundaries
            windows = (n_bot - below_lo, n_bot + target - below_lo, 0)
        else:
            windows = (n_bot - below_lo, lo.ties_total, n_bot + target - below_hi)
        starts = [[], []]
        for j, t in enumerate((lo, hi)):
            run = 0
            for d in details:
                starts[j].append(run)
                vals, counts = d[j]
                run += int(counts[vals == (t.bits & 0xFFFF)].sum())
        return Sparse(kernels.SP_RANGE, (kernels.TH_VALUE, kernels.TH_VALUE), (lo.value, hi.value), (0, 0),
                      tie_starts(units, starts), windows=windows)


class MagPrune(Sparsifier):
    """DELLA's MagPrune (mergekit `della_magprune`): within each vector along dim 1, rank |delta|; keep each
    element with probability density - epsilon + 2 epsilon (rank - 1) / (n - 1), drawn from the
    counter RNG; `rescale`: L1 rescale as DARE's."""

    def __init__(self, density: float, epsilon: float, rescale: bool, key: int):
        self.density, self.epsilon, self.rescale, self.key = density, epsilon, rescale, key

    def needs(self, model, numel, span, got):
        if not 0 < self.density < 1 or not self.rescale or not numel:
            return []
        return [Stat("della", model, span, args=(self.key, self.density, self.epsilon))]

    def decide(self, model, numel, span, got):
        if self.density >= 1:
            return Sparse()
        if self.density <= 0:
            return Sparse(kernels.SP_SHRINK, (kernels.TH_NONE,), (0.0,), (0,))
        scale = 1.0
        if self.rescale and numel:
            sums = got[self.needs(model, numel, span, got)[0]]
            if sums.full >= 1e-7 and sums.kept >= 1e-7:
                scale = sums.full / sums.kept
        return Sparse(kernels.SP_MASK, key=self.key, scale=scale, della=(self.density, self.epsilon))


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
