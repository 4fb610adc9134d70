"""mergekit's generalized task arithmetic family, `linear`, and delta magnitude pruning.

A delta method is a sparsifier (how each fine-tune's delta is thinned) composed with a
combination (weighted sum, or TIES sign election and disjoint sum), as mergekit composes them;
`DELTA_METHODS` below is the whole family, one line each. Semantics follow mergekit 0.1.5
(docs/mergekit.md): sparsify per model and tensor, weight, optionally elect signs, sum, optionally
normalise by the (agreeing) weights, scale by lambda, add to the base, all in float32 in
mergekit's operation order, so results are bit-equal where the semantics are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import kernels, rng
from ..units import scratch
from .base import MergeMethod, Param, REQUIRED, ParamSets, density_check, same_rows, torch_order_sum
from .sparsify import Band, Bernoulli, MagPrune, PruneLE, Sparse, Sparsifier, TopK, kernel_records

_WEIGHT = Param(REQUIRED, (int, float), doc="scale of this model's delta")
_DENSITY = Param(1.0, (int, float), density_check, "fraction of the delta kept")
_NO_RESCALE = Param(False, bool, lambda v: "is not supported for this method yet (mergekit's L1 rescale of trimmed "
                    "deltas)" if v else None, "must stay false")


@dataclass(frozen=True, slots=True)
class Segments:
    """Pass-2 plan of one tensor: parts (flat span or None for all of it, one `Sparse` per
    model), the models' weights, and the combination's normalisation and lambda."""

    parts: tuple
    weights: tuple
    normalize: bool = False
    lam: float = 1.0


class DeltaMethod(MergeMethod):
    """base + lambda * combine_i(weight_i * sparsify_i(model_i - base))."""

    consensus = False
    bf16_deltas = False  # deltas rounded to bfloat16 (DPPA reference semantics)
    whole_slices = False  # units hold whole first-axis slices (DELLA ranks along dimension 1)
    global_params = {
        "normalize": Param(False, bool, doc="divide by the sum of weights"),
        "lambda": Param(1.0, (int, float), doc="scale of the merged delta"),
        "rescale": Param(False, bool, doc="accepted for mergekit compatibility; no effect here"),
        "int8_mask": Param(False, bool, doc="accepted for mergekit compatibility; no numeric effect"),
    }
    model_params = {"weight": _WEIGHT}

    def sparsifier(self, model: int, info) -> Sparsifier:
        return Sparsifier()

    def unit_multiple(self, shape):
        return math.prod(shape[1:]) if self.whole_slices else super().unit_multiple(shape)

    def tensor_statistics(self, info, got):
        return [s for i in range(len(info.models)) for s in self.sparsifier(i, info).needs(i, info.numel, None, got)]

    def tensor_plan(self, info, got):
        sparse = tuple(self.sparsifier(i, info).decide(i, info.numel, None, got) for i in range(len(info.models)))
        return Segments(((None, sparse),), tuple(float(m["weight"]) for m in info.models),
                        bool(info.globals["normalize"]), float(info.globals["lambda"]))

    def merge_unit(self, rows, plan: Segments, out, out_code):
        unit = rows.inp.unit
        code = kernels.CODES[rows.dtype]
        bad = np.zeros(rows.src.shape[0], np.int64)
        weights = np.array(plan.weights, np.float32)
        divisor = torch_order_sum(weights)
        if abs(divisor) < 1e-8:
            divisor = np.float32(1.0)
        combine = kernels.records(kernels.COMBINE_FIELDS, (), consensus=self.consensus, normalize=plan.normalize,
                                  divisor=divisor, lam=plan.lam)[()]
        for span, sparse in plan.parts:
            lo, hi = (0, unit.numel) if span is None else (max(span[0] - unit.flat_start, 0),
                                                            min(span[1] - unit.flat_start, unit.numel))
            if lo >= hi:
                continue
            masks = della_masks(rows, sparse, bad)
            models, levels = kernel_records(sparse, weights, unit.index)
            kernels.gta(rows.src, code, lo, hi, unit.flat_start + lo, self.bf16_deltas, models, levels, masks, combine,
                        out, out_code, bad)
        return bad

    def merge_planned_batch(self, batch, plans, out, out_code) -> np.ndarray:
        """A batch of whole small tensors planned before pass 2 (`plans`: DPPA's `DPUnitPlans`, each
        item one part, the whole tensor), merged with one `gta_segments` call on the records that
        `merge_unit` would make tensor by tensor, built from the plans' arrays at once."""
        models, levels, combine = plans.batch_records(self.consensus)
        bad = np.zeros(batch.src.shape[0], np.int64)
        kernels.gta_segments(batch.src, kernels.CODES[batch.dtype], batch.starts, self.bf16_deltas, models, levels,
                             np.zeros((models.shape[1], 1), np.uint8), combine, out, out_code, bad)
        return bad

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """The batch planned with arrays (one exact-rank kernel call for every tensor and model,
        `Sparsifier.batch_params`/`batch_stats`/`batch_ranks`/`batch_fill`) and merged with one
        `gta_segments` call: the records and the bytes `merge_unit` gives tensor by tensor (DELLA's
        masks made for the whole batch by `MagPrune.batch_stats`)."""
        kind = getattr(self, "sparse_kind", None)
        if kind not in BATCHED or self.bf16_deltas:
            return super().merge_batch(batch, infos, out, out_code, check_finite)
        n, K = len(infos), len(infos[0].models)
        code = kernels.CODES[batch.dtype]
        bad = np.zeros(batch.src.shape[0], np.int64)
        starts = batch.starts
        numel = np.diff(starts)
        sets = ParamSets(infos)
        weights = sets.of(_weights, np.float64).astype(np.float32)
        models = kernels.records(kernels.MODEL_FIELDS, (n, K), weight=weights)
        params = [kind.batch_params(self, m, infos, sets) for m in range(K)]
        masks = np.zeros((K, int(starts[-1]) if kind.masked else 1), np.uint8)
        for m, p in enumerate(params):
            p["mask"] = masks[m]
            kind.batch_stats(p, batch, m, bad)
        asked = [kind.batch_ranks(p, numel) for p in params]
        R = max([a[0].shape[1] for a in asked if a is not None] + [1])
        levels = kernels.records(kernels.LEVEL_FIELDS, (n, K, R))
        found = np.zeros((n, K, R, 3), np.int64)
        if any(a is not None for a in asked):
            ranks = np.ones((n, K, R), np.int64)
            active = np.zeros((n, K), np.bool_)
            for m, a in enumerate(asked):
                if a is not None:
                    ranks[:, m], active[:, m] = a
            keys = scratch("keys", 16 * int(numel.max(initial=0))).view(np.int64)
            kernels.exact_ranks_segments(batch.src, code, starts, False, ranks, active, found, keys,
                                         scratch("digits", 8 << 11).view(np.int64), bad)
        if check_finite and bad.any():
            return bad  # merge_work names the tensor
        for m, p in enumerate(params):
            kind.batch_fill(p, numel, found[:, m], models[:, m], levels[:, m])
        combine = kernels.records(kernels.COMBINE_FIELDS, n, consensus=self.consensus,
                                  normalize=sets.of(lambda info: bool(info.globals["normalize"]), np.bool_),
                                  divisor=torch_order_sums(weights),
                                  lam=sets.of(lambda info: float(info.globals["lambda"]), np.float64))
        if not kind.masked and (models["mode"] == kernels.SP_NONE).all() and same_rows(models, levels, combine):
            # nothing pruned and one set of parameters: nothing depends on where a tensor starts
            kernels.gta(batch.src, code, 0, int(starts[-1]), 0, self.bf16_deltas, models[0], levels[0], masks,
                        combine[0], out, out_code, bad)
            return bad
        kernels.gta_segments(batch.src, code, starts, self.bf16_deltas, models, levels, masks, combine, out, out_code,
                             bad)
        return bad


