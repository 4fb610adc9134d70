"""mergekit's interpolation methods: slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion and passthrough, with mergekit 0.1.5's names, parameters and formulas (docs/mergekit.md).

Every whole-tensor quantity these methods need is a function of the Gram matrix of the vectors
they interpolate (norms and dot products), gathered exactly in pass 1 (`statistics.Gram`: integer
sums of exact float32 products, so any chunking gives the same numbers); the plan turns it into
the coefficients of a linear combination, and pass 2 applies that combination in one sweep.
Karcher's iterative mean is a linear combination of its inputs at every step, so it iterates on
the coefficients, in float64, from the Gram matrix alone. Row-wise variants (nuslerp without
flattening, model_stock filter_wise) compute each row's Gram matrix inside the pass-2 task:
rows are never split across work units.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..statistics import Arcee, ArceeBins, Gram, Stat
from .base import Infos, MergeMethod, Param, ParamSets, REQUIRED
from .ranks import Ranks
from .sparsify import Sparse, kernel_records

_WEIGHT = Param(REQUIRED, (int, float), doc="this model's weight")


@dataclass(frozen=True)
class Combination:
    """Pass-2 plan: out = sum_k c_k input_k (inputs: base first if any), or, with `deltas`,
    base + sum_k c_k (model_k - base); per-row coefficients when `rows` (row-wise methods)."""

    coeffs: tuple = ()
    deltas: bool = False
    rows: str = ""  # "", or the row-wise method: "nuslerp" | "model_stock"
    params: tuple = ()


def gram_matrix(flat: np.ndarray, n: int) -> np.ndarray:
    """The symmetric n x n matrix from its upper triangle in row-major order."""
    g = np.zeros((n, n))
    p = 0
    for a in range(n):
        for b in range(a, n):
            g[a, b] = g[b, a] = flat[p]
            p += 1
    return g


class GramMethod(MergeMethod):
    """A method whose plan needs the tensor's Gram matrix: of the models' deltas (`deltas`) or of
    the inputs themselves (the base first when there is one)."""

    deltas = True

    def _gram_stat(self, info) -> Stat:
        return Gram(-1, None, False, ("deltas" if self.deltas and self.has_base else "inputs",))

    def tensor_statistics(self, info, got):
        return [self._gram_stat(info)] if info.numel else []

    def plan(self, catalogue, tensors, got):
        """Empty tensors have no Gram matrix: any coefficients merge them."""
        from .base import Plan

        plans = super().plan(catalogue, [t for t in tensors if catalogue.tensors[t].numel], got).tensors
        for t in tensors:
            if t not in plans:
                info = catalogue.tensors[t]
                plans[t] = Combination((0.0,) * (len(info.models) + int(self.has_base and not self.deltas)),
                                       self.deltas and self.has_base)
        return Plan(plans)

    def gram(self, info, got) -> np.ndarray:
        n = len(info.models) + (0 if self.deltas and self.has_base else int(self.has_base))
        if not info.numel:
            return np.zeros((n, n))
        return gram_matrix(got[self._gram_stat(info)], n)

    def merge_unit(self, rows, plan: Combination, out, out_code):
        unit = rows.inp.unit
        code = kernels.CODES[rows.dtype]
        bad = np.zeros(rows.src.shape[0], np.int64)
        if plan.rows:  # row-wise methods run on tensors with >= 2 dims: rows along the last one
            row_len = rows.inp.models[0].shape[-1]
            nrows = unit.numel // row_len if row_len else 0
            grams = np.zeros((nrows, _pairs(rows.src.shape[0] - (1 if plan.deltas else 0))))
            kernels.row_gram(rows.src, code, 0, nrows, row_len, plan.deltas, grams, bad)
            coeffs = self._row_coeffs(grams, plan)
            kernels.row_combine(rows.src, code, 0, nrows, row_len, coeffs, plan.deltas, out, out_code, bad)
            return bad
        c = np.array(plan.coeffs, np.float32)
        if plan.deltas:  # base + sum_k c_k delta_k: the delta family's kernel with nothing thinned
            models, levels = kernel_records((Sparse(),) * len(c), c, unit.index)
            combine = kernels.records(kernels.COMBINE_FIELDS, ())[()]
            kernels.gta(rows.src, code, 0, unit.numel, unit.flat_start, False, models, levels, np.zeros((len(c), 1), np.uint8),
                        combine, out, out_code, bad)
        else:
            kernels.weighted_sum(rows.src, code, 0, unit.numel, c, False, np.float32(1), out, out_code, bad)
        return bad

    def rows_coefficients(self, grams: np.ndarray, plan: Combination):
        """A row-wise method's coefficients of each row from its Gram matrix's upper triangle
        (`grams[r]`), float64 [rows, inputs]."""
        raise NotImplementedError

    def _row_coeffs(self, grams: np.ndarray, plan: Combination) -> np.ndarray:
        """The rows' float32 coefficients, [rows, inputs] (inputs: the vectors' count)."""
        out = np.zeros((len(grams), _size(grams.shape[1])), np.float32)
        if len(grams):
            out[:] = self.rows_coefficients(grams, plan)
        return out

    def row_wise(self, info) -> bool:
        """Whether the tensor is merged row by row (a Gram matrix per row, made in pass 2)."""
        return False

    def rows_in_batch(self, infos) -> np.ndarray:
        """`row_wise` of each of a batch's tensors (bool); a method that never merges by rows
        answers without a call per tensor."""
        if type(self).row_wise is GramMethod.row_wise:
            return np.zeros(len(infos), bool)
        return np.fromiter(map(self.row_wise, infos), bool, len(infos))

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Many small whole tensors at once: every tensor's exact Gram matrix in one kernel call,
        their coefficients as `tensor_plan` makes them (`batch_coefficients`), one combining call."""
        code = kernels.CODES[batch.dtype]
        deltas = self.deltas and self.has_base
        nv = batch.src.shape[0] - int(deltas)
        bad = np.zeros(batch.src.shape[0], np.int64)
        los, his = batch.starts[:-1], batch.starts[1:]
        full = his > los  # an empty tensor has nothing to merge
        by_row = self.rows_in_batch(infos)
        flat, rowed = np.flatnonzero(full & ~by_row), np.flatnonzero(full & by_row)
        grams = np.empty((len(flat), _pairs(nv)))
        kernels.gram_batch(batch.src, code, los[flat], his[flat], deltas, grams, bad)
        if len(rowed):
            row_lens = np.array([infos[k].shape[-1] for k in rowed], np.int64)
            row_starts = np.zeros(len(rowed) + 1, np.int64)
            np.cumsum((his[rowed] - los[rowed]) // row_lens, out=row_starts[1:])
            row_grams = np.empty((int(row_starts[-1]), _pairs(nv)))
            kernels.row_gram_batch(batch.src, code, los[rowed], row_lens, row_starts, deltas, row_grams, bad)
        if check_finite and bad.any():
            return bad  # the caller redoes the batch tensor by tensor, naming the first bad one
        if len(flat):
            coeffs = np.empty((len(flat), nv), np.float32)
            coeffs[:] = self.batch_coefficients([infos[k] for k in flat], grams)
            kernels.combine_batch(batch.src, code, los[flat], his[flat], coeffs, deltas, out, out_code, bad)
        if len(rowed):
            plans = [self.tensor_plan(infos[k], {}) for k in rowed]
            coeffs = np.concatenate([self._row_coeffs(row_grams[a:b], plan) for plan, a, b
                                     in zip(plans, row_starts[:-1].tolist(), row_starts[1:].tolist())])
            kernels.row_combine_batch(batch.src, code, los[rowed], row_lens, row_starts, coeffs, deltas, out, out_code,
                                      bad)
        return bad

    def batch_coefficients(self, infos, grams: np.ndarray):
        """Each tensor's coefficients (float64, in input order) from its Gram matrix's upper triangle
        (`grams[k]`): `tensor_plan`'s, which a method may compute faster for many tensors at once."""
        return [self.tensor_plan(info, {self._gram_stat(info): g}).coeffs for info, g in zip(infos, grams)]


def _pairs(n: int) -> int:
    return n * (n + 1) // 2


def _size(pairs: int) -> int:
    return int((math.isqrt(8 * pairs + 1) - 1) // 2)


# --- slerp -------------------------------------------------------------------------------------------

def _arc(t: float, cos: float) -> tuple[float, float]:
    """Spherical interpolation weights of two vectors at angle acos(cos): sin((1-t)θ)/sinθ, sin(tθ)/sinθ."""
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp_coefficients(t: float, gram: np.ndarray) -> tuple[float, float]:
    """mergekit's slerp of base a and model b, as coefficients of (a, b): lerp when the normalised
    vectors are (anti)parallel beyond 0.9995, else sin((1-t)θ)/sinθ and sin(tθ)/sinθ."""
    return _slerp(t, gram[0, 0], gram[0, 1], gram[1, 1])


def _slerp(t: float, aa: float, ab: float, bb: float) -> tuple[float, float]:
    """`slerp_coefficients` from the Gram matrix's three entries (a batch's come as floats)."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, ab / (na * nb)))
    return (1 - t, t) if abs(dot) > 0.9995 else _arc(t, dot)


class Slerp(GramMethod):
    name = "slerp"
    summary = "spherical interpolation of the base towards one model by t (per tensor)"
    deltas = False
    global_params = {"t": Param(REQUIRED, (int, float), doc="0 = base, 1 = the other model")}
    model_params = {}
    inputs = (1, 1)

    def tensor_plan(self, info, got):
        return Combination(slerp_coefficients(float(info.globals["t"]), self.gram(info, got)))

    def batch_coefficients(self, infos, grams):
        return slerp_batch(ParamSets(infos).of(lambda info: float(info.globals["t"]), np.float64), grams)


@functools.cache
def _svml() -> bool:
    import numba

    return bool(numba.config.USING_SVML)


def slerp_batch(t: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """`_slerp` of many tensors (t[k], Gram entries grams[k] = aa, ab, bb), [k, 2] float64."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        na, nb = np.sqrt(np.abs(grams[:, 0])), np.sqrt(np.abs(grams[:, 2]))
        na, nb = np.where(na > 1e-8, na, 1.0), np.where(nb > 1e-8, nb, 1.0)
        cos = np.maximum(-1.0, np.minimum(1.0, grams[:, 1] / (na * nb)))
    return _interpolate(t, grams, cos, np.abs(cos) > 0.9995, _slerp)


def _interpolate(t: np.ndarray, grams: np.ndarray, cos: np.ndarray, lerp: np.ndarray, scalar) -> np.ndarray:
    """Coefficients [k, 2] of a batch of slerps from their clamped cosines `cos` (made with the
    scalar formula's float64 operations: square roots, products, quotients and clamps are exactly
    rounded in numpy as in Python): (1 - t, t) where `lerp`, else the arc's weights by the C
    library's sines, as Python's (`kernels.arc_weights`). Tensors with a non-finite Gram entry
    take the `scalar` formula, whose clamps treat NaN differently."""
    out = np.empty((len(grams), 2))
    out[:, 0], out[:, 1] = 1 - t, t
    finite = np.isfinite(grams).all(axis=1)
    svml = _svml()  # numba would vectorize with Intel's SVML sines, not the C library's
    arc = np.flatnonzero(finite & ~lerp)
    if len(arc) and not svml:
        got = np.empty((len(arc), 2))
        kernels.arc_weights(t[arc], cos[arc], got)
        out[arc] = got
    for k in np.flatnonzero(~finite | (~lerp if svml else False)).tolist():
        out[k] = scalar(float(t[k]), *grams[k].tolist())
    return out


# --- nuslerp -----------------------------------------------------------------------------------------

def nuslerp_coefficients(t: float, gram: np.ndarray) -> tuple[float, float]:
    """mergekit's nuslerp of v0, v1 (unnormalised): lerp when colinear (1 - c^2 <= 1e-16)."""
    return _nuslerp(t, gram[0, 0], gram[0, 1], gram[1, 1])


def _nuslerp(t: float, aa: float, ab: float, bb: float) -> tuple[float, float]:
    """`nuslerp_coefficients` from the Gram matrix's three entries."""
    n0, n1 = max(math.sqrt(aa), 1e-7), max(math.sqrt(bb), 1e-7)
    c = max(-1.0, min(1.0, ab / (n0 * n1)))
    return (1 - t, t) if 1 - c * c <= 1e-16 else _arc(t, c)


def nuslerp_batch(t: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """`_nuslerp` of many tensors (t[k], Gram entries grams[k] = aa, ab, bb), [k, 2] float64."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n0, n1 = np.maximum(np.sqrt(np.abs(grams[:, 0])), 1e-7), np.maximum(np.sqrt(np.abs(grams[:, 2])), 1e-7)
        c = np.maximum(-1.0, np.minimum(1.0, grams[:, 1] / (n0 * n1)))
    return _interpolate(t, grams, c, 1 - c * c <= 1e-16, _nuslerp)


class Nuslerp(GramMethod):
    name = "nuslerp"
    summary = "slerp of two models (or of their deltas from an optional base) with t = w1 / (w0 + w1)"
    needs_base = False
    base_optional = True
    global_params = {
        "nuslerp_flatten": Param(True, bool, doc="one vector per tensor (else per row)"),
        "nuslerp_row_wise": Param(False, bool, doc="with nuslerp_flatten: false, interpolate columns instead of rows"),
    }
    model_params = {"weight": _WEIGHT}
    inputs = (2, 2)

    @classmethod
    def check_params(cls, params, models):
        if params.get("nuslerp_flatten") is False and params.get("nuslerp_row_wise") is True:
            return ("nuslerp_row_wise: true with nuslerp_flatten: false (slerp of column vectors) is not supported "
                    "yet; use row vectors (nuslerp_row_wise: false) or the whole tensor (nuslerp_flatten: true)")
        return None

    def _t(self, info) -> float:
        w0, w1 = (float(m["weight"]) for m in info.models)
        return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)

    def tensor_statistics(self, info, got):
        return super().tensor_statistics(info, got) if self._flat(info) else []

    def _flat(self, info) -> bool:
        return bool(info.globals["nuslerp_flatten"]) or len(info.shape) < 2

    def tensor_plan(self, info, got):
        t = self._t(info)
        deltas = self.has_base
        if not self._flat(info):
            return Combination(deltas=deltas, rows="nuslerp", params=(t,))
        return Combination(nuslerp_coefficients(t, self.gram(info, got)), deltas)

    def row_wise(self, info):
        return not self._flat(info)

    def batch_coefficients(self, infos, grams):
        return nuslerp_batch(ParamSets(infos).of(self._t, np.float64), grams)

    def rows_coefficients(self, grams, plan):
        return [_nuslerp(plan.params[0], *g) for g in grams.tolist()]


# --- multislerp --------------------------------------------------------------------------------------

def multislerp_coefficients(weights: list[float], gram: np.ndarray, normalize: bool, eps: float) -> np.ndarray:
    """mergekit's multislerp as coefficients of the task vectors: the result is a linear
    combination of them whose coefficients depend only on their Gram matrix and the weights."""
    w = np.array(weights, np.float64)
    n = len(w)
    if n == 1:
        return np.ones(1)
    if normalize:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    c = w / (norms + eps)  # m = sum_i c_i v_i
    m_norm = math.sqrt(max(c @ gram @ c, 0.0))
    if m_norm < eps:
        if n == 2:
            return w.copy()
        raise ValueError("the weighted sum of the unit task vectors is zero; multislerp is undefined here")
    c = c / m_norm
    dots = (gram @ c) / (norms + eps)  # <u_i, m>
    t = w / (norms + eps) - (w @ dots) * c  # tau = sum_i t_i v_i
    s = math.sqrt(max(t @ gram @ t, 0.0)) + eps
    return (c * math.cos(s) + t * (math.sin(s) / s)) * float(w @ norms)


class Multislerp(GramMethod):
    name = "multislerp"
    summary = "spherical weighted mean of any number of models (or of their deltas from an optional base)"
    needs_base = False
    base_optional = True
    global_params = {
        "normalize_weights": Param(True, bool, doc="divide the weights by their sum"),
        "eps": Param(1e-8, (int, float), doc="added to norms"),
    }
    model_params = {"weight": _WEIGHT}
    inputs = (1, None)

    def tensor_plan(self, info, got):
        weights = [float(m["weight"]) for m in info.models]
        try:
            c = multislerp_coefficients(weights, self.gram(info, got), bool(info.globals["normalize_weights"]),
                                        float(info.globals["eps"]))
        except ValueError as e:
            from ..errors import InputError

            raise InputError(f"tensor {info.name!r}: {e}") from None
        return Combination(tuple(c), self.has_base)


# --- karcher -----------------------------------------------------------------------------------------

def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """mergekit's Karcher mean (uniform weights) as coefficients of the inputs. Every iterate is a
    linear combination of the unit inputs, so the iteration runs on coefficients with the Gram
    matrix giving every inner product."""
    n = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    alpha = np.full(n, 1.0 / n)
    if n == 1:
        return np.ones(1)
    unit = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)  # u_i = unit_i * x_i
    G = gram * np.outer(unit, unit)  # Gram of the unit vectors
    valid = norms > tol
    if not valid.any():
        return np.zeros(n)
    a = np.where(valid, alpha, 0.0)
    a = a / a.sum()
    mean = a.copy()  # in the basis of unit vectors
    mnorm = math.sqrt(max(mean @ G @ mean, 0.0))
    if mnorm < tol:
        mean = np.zeros(n)
        mean[int(np.argmax(valid))] = 1.0
    else:
        mean = mean / mnorm
    for _ in range(max_iter):
        tangent = np.zeros(n)
        for i in range(n):
            if not valid[i]:
                continue
            dot = max(-1.0, min(1.0, float(mean @ G[:, i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            e = np.zeros(n)
            e[i] = 1.0
            tangent += a[i] * (theta / math.sin(theta)) * (e - dot * mean)
        tnorm = math.sqrt(max(tangent @ G @ tangent, 0.0))
        if tnorm < tol:
            break
        mean = math.cos(tnorm) * mean + math.sin(tnorm) * tangent / tnorm
        mnorm = math.sqrt(max(mean @ G @ mean, 0.0))
        if mnorm > tol:
            mean = mean / mnorm
    return mean * unit * float(alpha @ norms)


class Karcher(GramMethod):
    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models on the sphere, scaled by their mean norm"
    needs_base = False
    deltas = False
    global_params = {
        "max_iter": Param(10, int, lambda v: None if v >= 0 else "must be >= 0", "iterations at most"),
        "tol": Param(1e-5, (int, float), lambda v: None if v > 0 else "must be > 0", "convergence tolerance"),
    }
    model_params = {}
    inputs = (1, None)
    base_is_input = True

    def tensor_plan(self, info, got):
        return Combination(tuple(karcher_coefficients(self.gram(info, got), int(info.globals["max_iter"]),
                                                      float(info.globals["tol"]))))


# --- model_stock -------------------------------------------------------------------------------------

def model_stock_t(gram: np.ndarray) -> float:
    """mergekit's model_stock interpolation ratio from the Gram matrix of the offsets."""
    n = len(gram)
    return float(model_stock_ts(gram[np.triu_indices(n)][None], n)[0])


def model_stock_ts(grams: np.ndarray, n: int) -> np.ndarray:
    """`model_stock_t` of many Gram matrices at once (`grams[k]`: the upper triangle in row-major
    order), with the scalar formula's float64 operations in its order: the mean cosine summed
    pair after pair from 0, Python's max/min (a NaN cosine clamps to 1.0)."""
    diag = np.cumsum([0] + [n - i for i in range(n - 1)])  # entry (i, i): where row i of the triangle starts
    norms = np.sqrt(np.maximum(grams[:, diag], 0.0))
    total = np.zeros(len(grams))
    for i in range(n):
        for j in range(i + 1, n):
            p = norms[:, i] * norms[:, j]
            x = grams[:, diag[i] + j - i] / np.where(1e-6 > p, 1e-6, p)
            x = np.where(x < 1.0, x, 1.0)  # min(1.0, x)
            total = total + np.where(x > -1.0, x, -1.0)  # max(-1.0, .)
    c = total / (n * (n - 1) // 2)
    den = 1 + (n - 1) * c
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) < 1e-6, 0.0, n * c / den)


class ModelStock(GramMethod):
    name = "model_stock"
    summary = "model soup placed by the angle between the fine-tunes' deltas: t * mean(models) + (1 - t) * base"
    global_params = {"filter_wise": Param(False, bool, doc="one ratio per row instead of per tensor")}
    model_params = {}
    inputs = (2, None)

    def tensor_statistics(self, info, got):
        return super().tensor_statistics(info, got) if not self._rows(info) else []

    def _rows(self, info) -> bool:
        return bool(info.globals["filter_wise"]) and len(info.shape) >= 2

    def tensor_plan(self, info, got):
        if self._rows(info):
            return Combination(deltas=True, rows="model_stock")
        return Combination(self._coeffs(model_stock_t(self.gram(info, got)), len(info.models)), True)

    @staticmethod
    def _coeffs(t: float, n: int) -> tuple:
        return (t / n,) * n  # base + t * (mean(models) - base)

    def row_wise(self, info):
        return self._rows(info)

    def rows_in_batch(self, infos):
        sets = ParamSets(infos)
        if not any(bool(info.globals["filter_wise"]) for info in sets.sets):
            return np.zeros(len(infos), bool)
        return super().rows_in_batch(infos)

    def rows_coefficients(self, grams, plan):
        n = _size(grams.shape[1])
        return np.repeat((model_stock_ts(grams, n) / n)[:, None], n, axis=1)

    def batch_coefficients(self, infos, grams):
        n = len(infos[0].models)
        return np.repeat((model_stock_ts(grams, n) / n)[:, None], n, axis=1)


# --- nearswap, passthrough -----------------------------------------------------------------------------

class Nearswap(MergeMethod):
    name = "nearswap"
    summary = "take the model's value where it is within t of the base, interpolate towards the base elsewhere"
    global_params = {"t": Param(REQUIRED, (int, float), doc="distance scale")}
    model_params = {}
    inputs = (1, 1)

    def tensor_plan(self, info, got):
        return float(info.globals["t"])

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Many small whole tensors at once: one kernel call, each tensor with its t."""
        bad = np.zeros(batch.src.shape[0], np.int64)
        ts = ParamSets(infos).of(lambda info: float(info.globals["t"]), np.float32)
        kernels.nearswap_batch(batch.src, kernels.CODES[batch.dtype], batch.starts[:-1], batch.starts[1:], ts, out,
                               out_code, bad)
        return bad

    def merge_unit(self, rows, plan, out, out_code):
        bad = np.zeros(rows.src.shape[0], np.int64)
        kernels.nearswap(rows.src, kernels.CODES[rows.dtype], 0, rows.inp.unit.numel, np.float32(plan), out, out_code, bad)
        return bad


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "copy the one input (optionally scaled); with slices, a frankenmerge"
    needs_base = False
    global_params = {}
    model_params = {"scale": Param(None, (int, float), doc="multiply the weights (default: copy them)")}
    inputs = (1, 1)
    base_is_input = True

    def tensor_plan(self, info, got):
        return info.models[0]["scale"]

    def merge_unit(self, rows, plan, out, out_code):
        bad = np.zeros(rows.src.shape[0], np.int64)
        unit = rows.inp.unit
        code = kernels.CODES[rows.dtype]
        if plan is None and out_code == code:  # a copy of the stored bits
            out[:] = rows.src[0]
            return bad
        scale = np.array([1.0 if plan is None else plan], np.float32)
        kernels.weighted_sum(rows.src, code, 0, unit.numel, scale, False, np.float32(1), out, out_code, bad)
        return bad


# --- arcee_fusion --------------------------------------------------------------------------------------

def _histogram(hist: np.ndarray) -> np.ndarray:
    return hist


# the importance's exact quantiles: round 1 a histogram of the top 16 bits of its sort key, round 2
# the boundary bins
_IMPORTANCE = Ranks(Arcee(0), ArceeBins, _histogram)


def _from_key(key: int) -> np.float32:
    """The float32 whose `kernels.sort_key` is `key`."""
    key &= 0xFFFFFFFF
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array(bits, np.uint32).view(np.float32)[()]


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "keep the model's changes whose importance (|delta| x KL of the row's softmax) is an outlier"
    global_params = {}
    model_params = {}
    inputs = (1, 1)

    QUANTILES = (0.25, 0.5, 0.75)

    @staticmethod
    def _row_len(shape: tuple) -> int:
        return shape[-1] if shape else 1

    def _ranks(self, n: int) -> list[int]:
        """1-based ranks of mergekit's quantile indices floor(q * (n - 1)) (q as float32)."""
        return [int(np.float32(q) * np.float32(n - 1)) + 1 for q in self.QUANTILES]

    def tensor_statistics(self, info, got):
        return _IMPORTANCE.needs(got, self._ranks(info.numel)) if info.numel else []

    def tensor_plan(self, info, got):
        if not info.numel:
            return 0.0
        q1, med, q3 = (_from_key(b.bits) for b in _IMPORTANCE.resolve(got, self._ranks(info.numel)))
        return float(med + np.float32(1.5) * (q3 - q1))

    def merge_batch(self, batch, infos, out, out_code, check_finite):
        """Many small whole tensors at once: each one's quartiles selected from its importance keys
        and its merge in one kernel call."""
        bad = np.zeros(batch.src.shape[0], np.int64)
        row_lens = np.fromiter(map(self._row_len, Infos.of(infos).shapes), np.int64, len(infos))
        nrows = np.diff(batch.starts) // np.maximum(row_lens, 1)
        kernels.arcee_batch(batch.src, kernels.CODES[batch.dtype], batch.starts[:-1], row_lens, nrows, out, out_code,
                            bad)
        return bad

    def merge_unit(self, rows, plan, out, out_code):
        bad = np.zeros(rows.src.shape[0], np.int64)
        n = rows.inp.unit.numel
        row_len = self._row_len(rows.inp.models[0].shape)
        kernels.arcee_merge(rows.src, kernels.CODES[rows.dtype], 0, n // row_len if row_len else 0, row_len,
                            np.float32(plan), out, out_code, bad)
        return bad
