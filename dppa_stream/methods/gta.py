"""mergekit's generalized task arithmetic family, `linear`, and delta magnitude pruning.

Semantics follow mergekit 0.1.5 (see docs/merge-methods.md): deltas are sparsified per model and
tensor, weighted, optionally sign-elected (TIES "sum" consensus), summed, optionally normalised
by the (agreeing) weights, scaled by lambda and added to the base. Computation is float32; the
operation order mirrors mergekit's so results are bit-equal where the semantics are the same.
"""

from __future__ import annotations

import torch

from .. import rng
from .base import MergeMethod, Param, REQUIRED, density_check
from .sparsify import Bernoulli, PruneLE, Sparsifier, TopK

_WEIGHT = Param(REQUIRED, (int, float), doc="scale of this model's delta")
_DENSITY = Param(1.0, (int, float), density_check, "fraction of the delta kept")


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base + lambda * sum_i weight_i * (model_i - base)"
    consensus = False
    global_params = {
        "normalize": Param(False, bool, doc="divide by the sum of weights"),
        "lambda": Param(1.0, (int, float), doc="scale of the merged delta"),
        "rescale": Param(False, bool, doc="accepted for mergekit compatibility; no effect here"),
        "int8_mask": Param(False, bool, doc="accepted for mergekit compatibility; no numeric effect"),
    }
    model_params = {"weight": _WEIGHT}

    def merge(self, base, deltas, inputs, tensor, extra):
        # mergekit's formulas, written without boolean indexing or torch.where (10-30x slower on
        # CPU); every intermediate value is the same float, so results are bit-identical.
        weights = [float(m["weight"]) for m in self.mparams]
        weighted = [d * w if w != 1 else d.clone() for d, w in zip(deltas, weights)]  # x * 1.0 == x, bit for bit
        if self.consensus:
            majority = (_sum(weighted) >= 0).to(torch.float32).mul_(2).sub_(1)
            # 1.0 where the element's sign equals the majority sign, else 0.0 (zero deltas never agree)
            masks = [wd.sign().mul_(majority).clamp_(min=0) for wd in weighted]
            mixed = _sum([wd.mul_(m) for wd, m in zip(weighted, masks)])
            divisor = _sum([m.mul_(w) for m, w in zip(masks, weights)])
            divisor.add_(divisor == 0)  # 0 -> 1, anything else unchanged
        else:
            mixed = _sum(weighted)
            divisor = torch.tensor(weights, dtype=torch.float32).sum()
            if divisor.abs() < 1e-8:
                divisor = torch.tensor(1.0)
        if self.params["normalize"]:
            mixed /= divisor
        if self.params["lambda"] != 1:
            mixed *= self.params["lambda"]
        return base + mixed


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum into a new tensor (the order torch's sum over a stacked dim 0 uses)."""
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


class Ties(TaskArithmetic):
    name = "ties"
    summary = "TIES: keep the top-density |delta| per tensor, elect signs by weighted sum, disjoint mean"
    consensus = True
    global_params = {
        **TaskArithmetic.global_params,
        "normalize": Param(True, bool, doc="divide by agreeing weights"),
        "rescale": Param(False, bool, lambda v: "is not supported for ties yet (mergekit's L1 rescale of trimmed deltas)"
                         if v else None, "must stay false"),
    }
    model_params = {"weight": _WEIGHT, "density": _DENSITY}

    def sparsifier(self, model, tensor) -> Sparsifier:
        return TopK(self.mparams[model]["density"])


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    summary = "DARE: random drop (keep probability = density), L1 rescale, then weighted sum"
    global_params = {**TaskArithmetic.global_params, "rescale": Param(True, bool, doc="L1-norm rescale of kept deltas")}
    model_params = {"weight": _WEIGHT, "density": _DENSITY}

    def sparsifier(self, model, tensor) -> Sparsifier:
        key = rng.stream_key(self.seed, model, tensor)
        return Bernoulli(self.mparams[model]["density"], self.params["rescale"], key)


class DareTies(DareLinear):
    name = "dare_ties"
    summary = "DARE drop + L1 rescale, then TIES sign election and disjoint sum"
    consensus = True


class Magnitude(TaskArithmetic):
    name = "magnitude"
    global_params = {**TaskArithmetic.global_params, "rescale": Ties.global_params["rescale"]}
    summary = "delta magnitude pruning (DPPA reference semantics: prune |delta| <= the int(n*(1-density))-th smallest), then weighted sum"
    model_params = {"weight": _WEIGHT, "density": _DENSITY}

    def sparsifier(self, model, tensor) -> Sparsifier:
        return PruneLE(1.0 - self.mparams[model]["density"])


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models' weights: sum_i w_i x_i / sum_i w_i"
    needs_base = False
    global_params = {"normalize": Param(True, bool, doc="divide by the sum of weights")}
    model_params = {"weight": _WEIGHT}

    def merge(self, base, deltas, inputs, tensor, extra):
        stacked = torch.stack(inputs, dim=0)
        weights = torch.tensor([m["weight"] for m in self.mparams], dtype=torch.float32)
        weights = weights.reshape((-1,) + (1,) * (stacked.dim() - 1))
        out = (weights * stacked).sum(dim=0)
        if self.params["normalize"]:
            out = out / weights.sum(dim=0)
        return out
