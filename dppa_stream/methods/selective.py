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
from .base import MergeMethod, Param, ParamSets
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

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Many small whole tensors at once: their variance thresholds (selected from the keys
        themselves), selected squares and merges in two kernel calls, the model weights as
        `tensor_plan` computes them, for all tensors at once."""
        code = kernels.CODES[batch.dtype]
        K = batch.src.shape[0] - 1
        bad = np.zeros(batch.src.shape[0], np.int64)
        los, his = _spans(batch)
        n = len(los)
        kinds, values, budgets, squares = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64), \
            np.empty((n, K))
        topks = _per_tensor(batch, infos)(lambda info: float(info.globals["select_topk"]), np.float64)
        kernels.sce_batch_plan(batch.src, code, los, his, topks, kinds, values, budgets, squares, bad)
        if check_finite and bad.any():
            return bad  # the caller redoes the batch tensor by tensor, naming the first bad one
        omega = squares / (his - los)[:, None]  # tensor_plan's float64 operations, in its order
        total = np.zeros(n)
        for k in range(K):
            total = total + omega[:, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            omega = np.where(np.abs(total)[:, None] < 1e-6, 1.0 / K, omega / total[:, None])
        kernels.sce_batch_merge(batch.src, code, los, his, kinds, values, budgets, omega.astype(np.float32), out,
                                out_code, bad)
        return bad

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

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Many small whole tensors at once: per-tensor epsilon and boosts (`boosts`), one kernel call."""
        code = kernels.CODES[batch.dtype]
        bad = np.zeros(batch.src.shape[0], np.int64)
        los, his = _spans(batch)
        param = _per_tensor(batch, infos)
        eps = param(lambda info: float(info.globals["epsilon"]), np.float32)
        boosts = self.boosts(batch, param, los, his, eps, bad)
        if check_finite and bad.any():
            return bad  # the caller redoes the batch tensor by tensor, naming the first bad one
        kernels.ram_batch_merge(batch.src, code, los, his, eps, boosts, out, out_code, bad)
        return bad

    def boosts(self, batch, param, los, his, eps, bad) -> np.ndarray:
        """Each non-empty tensor's boost per model, float32 [tensors, models] (RAM: none); `param`:
        the batch's `_per_tensor`."""
        return np.ones((len(los), batch.src.shape[0] - 1), np.float32)

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

    def boosts(self, batch, param, los, his, eps, bad):
        """`tensor_plan`'s boosts for many tensors: their counts in one kernel call, then its float32
        operations on arrays (Python's max/min as selects: a NaN stays NaN)."""
        K = batch.src.shape[0] - 1
        shared, unique = np.zeros((len(los), K), np.int64), np.zeros((len(los), K), np.int64)
        kernels.ram_batch_counts(batch.src, kernels.CODES[batch.dtype], los, his, eps, shared, unique, bad)
        r = param(lambda info: info.globals["r"], np.float32)[:, None]
        a = param(lambda info: info.globals["alpha"], np.float32)[:, None]
        u, e = unique.astype(np.float32), eps[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = shared.astype(np.float32) / np.where(e > u, e, u)
        x = np.where(np.float32(0) > rho, np.float32(0), rho)
        return np.float32(1) + r * np.where(a < x, a, x)


def _spans(batch) -> tuple[np.ndarray, np.ndarray]:
    """The column spans (los, his) of a batch's non-empty tensors (an empty one has nothing to merge)."""
    los, his = batch.starts[:-1], batch.starts[1:]
    full = his > los
    return los[full], his[full]


def _per_tensor(batch, infos):
    """`param(value, dtype)`: `value(info)` of each of a batch's non-empty tensors (`_spans`' order)
    as an array, made once per set of parameter values (`ParamSets`, grouped once for the batch), not
    once per tensor: a batch holds thousands."""
    sets, full = ParamSets(infos), np.diff(batch.starts) > 0
    return lambda value, dtype: sets.of(value, dtype)[full]