def _weights(info) -> list:
    return [m["weight"] for m in info.models]


def torch_order_sums(weights: np.ndarray) -> np.ndarray:
    """The divisor `DeltaMethod.merge_unit` uses, per row of float32 `weights` [tensors, models]:
    their `torch_order_sum`, 1 where that is below 1e-8 in magnitude."""
    total = _torch_order_rows(weights)
    return np.where(np.abs(total) < 1e-8, np.float32(1.0), total).astype(np.float32)


def _torch_order_rows(weights: np.ndarray) -> np.ndarray:
    """`torch_order_sum` of each row: the same float32 additions in the same order, on columns."""
    n, K = weights.shape
    if K >= 8:
        total = np.zeros(n, np.float32)
        for k in range(K):
            total = total + weights[:, k]
    else:
        part = [np.zeros(n, np.float32) for _ in range(4)]
        whole = K // 4
        for r in range(whole):
            for k in range(4):
                part[k] = part[k] + weights[:, 4 * r + k]
        for k in range(4 * whole, K):
            part[0] = part[0] + weights[:, k]
        for k in range(1, 4):
            part[0] = part[0] + part[k]
        total = np.float32(0.0) + part[0]
    return total.astype(np.float32)


def della_masks(rows, sparse: tuple[Sparse, ...], bad) -> np.ndarray:
    """DELLA's keep masks of the unit, one row per model (a 1 x 1 placeholder when no model uses
    one): ranks along dim 1 need whole vectors, so they are made for the unit before merging."""
    if not any(s.mode == kernels.SP_MASK for s in sparse):
        return np.zeros((len(sparse), 1), np.uint8)
    from ..statistics import della_mask_key

    unit = rows.inp.unit
    made = rows.della_keys or {}
    if all(s.mode != kernels.SP_MASK or made.get(k) == della_mask_key(k, s.key, *s.della) for k, s in enumerate(sparse)):
        masks, rows.della_masks, rows.della_keys = rows.della_masks, None, None  # those its statistics made
        return masks
    masks = np.zeros((len(sparse), unit.numel), np.uint8)
    d1, rest, slices = kernels.della_layout(rows.inp.models[0].shape, unit)
    for k, s in enumerate(sparse):
        if s.mode == kernels.SP_MASK:
            kernels.della_mask(rows.src, kernels.CODES[rows.dtype], k, 0, slices, d1, rest, unit.flat_start,
                               np.uint64(s.key), s.della[0], s.della[1], masks[k], bad)
    return masks


