"""Iso-C ("No Task Left Behind", arXiv 2502.04959), and what every spectral merge shares: the
exact Gram statistic of a matrix's deltas, planning from its eigendecomposition, and the pass-2
row projection.

A spectral method needs the SVD of a matrix built from the deltas, X = U S V^T, never the whole
matrix at once: pass 1 accumulates the Gram G = X^T X (columns x columns, float64), the plan
takes eigh(G) = V S^2 V^T, and since U = X V S^-1 every output row is a row of X times a small
matrix: out[r] = X[r] A M. A matrix with more columns than rows is worked on transposed (both
methods commute with transposition), which needs every row for each output column: such a
tensor is one work unit (see docs/spectral.md for what it costs).

Byte-identical results whatever the chunking: the Gram is summed over fixed blocks of
`ROW_BLOCK` rows counted from the tensor's first row (work-unit boundaries fall on them: see
`unit_multiple`), each block's float64 Gram is one BLAS call of the same shape whichever unit
holds it, and blocks are added exactly, as fixed-point integers in three int64 limbs (quantum
2**-120), so that the sum cannot depend on the order partial results arrive in. eigh of the same
float64 matrix is deterministic on one machine (same LAPACK, same threads); pass 2 projects the
same fixed blocks. BLAS runs one thread per task (`one_blas_thread`): Dask's workers are the
parallelism, and two BLAS pools per core made a TSV-M plan 3-40x slower on a busy machine.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..errors import InputError
from ..statistics import Stat
from .base import MergeMethod, Param

ROW_BLOCK = 512  # rows per exact Gram block and per projection block (work units hold whole blocks)
RTOL = 1e-6  # singular values at or below RTOL * the largest are taken as zero (see docs/spectral.md)
_LIMB = 52  # bits per low limb of the exact accumulator
_SCALE = 2.0 ** 120  # 1 / the accumulator's quantum
_BLOCK_LIMIT = 2.0 ** 32  # |Gram entry| of one block the accumulator takes (its top limb cannot overflow)
_MEAN_CHUNK = 1 << 16  # elements per step of the mean task vector (tensors that are not matrices)


_blas_limited = False


def one_blas_thread() -> None:
    """Limit BLAS/LAPACK (numpy's OpenBLAS or MKL) to one thread in this process, once."""
    global _blas_limited
    if not _blas_limited:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        _blas_limited = True


def orientation(shape: tuple) -> tuple[int, int, bool] | None:
    """(rows, columns, transposed) of the matrix a spectral method works on: the tensor when it
    has at least as many rows as columns, else its transpose; None for a tensor that is not a
    matrix (those get the mean of the task vectors, as both papers' code does)."""
    if len(shape) != 2 or 0 in shape:
        return None
    m, n = shape
    return (m, n, False) if m >= n else (n, m, True)


# --- the deltas of a unit, as matrices --------------------------------------------------------------

def unit_deltas(rows, code: int, start: int, count: int, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(base, deltas) of the unit's elements [start, start + count) in float64: each input widened
    from its stored dtype to float32 (as the papers' float32 task vectors), deltas model - base."""
    src = rows.src
    buf = np.empty(count, np.float32)
    bad[0] += kernels.widen_block(src[0], code, start, count, buf)
    base = buf.astype(np.float64)
    deltas = np.empty((src.shape[0] - 1, count))
    for k in range(1, src.shape[0]):
        bad[k] += kernels.widen_block(src[k], code, start, count, buf)
        np.subtract(buf, base, out=deltas[k - 1])
    return base, deltas


def combined(deltas: np.ndarray, rows: int, cols: int, stacked: bool) -> np.ndarray:
    """X for `rows` rows: the sum of the models' deltas (Iso-C; added in model order), or their
    side-by-side concatenation [D_1 | D_2 | ...] (TSV-M)."""
    d = deltas.reshape(len(deltas), rows, cols)
    if stacked:
        return np.ascontiguousarray(d.transpose(1, 0, 2)).reshape(rows, len(deltas) * cols)
    x = d[0].copy()
    for k in range(1, len(d)):
        x += d[k]
    return x


def blocks(rows, code: int, shape: tuple, stacked: bool, bad: np.ndarray):
    """(first row, base block, X block) for each `ROW_BLOCK` rows of the oriented matrix in the
    unit. A transposed matrix (one unit) is widened whole to float32 and each block of its columns
    transposed; the values are those `unit_deltas` gives."""
    m, n, transposed = orientation(shape)
    unit = rows.inp.unit
    if transposed:
        src = rows.src
        f32 = np.empty((src.shape[0], unit.numel), np.float32)
        for k in range(src.shape[0]):
            bad[k] += kernels.widen_block(src[k], code, 0, unit.numel, f32[k])
        _refuse_nonfinite(rows, bad)
        f32 = f32.reshape(src.shape[0], n, m)  # the tensor is n x m (n < m)
        for r in range(0, m, ROW_BLOCK):
            b = min(ROW_BLOCK, m - r)
            block = f32[:, :, r:r + b].transpose(0, 2, 1).astype(np.float64)
            deltas = block[1:] - block[0]
            yield r, block[0], combined(deltas.reshape(len(deltas), -1), b, n, stacked)
        return
    first = unit.flat_start // n
    assert first % ROW_BLOCK == 0, "work units must start on a row block"
    for r in range(0, unit.numel // n, ROW_BLOCK):
        b = min(ROW_BLOCK, unit.numel // n - r)
        base, deltas = unit_deltas(rows, code, r * n, b * n, bad)
        _refuse_nonfinite(rows, bad)
        yield r, base.reshape(b, n), combined(deltas, b, n, stacked)


def _refuse_nonfinite(rows, bad: np.ndarray) -> None:
    """A matrix with NaN/Inf has no SVD: refuse it in one line naming the file, whatever
    --allow-nonfinite says (other tensors, merged by the mean, follow the option)."""
    if bad.any():
        e = rows.inp.entries[int(np.flatnonzero(bad)[0])]
        raise InputError(f"{e.file}: tensor {e.name!r} holds NaN/Inf; a spectral merge cannot decompose the matrix "
                         "(--allow-nonfinite does not apply to iso_c/tsv_m)")


# --- exact sums of float64 Gram blocks ------------------------------------------------------------------

def exact_add(acc: np.ndarray | None, g: np.ndarray, tensor: str) -> np.ndarray:
    """acc + g, where acc holds fixed-point integers in three int64 limbs (value = (l2 * 2**104 +
    l1 * 2**52 + l0) * 2**-120, low limbs in [0, 2**52)): integer sums are associative, so the
    Gram cannot depend on the order blocks are added in. |g| below the quantum is truncated."""
    a = np.abs(g)
    if a.size and not a.max() < _BLOCK_LIMIT:
        raise InputError(f"tensor {tensor!r}: deltas too large for the exact Gram accumulator (a {ROW_BLOCK}-row "
                         f"block's Gram entry is {a.max():.3g}, at most 2**32 is supported); is the base model right?")
    a *= _SCALE  # exact: a power of two
    limbs = np.empty((3,) + g.shape, np.int64)
    t = np.empty_like(a)
    for k, shift in ((2, 104), (1, 52)):
        np.floor(np.multiply(a, 2.0 ** -shift, out=t), out=t)
        limbs[k] = t
        a -= np.multiply(t, 2.0 ** shift, out=t)  # exact: what is left fits the significand
    limbs[0] = np.floor(a, out=a)
    neg = g < 0
    for limb in limbs:
        np.negative(limb, out=limb, where=neg)
    if acc is not None:
        limbs += acc
    return _carry(limbs)


def _carry(limbs: np.ndarray) -> np.ndarray:
    """Low limbs back into [0, 2**52), their carries moved up (arithmetic shifts: floor division)."""
    for k in (0, 1):
        c = limbs[k] >> _LIMB
        limbs[k] -= c << _LIMB
        limbs[k + 1] += c
    return limbs


def exact_value(limbs: np.ndarray) -> np.ndarray:
    """The float64 matrix the limbs hold (a fixed function of the integers: deterministic)."""
    g = limbs[2].astype(np.float64) * 2.0 ** -16
    g += limbs[1].astype(np.float64) * 2.0 ** -68
    g += limbs[0].astype(np.float64) * 2.0 ** -120
    return np.triu(g) + np.triu(g, 1).T  # symmetric whatever BLAS did to the lower triangle


class DeltaGram(Stat):
    """The exact Gram X^T X (float64, columns x columns of the oriented matrix, see `orientation`)
    of X = the sum of the models' deltas (`args=("sum", w)`) or their concatenation (`("stack", w)`),
    w x w. Partial results are int64 limbs (`exact_add`); a unit holds whole `ROW_BLOCK`-row blocks."""

    __slots__ = ()
    name = "delta_gram"

    def compute(self, rows, code, lo, hi, bad):
        one_blas_thread()
        acc = None
        shape = rows.inp.models[0].shape
        for _, _, x in blocks(rows, code, shape, self.args[0] == "stack", bad):
            acc = exact_add(acc, x.T @ x, rows.inp.unit.tensor)
        return acc

    def empty(self):
        return None

    def combine(self, a, b):
        return b if a is None else a if b is None else _carry(a + b)

    def finalize(self, partial):
        return None if partial is None else exact_value(partial)

    def pack(self, value):
        if value is None:
            return np.zeros(1, np.int64)
        return np.concatenate([[value.shape[0]], np.ascontiguousarray(value, np.float64).ravel().view(np.int64)])

    def unpack(self, record, reread=None):
        w = int(record[0])
        return record[1:].view(np.float64).reshape(w, w).copy() if w else None

    def result_bytes(self, numel):
        return 3 * 8 * self.args[1] ** 2  # the limbs

    def held_bytes(self, value):
        return 256 if value is None else value.nbytes


# --- planning -------------------------------------------------------------------------------------------

def spectrum(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(singular values descending, right singular vectors as columns) from X^T X; values at or
    below RTOL * the largest (and their vectors) are left out: rank-deficient or noise."""
    w, v = np.linalg.eigh(gram)
    s = np.sqrt(np.clip(w[::-1], 0.0, None))
    v = v[:, ::-1]
    keep = s > RTOL * s[0] if s.size and s[0] > 0 else np.zeros(len(s), bool)
    return s[keep], v[:, keep]


def inverse_sqrt(c: np.ndarray) -> np.ndarray:
    """C^(-1/2) of a symmetric positive semi-definite C on its range (the polar factor of a
    matrix B is B (B^T B)^(-1/2))."""
    w, q = np.linalg.eigh(c)
    keep = w > RTOL * RTOL * (w[-1] if w.size else 0.0)
    q = q[:, keep]
    return (q / np.sqrt(w[keep])) @ q.T


class Projection:
    """Pass-2 plan of a matrix: out = base + alpha * concat_i(X_i A_i) M, X_i the parts of X
    (Iso-C: one, the summed deltas; TSV-M: each model's deltas)."""

    __slots__ = ("a", "m", "alpha")

    def __init__(self, a: tuple, m: np.ndarray, alpha: float):
        self.a, self.m, self.alpha = a, m, alpha

    def __getstate__(self):
        return self.a, self.m, self.alpha

    def __setstate__(self, state):
        self.a, self.m, self.alpha = state


# --- the method family ------------------------------------------------------------------------------

class SpectralMethod(MergeMethod):
    """Shared by Iso-C and TSV-M: the Gram statistic for every matrix, the mean of the task
    vectors for every other tensor, alpha, and the pass-2 projection."""

    stacked = False  # X is the models' deltas side by side (TSV-M), else their sum (Iso-C)
    global_params = {"alpha": Param(1.0, (int, float), doc="scale of the merged task vector")}
    model_params = {}
    inputs = (1, None)

    def unit_multiple(self, shape):
        o = orientation(shape)
        if o is None:
            return super().unit_multiple(shape)
        return shape[0] * shape[1] if o[2] else ROW_BLOCK * shape[1]  # transposed: the whole tensor

    def gram(self, info) -> DeltaGram:
        w = orientation(info.shape)[1] * (len(info.models) if self.stacked else 1)
        return DeltaGram(0, args=("stack" if self.stacked else "sum", w))

    def tensor_statistics(self, info, got):
        return [self.gram(info)] if orientation(info.shape) is not None else []

    def tensor_plan(self, info, got):
        o = orientation(info.shape)
        if o is None:
            return float(info.globals["alpha"])
        stat = self.gram(info)
        gram = got[stat]
        if gram is None:  # no rows: a zero matrix
            gram = np.zeros((stat.args[1], stat.args[1]))
        one_blas_thread()
        a, m = self.factors(gram, o, len(info.models))
        return Projection(a, m, float(info.globals["alpha"]))

    def factors(self, gram: np.ndarray, o: tuple, models: int) -> tuple[tuple, np.ndarray]:
        raise NotImplementedError

    def merge_unit(self, rows, plan, out, out_code):
        code = kernels.CODES[rows.dtype]
        bad = np.zeros(rows.src.shape[0], np.int64)
        unit = rows.inp.unit
        if not isinstance(plan, Projection):  # base + alpha * the mean task vector, element by element
            for at in range(0, unit.numel, _MEAN_CHUNK):
                base, deltas = unit_deltas(rows, code, at, min(_MEAN_CHUNK, unit.numel - at), bad)
                _narrow(base + plan * (deltas.sum(axis=0) / len(deltas)), out, at, out_code)
            return bad
        one_blas_thread()
        shape = rows.inp.models[0].shape
        m, n, transposed = orientation(shape)
        whole = np.empty((m, n), np.float32) if transposed else None
        for r, base, x in blocks(rows, code, shape, self.stacked, bad):
            parts = [x] if len(plan.a) == 1 else np.split(x, len(plan.a), axis=1)
            u = np.concatenate([p @ a for p, a in zip(parts, plan.a)], axis=1)
            merged = base + plan.alpha * (u @ plan.m)
            if transposed:
                whole[r:r + len(merged)] = merged  # rounded to float32, as `_narrow` does
            else:
                _narrow(merged, out, r * n, out_code)
        if transposed:
            _narrow(whole.T, out, 0, out_code)
        return bad

    def task_bytes(self, shape: tuple, models: int) -> int:
        """What a task holds beyond the unit's rows for a tensor of this shape: the Gram's limbs, a
        block Gram and its conversion temporaries or eigh's copies, the plan, a block's float64
        values; for a transposed matrix also its inputs widened to float32 and the output."""
        o = orientation(shape)
        if o is None:
            return 8 * (models + 3) * _MEAN_CHUNK
        m, n, transposed = o
        w = n * (models if self.stacked else 1)
        whole = 4 * (models + 4) * m * n if transposed else 0  # inputs as float32, the output twice, one spare
        return 8 * 10 * w * w + 8 * 2 * n * w + 8 * 4 * ROW_BLOCK * w + whole

    def held_bytes(self, shape: tuple, models: int) -> int:
        """What the run holds for a matrix planned before pass 2: its Gram and its plan."""
        o = orientation(shape)
        if o is None or o[2]:
            return 0
        w = o[1] * (models if self.stacked else 1)
        return 8 * w * w + 8 * 2 * o[1] * w


def _narrow(values: np.ndarray, out: np.ndarray, at: int, out_code: int) -> None:
    """float64 values rounded to float32, then stored as the output dtype at out[at:]."""
    f = np.ascontiguousarray(values, np.float32).ravel()
    kernels.narrow_block(f, len(f), out, at, out_code)


class IsoC(SpectralMethod):
    name = "iso_c"
    summary = ("Iso-C: per matrix, the sum of the task vectors with its spectrum flattened to the mean singular "
               "value (mean(S) U V^T), times alpha; other tensors: base + alpha * mean task vector")

    def factors(self, gram, o, models):
        s, v = spectrum(gram)
        mean = s.sum() / o[1]  # the mean over all min(m, n) singular values; the ones left out are zero
        return (v / s,), mean * v.T
