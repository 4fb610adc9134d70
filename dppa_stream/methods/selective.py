"""mergekit's element-selecting methods beyond the delta family: SCE and RAM / RAM+.

SCE keeps the elements whose delta varies most across the fine-tunes (top `select_topk` of the
per-element variance, exactly, from a histogram of its bit patterns plus one boundary round),
weights each model by the mean square of its kept delta, and averages the agreeing deltas.
RAM takes an element from the one model that changed it, or the mean of those that did; RAM+
boosts models whose changes are mostly shared. Semantics: mergekit 0.1.5 (docs/mergekit.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import kernels, summaries
from ..statistics import RamCounts, SceSquares, Stat, Var, VarBins
from .base import MergeMethod, Param
from .ranks import Ranks
from .sparsify import level


@dataclass(frozen=True)
class Selection:
    """SCE's pass-2 plan: the variance threshold (kind, value, ties kept, ties before each unit)
    and the model weights."""

    kind: int
    value: float
    ties: int
    starts: tuple
    omega: tuple

    def budget(self, unit: int) -> np.ndarray:
        start = dict(self.starts).get(unit, 0)
        return np.array([max(0, self.ties - start)], np.int64)


def _variance_hist(var):
    return var[0]  # the Summary: its histogram loads from the store on demand


# the variance's exact ranks: round 1 its histogram and non-zero count, round 2 the boundary bin
_VARIANCE = Ranks(Var(0), VarBins, _variance_hist)


class Sce(MergeMethod):
    name = "sce"
    summary = "SCE: keep the elements whose delta varies most across models, weight models by their kept energy, elect signs"
    global_params = {
        "select_topk": Param(1.0, (int, float), doc="fraction of elements kept, by variance across models"),
        "int8_mask": Param(False, bool, doc="accepted for mergekit compatibility; no numeric effect"),
    }
    model_params = {}
    inputs = (1, None)

    @staticmethod
    def _keep(info, var) -> int:
        """How many elements SCE keeps, from round 1's (histogram, nnz): mergekit's
        k = int(float32(nnz) * float32(select_topk))."""
        topk = float(info.globals["select_topk"])
        return int(np.float32(var[1]) * np.float32(topk)) if topk > 0 else 0

    def _rank(self, info, var) -> list[int]:
        """The rank of the smallest variance kept; none when every element or none is kept."""
        k = self._keep(info, var)
        return [info.numel - k + 1] if 0 < k < info.numel else []

    def _selection(self, info, got) -> tuple[summaries.Threshold, tuple]:
        """The variance threshold and the ties before each unit ((unit, (ties,)), ...)."""
        if float(info.globals["select_topk"]) >= 1:
            return summaries.Threshold(summaries.KEEP_ALL), ()
        k = self._keep(info, _VARIANCE.first(got))
        if k <= 0 or k >= info.numel:
            return summaries.Threshold(summaries.KEEP_NONE if k <= 0 else summaries.KEEP_ALL), ()
        (b,) = _VARIANCE.resolve(got, [info.numel - k + 1])
        return b.threshold(info.numel, k), tuple((u, (n,)) for u, n in b.starts)

    def tensor_statistics(self, info, got):
        if not info.numel:
            return []
        if float(info.globals["select_topk"]) < 1:
            need = _VARIANCE.needs(got, partial(self._rank, info))
            if need:
                return need
        return [self._squares(*self._selection(info, got))]

    @staticmethod
    def _squares(t: summaries.Threshold, starts: tuple) -> Stat:
        lev = level(t, tracked=True)
        return SceSquares(0, args=(lev.kind, lev.value, t.ties_kept, starts))

    def tensor_plan(self, info, got):
        K = len(info.models)
        if not info.numel:
            return Selection(kernels.TH_ALL, 0.0, 0, (), (1.0 / K,) * K)
        stat = self._squares(*self._selection(info, got))
        omega = [s / info.numel for s in got[stat]]
        total = sum(omega)
        omega = [1.0 / K] * K if abs(total) < 1e-6 else [w / total for w in omega]
        kind, value, ties, starts = stat.args
        return Selection(kind, value, ties, tuple((u, s[0]) for u, s in starts), tuple(omega))

    def merge_unit(self, rows, plan: Selection, out, out_code):
        bad = np.zeros(rows.src.shape[0], np.int64)
        kernels.sce_merge(rows.src, kernels.CODES[rows.dtype], 0, rows.inp.unit.numel, plan.kind, np.float32(plan.value),
                          plan.budget(rows.inp.unit.index), np.array(plan.omega, np.float32), out, out_code, bad)
        return bad


class Ram(MergeMethod):
    name = "ram"
    summary = "RAM: an element changed by one model takes its delta, one changed by several the mean of theirs"
    global_params = {"epsilon": Param(1e-5, (int, float), lambda v: None if v >= 0 else "must be >= 0",
                                      "smallest |delta| that counts as a change")}
    model_params = {}
    inputs = (1, None)

    def tensor_plan(self, info, got):
        return float(info.globals["epsilon"]), (1.0,) * len(info.models)

    def merge_unit(self, rows, plan, out, out_code):
        bad = np.zeros(rows.src.shape[0], np.int64)
        eps, boost = plan
        kernels.ram_merge(rows.src, kernels.CODES[rows.dtype], 0, rows.inp.unit.numel, np.float32(eps),
                          np.array(boost, np.float32), out, out_code, bad)
        return bad


class RamPlusTl(Ram):
    name = "ramplus_tl"
    summary = "RAM+: RAM with each model's unique changes boosted by how much of its change it shares"
    global_params = {**Ram.global_params,
                     "r": Param(0.1, (int, float), doc="boost scale"),
                     "alpha": Param(0.2, (int, float), doc="boost cap")}

    def tensor_statistics(self, info, got):
        return [RamCounts(0, args=(float(info.globals["epsilon"]),))] if info.numel else []

    def tensor_plan(self, info, got):
        eps = float(info.globals["epsilon"])
        if not info.numel:
            return eps, (1.0,) * len(info.models)
        shared, unique = got[RamCounts(0, args=(eps,))]
        r, a = np.float32(info.globals["r"]), np.float32(info.globals["alpha"])
        rho = [np.float32(s) / max(np.float32(u), np.float32(eps)) for s, u in zip(shared, unique)]
        return eps, tuple(float(np.float32(1) + r * min(max(x, np.float32(0)), a)) for x in rho)