def _delta_method(name: str, summary: str, sparsifier=None, consensus: bool = False, normalize: bool = False,
                  rescale: str = "ignored", extra: dict | None = None, whole_slices: bool = False) -> type[DeltaMethod]:
    """One member of the family: its sparsifier (built per model and tensor from the model's
    parameters), whether signs are elected, and mergekit's defaults. `rescale`: "ignored"
    (accepted, no effect), "refused" (true is an error) or "default" (L1 rescale, on by default)."""
    params = dict(DeltaMethod.global_params, normalize=Param(normalize, bool, doc="divide by the (agreeing) weights"))
    if rescale == "refused":
        params["rescale"] = _NO_RESCALE
    elif rescale == "default":
        params["rescale"] = Param(True, bool, doc="L1-norm rescale of kept deltas")
    attrs = {"name": name, "summary": summary, "consensus": consensus, "global_params": params, "whole_slices": whole_slices,
             "model_params": {"weight": _WEIGHT, **({"density": _DENSITY} if sparsifier else {}), **(extra or {})}}
    if sparsifier is not None:
        attrs["sparsifier"] = lambda self, model, info: sparsifier(self, model, info)
    attrs["sparse_kind"] = _KINDS.get(sparsifier, Sparsifier)
    return type("".join(w.title() for w in name.split("_")), (DeltaMethod,), attrs)


def _topk(method, model, info):
    return TopK(info.models[model]["density"])


def _bernoulli(method, model, info):
    return Bernoulli(info.models[model]["density"], info.globals["rescale"], rng.stream_key(method.seed, model, info.name))


def _prune_le(method, model, info):
    return PruneLE(1.0 - info.models[model]["density"])


def _band(method, model, info):
    return Band(info.models[model]["density"], info.models[model]["gamma"])


def _della(method, model, info):
    d, eps = info.models[model]["density"], info.models[model]["epsilon"]
    if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
        from ..errors import UsageError

        raise UsageError(f"tensor {info.name!r}: models[{model}] density {d} +/- epsilon {eps} must stay in (0, 1)")
    return MagPrune(d, eps, info.globals["rescale"], rng.stream_key(method.seed, model, info.name))


