"""mergekit's generalized task arithmetic family, `linear`, and delta magnitude pruning.

A delta method is a sparsifier (how each fine-tune's delta is thinned) composed with a
combination (weighted sum, or TIES sign election and disjoint sum), as mergekit composes them;
`DELTA_METHODS` below is the whole family, one line each. Semantics follow mergekit 0.1.5
(docs/mergekit.md): sparsify per model and tensor, weight, optionally elect signs, sum, optionally
normalise by the (agreeing) weights, scale by lambda, add to the base, all in float32 in
mergekit's operation order, so results are bit-equal where the semantics are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels, rng
from .base import MergeMethod, Param, REQUIRED, density_check, torch_order_sum
from .sparsify import Bernoulli, PruneLE, Sparse, Sparsifier, TopK

_WEIGHT = Param(REQUIRED, (int, float), doc="scale of this model's delta")
_DENSITY = Param(1.0, (int, float), density_check, "fraction of the delta kept")
_NO_RESCALE = Param(False, bool, lambda v: "is not supported for this method yet (mergekit's L1 rescale of trimmed "
                    "deltas)" if v else None, "must stay false")


@dataclass(frozen=True)
class Segments:
    """Pass-2 plan of one tensor: (flat span or None for all of it, one `Sparse` per model)."""

    parts: tuple


class DeltaMethod(MergeMethod):
    """base + lambda * combine_i(weight_i * sparsify_i(model_i - base))."""

    consensus = False
    bf16_deltas = False  # deltas rounded to bfloat16 (DPPA reference semantics)
    global_params = {
        "normalize": Param(False, bool, doc="divide by the sum of weights"),
        "lambda": Param(1.0, (int, float), doc="scale of the merged delta"),
        "rescale": Param(False, bool, doc="accepted for mergekit compatibility; no effect here"),
        "int8_mask": Param(False, bool, doc="accepted for mergekit compatibility; no numeric effect"),
    }
    model_params = {"weight": _WEIGHT}

    def __init__(self, params, model_params, seed):
        super().__init__(params, model_params, seed)
        self.weights = np.array([float(m["weight"]) for m in model_params], np.float32)

    def sparsifier(self, model: int, tensor: str) -> Sparsifier:
        return Sparsifier()

    def tensor_statistics(self, entry, got):
        return [s for i in range(len(self.mparams)) for s in self.sparsifier(i, entry.name).needs(i, entry.numel, None, got)]

    def tensor_plan(self, entry, got):
        return Segments(((None, tuple(self.sparsifier(i, entry.name).decide(i, entry.numel, None, got)
                                      for i in range(len(self.mparams)))),))

    def merge_unit(self, rows, plan: Segments, out, out_code):
        unit = rows.inp.unit
        code = kernels.CODES[rows.dtype]
        bad = np.zeros(rows.src.shape[0], np.int64)
        weights = self.weights
        use_w = weights != 1
        normalize, lam = bool(self.params["normalize"]), np.float32(self.params["lambda"])
        divisor = torch_order_sum(weights)
        if abs(divisor) < 1e-8:
            divisor = np.float32(1.0)
        for span, sparse in plan.parts:
            lo, hi = (0, unit.numel) if span is None else (max(span[0] - unit.flat_start, 0),
                                                            min(span[1] - unit.flat_start, unit.numel))
            if lo >= hi:
                continue
            kernels.gta(rows.src, code, lo, hi, unit.flat_start + lo, self.bf16_deltas, *_sparse_arrays(sparse, unit.index),
                        weights, use_w, self.consensus, normalize, divisor, lam, lam != 1, out, out_code, bad)
        return bad


def _sparse_arrays(sparse: tuple[Sparse, ...], unit: int) -> tuple:
    """The kernel's per-model parameter arrays for one unit."""
    K = len(sparse)
    L = max([len(s.kinds) for s in sparse] + [1])
    kinds = np.zeros((K, L), np.int64)
    values = np.zeros((K, L), np.float32)
    budget = np.zeros((K, L), np.int64)
    factors = np.zeros((K, L), np.float32)
    for k, s in enumerate(sparse):
        n = len(s.kinds)
        kinds[k, :n] = s.kinds
        values[k, :n] = s.values
        budget[k, :n] = s.budgets(unit)
        factors[k, :len(s.factors)] = s.factors
    return (np.array([s.mode for s in sparse], np.int64), kinds, values, budget, factors,
            np.array([len(s.kinds) for s in sparse], np.int64),
            np.array([s.dense for s in sparse], np.float32), np.array([s.dense != 1 for s in sparse]),
            np.array([s.key for s in sparse], np.uint64), np.array([s.limit for s in sparse], np.uint64),
            np.array([s.scale for s in sparse], np.float32), np.array([s.scale != 1 for s in sparse]))


