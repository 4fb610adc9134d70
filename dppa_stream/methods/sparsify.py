"""Sparsifiers: how one fine-tune's delta of one tensor (or span of it) is thinned before merging.

Each says which statistics it needs given what is known (`needs`: a threshold's boundary-bin
round comes once its histogram is known) and turns them into a `Sparse` decision for the pass-2
kernel (`decide`). Exact thresholds come from bit-pattern histograms through `ranks.Ranks`, so
they equal an in-memory sort whatever the chunking. Adding a sparsifier: its row function in
`kernels/delta.py`, its `SP_*` code in `kernels/codes.py`, and its class here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels, summaries
from ..statistics import Abs, Dare, Della, Stat
from ..summaries import KEEP_ALL, KEEP_NONE, Threshold
from .ranks import Ranks


@dataclass(frozen=True, slots=True)
class Level:
    """One threshold on |delta| (the kernel's `LEVEL` record, field for field): keep |delta| >
    value, and the ties (|delta| == value, in flat order) whose running index is in [first, stop);
    `factor`: what SP_BANDS multiplies an element first kept at this level by."""

    kind: int
    value: float = 0.0
    stop: int = 0
    first: int = 0
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class Sparse:
    """What the kernel does to one model's delta on one span (see `kernels.gta`): the sparsifier
    `mode` (SP_*), its threshold `levels`, the ties at each level before each unit (`tie_starts`:
    ((unit, (per level, ...)), ...), in flat order), and the `MODEL` record's other fields."""

    mode: int = kernels.SP_NONE
    levels: tuple = ()
    tie_starts: tuple = ()
    scale: float = 1.0  # times the thinned delta: L1 rescale (DARE, DELLA), DPA's factor on unpruned tensors
    key: int = 0  # SP_BERNOULLI, SP_MASK: counter RNG stream
    limit: int = 0  # SP_BERNOULLI: keep limit
    della: tuple = ()  # SP_MASK: (density, epsilon) of DELLA's rank-based keep probabilities

    def seen(self, unit: int) -> tuple:
        """Per level: the ties before `unit` (its running tie index starts there)."""
        return dict(self.tie_starts).get(unit, (0,) * len(self.levels))


# kernel_records fills a level record as one tuple, in the declaration's order (LEVEL_ORDER; a
# test holds it to kernels.LEVEL_FIELDS, which is not read here: importing it would load numba)
LEVEL_ORDER = ("kind", "value", "factor", "first", "stop", "seen")


def kernel_records(sparse: tuple[Sparse, ...], weights, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """`kernels.gta`'s `models` and `levels` records for one unit, filled by field name."""
    K = len(sparse)
    models = kernels.records(kernels.MODEL_FIELDS, K, mode=[s.mode for s in sparse],
                             nlevels=[len(s.levels) for s in sparse], key=[s.key for s in sparse],
                             limit=[s.limit for s in sparse], scale=[s.scale for s in sparse], weight=weights)
    levels = kernels.records(kernels.LEVEL_FIELDS, (K, max([len(s.levels) for s in sparse] + [1])))
    for k, s in enumerate(sparse):
        for i, (lev, seen) in enumerate(zip(s.levels, s.seen(unit))):
            levels[k, i] = (lev.kind, lev.value, lev.factor, lev.first, lev.stop, seen)  # LEVEL_FIELDS' order
    return models, levels


def level(t: Threshold, tracked: bool, **fields) -> Level:
    """A threshold as a level: keep all, keep none, or compare with the value (`tracked`: keep the
    ties the threshold keeps, lowest flat index first)."""
    if t.bits == KEEP_ALL:
        return Level(kernels.TH_ALL, **fields)
    if t.bits == KEEP_NONE:
        return Level(kernels.TH_NONE, **fields)
    if tracked:
        return Level(kernels.TH_VALUE, t.value, t.ties_kept, **fields)
    return Level(kernels.TH_GT, t.value, **fields)


def abs_ranks(model: int, span) -> Ranks:
    """Exact ranks of |delta| of one model on one span (float32 deltas)."""
    return Ranks(Abs(model, span))


class Sparsifier:
    """No sparsification.

    A batch of whole small tensors (`DeltaMethod.merge_batch`) is planned per model with arrays,
    one entry per tensor, by the class methods: `batch_ranks` says which exact ranks of |delta|
    each tensor needs (all found in one kernel call), `batch_fill` writes the `MODEL` and `LEVEL`
    records that `decide` would make, field for field, from them."""

    fields: tuple = ()  # the model parameters the batch methods read, per tensor
    masked = False  # keeps a mask per model over the batch's columns (`batch_stats` fills p["mask"])

    def needs(self, model: int, numel: int, span, got) -> list[Stat]:
        return []

    def decide(self, model: int, numel: int, span, got) -> Sparse:
        return Sparse()

    @classmethod
    def batch_params(cls, method, model: int, infos, sets) -> dict:
        """This model's parameters `fields` of every tensor of the batch (`sets`: their
        `base.ParamSets`), as arrays."""
        return {f: sets.of(lambda info: info.models[model][f], np.float64) for f in cls.fields}

    @classmethod
    def batch_stats(cls, p: dict, batch, model: int, bad: np.ndarray) -> None:
        """Statistics other than ranks, computed from the batch's rows into `p`."""

    @classmethod
    def batch_ranks(cls, p: dict, numel: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(ranks [tensors, R] (1-based), which tensors need them [tensors]), or None: no ranks."""
        return None

    @classmethod
    def batch_fill(cls, p: dict, numel: np.ndarray, found, models: np.ndarray, levels: np.ndarray) -> None:
        """Fill this model's records of every tensor: `models` [tensors] (defaults: no
        sparsification), `levels` [tensors, L]; `found` [tensors, R, 3]: (key, below, ties) at
        each rank `batch_ranks` asked for."""


def _level_kind(bits: np.ndarray, kind: int) -> np.ndarray:
    """`level`'s kind per tensor: the sentinel thresholds keep all or none, others compare."""
    return np.where(bits == KEEP_ALL, kernels.TH_ALL, np.where(bits == KEEP_NONE, kernels.TH_NONE, kind))


def _key_values(bits: np.ndarray) -> np.ndarray:
    """Keys (float32 bit patterns) as float32 values, as `Boundary.value` gives them."""
    return bits.astype(np.uint32).view(np.float32)


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
        k = self._k(numel)
        return [] if k >= numel else abs_ranks(model, span).needs(got, [numel - k + 1])

    def decide(self, model, numel, span, got):
        k = self._k(numel)
        if k >= numel:
            return Sparse()
        (b,) = abs_ranks(model, span).resolve(got, [numel - k + 1])
        return Sparse(kernels.SP_SHRINK, (level(b.threshold(numel, k), tracked=True),),
                      tuple((u, (n,)) for u, n in b.starts))

    fields = ("density",)

    @staticmethod
    def _batch_k(p, numel):
        d = p["density"]
        k = np.maximum(1, (d * numel).astype(np.int64))
        return np.where(d >= 1, numel, np.where(numel > 0, k, 0))

    @classmethod
    def batch_ranks(cls, p, numel):
        k = cls._batch_k(p, numel)
        return (numel - k + 1)[:, None], k < numel

    @classmethod
    def batch_fill(cls, p, numel, found, models, levels):
        k = cls._batch_k(p, numel)
        on = k < numel
        bits, below, ties = found[:, 0, 0], found[:, 0, 1], found[:, 0, 2]
        kind = _level_kind(bits, kernels.TH_VALUE)
        value = np.where(kind == kernels.TH_VALUE, _key_values(bits), np.float32(0))
        stop = np.where(kind == kernels.TH_VALUE, k - (numel - below - ties), 0)
        models["mode"] = np.where(on, kernels.SP_SHRINK, kernels.SP_NONE)
        models["nlevels"] = on
        lev = levels[:, 0]
        lev["kind"] = np.where(on, kind, lev["kind"])
        lev["value"] = np.where(on, value, lev["value"])
        lev["stop"] = np.where(on, stop, lev["stop"])


class PruneLE(Sparsifier):
    """Reference magnitude pruning (DPPA code): t = |delta| at 0-based index int(n*s) of the
    ascending order; every element <= t is pruned (ties pruned too); survivors keep their value."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def _rank(self, numel):
        return summaries.rank_for_prune_le(numel, self.sparsity)

    def needs(self, model, numel, span, got):
        return abs_ranks(model, span).needs(got, [self._rank(numel)]) if numel else []

    def decide(self, model, numel, span, got):
        if numel == 0:
            return Sparse()
        (b,) = abs_ranks(model, span).resolve(got, [self._rank(numel)])
        return Sparse(kernels.SP_SHRINK, (level(Threshold(b.bits), tracked=False),))

    fields = ("density",)

    @classmethod
    def batch_ranks(cls, p, numel):
        sparsity = 1.0 - p["density"]
        return (np.minimum((numel * sparsity).astype(np.int64), numel - 1) + 1)[:, None], numel > 0

    @classmethod
    def batch_fill(cls, p, numel, found, models, levels):
        on = numel > 0
        bits = found[:, 0, 0]
        kind = _level_kind(bits, kernels.TH_GT)
        models["mode"] = np.where(on, kernels.SP_SHRINK, kernels.SP_NONE)
        models["nlevels"] = on
        lev = levels[:, 0]
        lev["kind"] = np.where(on, kind, lev["kind"])
        lev["value"] = np.where(on & (kind == kernels.TH_GT), _key_values(bits), lev["value"])


class Band(Sparsifier):
    """Breadcrumbs (mergekit `magnitude_outliers`): drop the n_top = int(gamma n) largest |delta|
    and the smallest, keeping target = int(density n): ranks [n_bot, n_bot + target) of the
    ascending order, n_bot = max(0, n - target - n_top). Ties at either boundary are ranked by flat
    index (mergekit's argsort breaks them arbitrarily)."""

    def __init__(self, density: float, gamma: float):
        self.density, self.gamma = density, gamma

    def _ranks(self, numel: int) -> list[int]:
        """1-based ranks of the first and the last element kept."""
        target = int(self.density * numel)
        n_bot = max(0, numel - target - int(self.gamma * numel))
        return [n_bot + 1, n_bot + target]

    def needs(self, model, numel, span, got):
        first, last = self._ranks(numel)
        if self.density >= 1 or last < first:
            return []
        return abs_ranks(model, span).needs(got, [first, last])

    def decide(self, model, numel, span, got):
        first, last = self._ranks(numel)
        if self.density >= 1:
            return Sparse()
        if last < first:
            return Sparse(kernels.SP_SHRINK, (Level(kernels.TH_NONE),))
        lo, hi = abs_ranks(model, span).resolve(got, [first, last])
        # the kept ranks [first, last] among each boundary's ties, as windows of their running index
        if lo.bits == hi.bits:  # one tie class holds both boundaries
            levels = (Level(kernels.TH_VALUE, lo.value, last - lo.below, first - 1 - lo.below),
                      Level(kernels.TH_VALUE, hi.value))
        else:
            levels = (Level(kernels.TH_VALUE, lo.value, lo.ties, first - 1 - lo.below),
                      Level(kernels.TH_VALUE, hi.value, last - hi.below))
        starts = tuple((u, (a, b)) for (u, a), (_, b) in zip(lo.starts, hi.starts))
        return Sparse(kernels.SP_RANGE, levels, starts)

    fields = ("density", "gamma")

    @staticmethod
    def _batch_ranks(p, numel):
        target = (p["density"] * numel).astype(np.int64)
        n_bot = np.maximum(0, numel - target - (p["gamma"] * numel).astype(np.int64))
        return n_bot + 1, n_bot + target

    @classmethod
    def batch_ranks(cls, p, numel):
        first, last = cls._batch_ranks(p, numel)
        return np.stack([first, last], axis=1), (p["density"] < 1) & (last >= first)

    @classmethod
    def batch_fill(cls, p, numel, found, models, levels):
        first, last = cls._batch_ranks(p, numel)
        dense = p["density"] >= 1
        none = ~dense & (last < first)
        on = ~dense & ~none
        lo_bits, lo_below, lo_ties = found[:, 0, 0], found[:, 0, 1], found[:, 0, 2]
        hi_bits, hi_below = found[:, 1, 0], found[:, 1, 1]
        same = lo_bits == hi_bits  # one tie class holds both boundaries
        models["mode"] = np.where(dense, kernels.SP_NONE, np.where(none, kernels.SP_SHRINK, kernels.SP_RANGE))
        models["nlevels"] = np.where(dense, 0, np.where(none, 1, 2))
        low, high = levels[:, 0], levels[:, 1]
        low["kind"] = np.where(none, kernels.TH_NONE, np.where(on, kernels.TH_VALUE, low["kind"]))
        low["value"] = np.where(on, _key_values(lo_bits), low["value"])
        low["stop"] = np.where(on, np.where(same, last - lo_below, lo_ties), low["stop"])
        low["first"] = np.where(on, first - 1 - lo_below, low["first"])
        high["kind"] = np.where(on, kernels.TH_VALUE, high["kind"])
        high["value"] = np.where(on, _key_values(hi_bits), high["value"])
        high["stop"] = np.where(on & ~same, last - hi_below, high["stop"])


class MagPrune(Sparsifier):
    """DELLA's MagPrune (mergekit `della_magprune`): within each vector along dim 1, rank |delta|; keep each
    element with probability density - epsilon + 2 epsilon (rank - 1) / (n - 1), drawn from the
    counter RNG; `rescale`: L1 rescale as DARE's."""

    def __init__(self, density: float, epsilon: float, rescale: bool, key: int):
        self.density, self.epsilon, self.rescale, self.key = density, epsilon, rescale, key

    def needs(self, model, numel, span, got):
        if not 0 < self.density < 1 or not self.rescale or not numel:
            return []
        return [Della(model, span, args=(self.key, self.density, self.epsilon))]

    def decide(self, model, numel, span, got):
        if self.density >= 1:
            return Sparse()
        if self.density <= 0:
            return Sparse(kernels.SP_SHRINK, (Level(kernels.TH_NONE),))
        scale = 1.0
        if self.rescale and numel:
            sums = got[self.needs(model, numel, span, got)[0]]
            if sums.full >= 1e-7 and sums.kept >= 1e-7:
                scale = sums.full / sums.kept
        return Sparse(kernels.SP_MASK, key=self.key, scale=scale, della=(self.density, self.epsilon))

    fields = ("density", "epsilon")
    masked = True

    @classmethod
    def batch_params(cls, method, model, infos, sets):
        p = _keyed(super().batch_params(method, model, infos, sets), method, model, infos, sets)
        d, eps = p["density"], p["epsilon"]
        wrong = (0 < d) & (d < 1) & ~((0 < d - eps) & (d + eps < 1))
        if wrong.any():  # the per-tensor check's error, naming the first such tensor
            method.sparsifier(model, infos[int(np.argmax(wrong))])
        return p

    @classmethod
    def batch_stats(cls, p, batch, model, bad):
        """The masks of every tensor (`p["mask"]`: this model's row over the batch's columns) and
        the L1 rescale, in one kernel call: `decide`'s and `della_masks`' values."""
        d = p["density"]
        numel = np.diff(batch.starts)
        active = (0 < d) & (d < 1)
        sums = active & p["rescale"] & (numel > 0)
        n = len(d)
        p["scale"] = np.ones(n)
        if not active.any():
            return
        d1, rest, slices = della_layouts([models[0].shape for models in batch.items.models], numel)
        full, kept = np.zeros((n, 256), np.int64), np.zeros((n, 256), np.int64)
        kernels.della_mask_segments(batch.src, kernels.CODES[batch.dtype], model, batch.starts, d1, rest, slices,
                                    active, sums, p["key"], d, p["epsilon"], p["mask"], full, kept, bad)
        _l1_rescale(p["scale"], sums, full, kept)

    @classmethod
    def batch_fill(cls, p, numel, found, models, levels):
        d = p["density"]
        on, none = (0 < d) & (d < 1), d <= 0
        models["mode"] = np.where(on, kernels.SP_MASK, np.where(none, kernels.SP_SHRINK, kernels.SP_NONE))
        models["nlevels"] = none
        models["key"] = np.where(on, p["key"], 0)
        models["scale"] = np.where(on, p["scale"], 1.0)
        lev = levels[:, 0]
        lev["kind"] = np.where(none, kernels.TH_NONE, lev["kind"])


def _l1_rescale(scale: np.ndarray, use: np.ndarray, full: np.ndarray, kept: np.ndarray) -> None:
    """mergekit's rescale of each tensor in `use`: ||delta||_1 / ||kept delta||_1 into `scale`, from
    exact per-exponent sums of both (`kernels.exact_sums`), skipped where either is below 1e-7."""
    a, b = np.zeros(len(use)), np.zeros(len(use))
    kernels.exact_sums(full, a)
    kernels.exact_sums(kept, b)
    use = use & (a >= 1e-7) & (b >= 1e-7)
    scale[use] = a[use] / b[use]


def della_layouts(shapes: list, numel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`kernels.della_layout` of whole tensors of these `shapes` (`numel` elements each), as
    columns: one array conversion when they have one number of dimensions (an MoE batch)."""
    n = len(shapes)
    dims = set(map(len, shapes))
    if len(dims) == 1 and min(dims) >= 2:
        s = np.array(shapes, np.int64).reshape(n, -1)
        d1, rest = s[:, 1], s[:, 2:].prod(axis=1)
        width = d1 * rest
        return d1, rest, np.where(width > 0, numel // np.maximum(width, 1), 0)
    from types import SimpleNamespace

    cols = [kernels.della_layout(shape, SimpleNamespace(numel=int(m))) for shape, m in zip(shapes, numel)]
    return tuple(np.array(c, np.int64).reshape(n) for c in zip(*cols)) if cols else (np.zeros(0, np.int64),) * 3


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
        return [Dare(model, span, args=(self.key, self.limit))]

    def decide(self, model, numel, span, got):
        if self.density >= 1:
            return Sparse()
        scale = 1.0
        if self.rescale:
            sums = got[self.needs(model, numel, span, got)[0]]
            if sums.full >= 1e-7 and sums.kept >= 1e-7:
                scale = sums.full / sums.kept
        return Sparse(kernels.SP_BERNOULLI, key=self.key, limit=self.limit, scale=scale)

    fields = ("density",)

    @classmethod
    def batch_params(cls, method, model, infos, sets):
        p = _keyed(super().batch_params(method, model, infos, sets), method, model, infos, sets)
        p["limit"] = (p["density"] * (1 << 24)).astype(np.int64)
        return p

    @classmethod
    def batch_stats(cls, p, batch, model, bad):
        active = (p["density"] < 1) & p["rescale"]
        p["scale"] = np.ones(len(active))
        if not active.any():
            return
        n = len(active)
        full, kept = np.zeros((n, 256), np.int64), np.zeros((n, 256), np.int64)
        kernels.dare_sums_segments(batch.src, kernels.CODES[batch.dtype], model, batch.starts, active, p["key"],
                                   p["limit"].astype(np.uint64), full, kept, bad)
        _l1_rescale(p["scale"], active, full, kept)

    @classmethod
    def batch_fill(cls, p, numel, found, models, levels):
        on = p["density"] < 1
        models["mode"] = np.where(on, kernels.SP_BERNOULLI, kernels.SP_NONE)
        models["key"] = np.where(on, p["key"], 0)
        models["limit"] = np.where(on, p["limit"], 0)
        models["scale"] = np.where(on, p["scale"], 1.0)


def _keyed(p: dict, method, model: int, infos, sets) -> dict:
    """A random sparsifier's batch parameters `p` with each tensor's RNG stream key and whether it
    is L1-rescaled."""
    from .. import rng

    p["key"] = rng.stream_keys(method.seed, model, infos.names)
    p["rescale"] = sets.of(lambda info: bool(info.globals["rescale"]), np.bool_)
    return p