_KINDS = {_topk: TopK, _bernoulli: Bernoulli, _prune_le: PruneLE, _band: Band, _della: MagPrune}
BATCHED = (Sparsifier, TopK, PruneLE, Band, Bernoulli, MagPrune)  # sparsifiers `merge_batch` plans with arrays

_GAMMA = {"gamma": Param(0.01, (int, float), lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
                         "fraction of the largest |delta| dropped")}
_EPSILON = {"epsilon": Param(0.15, (int, float), lambda v: None if v >= 0 else "must be >= 0",
                             "half-width of the keep-probability window")}

# The family, one line each (names bound here so that pickling finds the classes).
(TaskArithmetic, Ties, DareLinear, DareTies, Magnitude, Breadcrumbs, BreadcrumbsTies, Della,
 DellaLinear) = DELTA_METHODS = (
    _delta_method("task_arithmetic", "base + lambda * sum_i weight_i * (model_i - base)"),
    _delta_method("ties", "TIES: keep the top-density |delta| per tensor, elect signs by weighted sum, disjoint mean",
                  _topk, consensus=True, normalize=True, rescale="refused"),
    _delta_method("dare_linear", "DARE: random drop (keep probability = density), L1 rescale, then weighted sum",
                  _bernoulli, rescale="default"),
    _delta_method("dare_ties", "DARE drop + L1 rescale, then TIES sign election and disjoint sum",
                  _bernoulli, consensus=True, rescale="default"),
    _delta_method("magnitude", "delta magnitude pruning (DPPA reference semantics: prune |delta| <= the "
                  "int(n*(1-density))-th smallest), then weighted sum", _prune_le, rescale="refused"),
    _delta_method("breadcrumbs", "Model Breadcrumbs: drop the largest (gamma) and smallest |delta|, keep density, "
                  "weighted sum", _band, rescale="refused", extra=_GAMMA),
    _delta_method("breadcrumbs_ties", "Model Breadcrumbs with TIES sign election", _band, consensus=True,
                  rescale="refused", extra=_GAMMA),
    _delta_method("della", "DELLA: keep each delta with a probability rising with its rank in its row, L1 "
                  "rescale, TIES sign election, disjoint mean", _della, consensus=True, normalize=True,
                  rescale="default", extra=_EPSILON, whole_slices=True),
    _delta_method("della_linear", "DELLA's rank-based drop and L1 rescale, then weighted sum", _della,
                  rescale="default", extra=_EPSILON, whole_slices=True),
)


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models' weights: sum_i w_i x_i / sum_i w_i"
    needs_base = False
    base_is_input = True
    global_params = {"normalize": Param(True, bool, doc="divide by the sum of weights")}
    model_params = {"weight": _WEIGHT}

    def tensor_plan(self, info, got):
        return (tuple(float(m["weight"]) for m in info.models), bool(info.globals["normalize"]))

    def merge_unit(self, rows, plan, out, out_code):
        weights = np.array(plan[0], np.float32)
        bad = np.zeros(rows.src.shape[0], np.int64)
        kernels.weighted_sum(rows.src, kernels.CODES[rows.dtype], 0, rows.inp.unit.numel, weights,
                             plan[1], torch_order_sum(weights), out, out_code, bad)
        return bad

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Every tensor of the batch in one `weighted_sum_segments` call (the bytes `merge_unit` gives)."""
        sets = ParamSets(infos)
        weights = sets.of(_weights, np.float64).astype(np.float32)
        normalize = sets.of(lambda info: bool(info.globals["normalize"]), np.bool_)
        bad = np.zeros(batch.src.shape[0], np.int64)
        totals = _torch_order_rows(weights)
        if same_rows(weights, normalize):
            kernels.weighted_sum(batch.src, kernels.CODES[batch.dtype], 0, int(batch.starts[-1]), weights[0],
                                 bool(normalize[0]), totals[0], out, out_code, bad)
            return bad
        kernels.weighted_sum_segments(batch.src, kernels.CODES[batch.dtype], batch.starts, weights, normalize, totals,
                                      out, out_code, bad)
        return bad