def _delta_method(name: str, summary: str, sparsifier=None, consensus: bool = False, normalize: bool = False,
                  rescale: str = "ignored") -> type[DeltaMethod]:
    """One member of the family: its sparsifier (built per model and tensor from the model's
    parameters), whether signs are elected, and mergekit's defaults. `rescale`: "ignored"
    (accepted, no effect), "refused" (true is an error) or "default" (L1 rescale, on by default)."""
    params = dict(DeltaMethod.global_params, normalize=Param(normalize, bool, doc="divide by the (agreeing) weights"))
    if rescale == "refused":
        params["rescale"] = _NO_RESCALE
    elif rescale == "default":
        params["rescale"] = Param(True, bool, doc="L1-norm rescale of kept deltas")
    attrs = {"name": name, "summary": summary, "consensus": consensus, "global_params": params,
             "model_params": {"weight": _WEIGHT, **({"density": _DENSITY} if sparsifier else {})}}
    if sparsifier is not None:
        attrs["sparsifier"] = lambda self, model, tensor: sparsifier(self, model, tensor)
    return type("".join(w.title() for w in name.split("_")), (DeltaMethod,), attrs)


def _topk(method, model, tensor):
    return TopK(method.mparams[model]["density"])


def _bernoulli(method, model, tensor):
    return Bernoulli(method.mparams[model]["density"], method.params["rescale"], rng.stream_key(method.seed, model, tensor))


def _prune_le(method, model, tensor):
    return PruneLE(1.0 - method.mparams[model]["density"])


# The family, one line each (names bound here so that pickling finds the classes).
TaskArithmetic, Ties, DareLinear, DareTies, Magnitude = DELTA_METHODS = (
    _delta_method("task_arithmetic", "base + lambda * sum_i weight_i * (model_i - base)"),
    _delta_method("ties", "TIES: keep the top-density |delta| per tensor, elect signs by weighted sum, disjoint mean",
                  _topk, consensus=True, normalize=True, rescale="refused"),
    _delta_method("dare_linear", "DARE: random drop (keep probability = density), L1 rescale, then weighted sum",
                  _bernoulli, rescale="default"),
    _delta_method("dare_ties", "DARE drop + L1 rescale, then TIES sign election and disjoint sum",
                  _bernoulli, consensus=True, rescale="default"),
    _delta_method("magnitude", "delta magnitude pruning (DPPA reference semantics: prune |delta| <= the "
                  "int(n*(1-density))-th smallest), then weighted sum", _prune_le, rescale="refused"),
)


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models' weights: sum_i w_i x_i / sum_i w_i"
    needs_base = False
    global_params = {"normalize": Param(True, bool, doc="divide by the sum of weights")}
    model_params = {"weight": _WEIGHT}

    def merge_unit(self, rows, plan, out, out_code):
        weights = np.array([float(m["weight"]) for m in self.mparams], np.float32)
        bad = np.zeros(rows.src.shape[0], np.int64)
        kernels.weighted_sum(rows.src, kernels.CODES[rows.dtype], 0, rows.inp.unit.numel, weights,
                             bool(self.params["normalize"]), torch_order_sum(weights), out, out_code, bad)
        return bad
