"""Adding a low-rank product to rows of a tensor (LoRA adapters as inputs, lora.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["add_low_rank", "rows_times", "add_rows_t", "delta_rows"]


@njit(nogil=True, cache=True, error_model="numpy")
def add_low_rank(vals, left, right, scale):
    """vals[i, j] += scale * sum_k left[i, k] * right[k, j], in place (vals float32 [n, cols]).

    Each product of two float32 values is exact in float64 and the sum runs over k in order, for
    every element alike: an element's value does not depend on which other rows are computed with
    it (unit size, chunking), unlike a BLAS product. One rounding to float32 at the end."""
    n, cols = vals.shape
    rank = right.shape[0]
    acc = np.empty(cols, np.float64)
    for i in range(n):
        acc[:] = 0.0
        for k in range(rank):
            b = np.float64(left[i, k])
            for j in range(cols):
                acc[j] += b * np.float64(right[k, j])
        for j in range(cols):
            vals[i, j] = np.float32(np.float64(vals[i, j]) + scale * acc[j])


# --- extraction (extract_lora.py): products over row blocks whose results do not depend on the blocks


@njit(nogil=True, cache=True, error_model="numpy")
def rows_times(d, m, out):
    """out[i, :] = sum_j d[i, j] * m[j, :] (float64), j in order: row i's result is the same
    whatever block of rows it is computed in."""
    n, cols = d.shape
    k = m.shape[1]
    for i in range(n):
        for c in range(k):
            out[i, c] = 0.0
        for j in range(cols):
            x = d[i, j]
            for c in range(k):
                out[i, c] += x * m[j, c]


@njit(nogil=True, cache=True, error_model="numpy")
def add_rows_t(d, q, z):
    """z[j, :] += sum_i d[i, j] * q[i, :] (float64), rows i in order: called on consecutive row
    blocks, the sums run over the rows in one fixed order whatever the blocks."""
    n, cols = d.shape
    k = q.shape[1]
    for i in range(n):
        for j in range(cols):
            x = d[i, j]
            for c in range(k):
                z[j, c] += x * q[i, c]


@njit(nogil=True, cache=True, error_model="numpy")
def delta_rows(ft, base, out, s):
    """out = ft - base in float64 (exact for float32 inputs); returns `s` plus the block's squares
    added element by element in order (so a sum over consecutive blocks does not depend on them),
    and the count of non-finite values."""
    n, cols = out.shape
    bad = 0
    for i in range(n):
        for j in range(cols):
            x = np.float64(ft[i, j]) - np.float64(base[i, j])
            if not np.isfinite(x):
                bad += 1
            out[i, j] = x
            s += x * x
    return s, bad
