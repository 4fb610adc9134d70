"""Kernels of the methods beyond the delta family: exact products (Gram matrices), row-wise
statistics and combinations, DELLA's rank-based masks, SCE's variance selection, RAM, nearswap and
Arcee fusion. Same conventions as `core`: raw unsigned rows in, float32 arithmetic in the formula's
written order, output narrowed into `out` at the element's unit-local index."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .core import (BLOCK, TH_ALL, TH_NONE, TH_VALUE, _add_abs, _deltas, bits_of_f32, count_in_bins, f32_from_bits,
                   f64_from_bits, keep_draw,
                   narrow_block, widen_block)

GRAM_BUCKETS = 512  # sums of two float32 exponent fields (each 1..254) index the product buckets
_LOW_BITS = 30


# --- the vectors a method combines ----------------------------------------------------------------

@njit(inline="always")
def _vectors(src, code, s, m, deltas, base, vals, bad):
    """vals[k, :m] = the k-th vector at elements [s, s+m): model k minus the base when `deltas`
    (row 0 of src is the base), else input k itself."""
    if deltas:
        bad[0] += widen_block(src[0], code, s, m, base)
        for k in range(vals.shape[0]):
            row = vals[k]
            bad[k + 1] += widen_block(src[k + 1], code, s, m, row)
            for j in range(m):
                row[j] = row[j] - base[j]
    else:
        for k in range(vals.shape[0]):
            bad[k] += widen_block(src[k], code, s, m, vals[k])


# --- exact sums of products ------------------------------------------------------------------------

@njit(inline="always")
def _split(x):
    """A float32 as (signed integer significand, exponent field >= 1): x = sig * 2**(e - 150)."""
    u = bits_of_f32(x)
    e = np.int64((u >> np.uint32(23)) & np.uint32(0xFF))
    sig = np.int64(u & np.uint32(0x7FFFFF))
    if e > 0:
        sig += np.int64(1 << 23)
    else:
        e = np.int64(1)
    if u >> np.uint32(31):
        sig = -sig
    return sig, e


LANES = 4  # interleaved copies of the buckets: consecutive elements (often of one exponent) never wait on each other's add


@njit(inline="always")
def _split_row(x, m, sig, exp):
    """`_split` of x[:m] into sig[:m], exp[:m] (a loop of its own, so the products loop is simple)."""
    for j in range(m):
        sig[j], exp[j] = _split(x[j])


@njit(inline="always")
def _flush_lanes(block, npairs, high, low):
    """Move one block's bucket sums, held in LANES interleaved copies, into the two-word accumulators
    exactly: the lanes are added first (together still < 2**60, products < 2**48 times BLOCK
    elements), then split into words."""
    for p in range(npairs):
        for e in range(GRAM_BUCKETS):
            v = 0
            for lane in range(LANES):  # the lanes together hold one block's sum: still < 2**60
                v += block[lane * npairs + p, e]
                block[lane * npairs + p, e] = 0
            if v != 0:
                high[p, e] += v >> _LOW_BITS
                low[p, e] += v & ((1 << _LOW_BITS) - 1)


@njit(nogil=True, cache=True, error_model="numpy")
def gram_sums(src, code, lo, hi, deltas, high, low, bad):
    """Exact sums over elements [lo, hi) of the pairwise products of the vectors (every input row
    of src, or each model minus the base when `deltas`), for pairs (a, b) with a <= b in row-major
    order. Products of float32 values are exact integers times powers of two; they are summed per
    exponent bucket as integers (value of bucket e: (high * 2**30 + low) * 2**(e - 300)), so the
    result does not depend on order or chunking."""
    n_in = src.shape[0]
    nv = n_in - 1 if deltas else n_in
    vals = np.empty((nv, BLOCK), np.float32)
    base = np.empty(BLOCK, np.float32)
    npairs = high.shape[0]
    block = np.zeros((LANES * npairs, GRAM_BUCKETS), np.int64)
    sig = np.empty((nv, BLOCK), np.int64)
    exp = np.empty((nv, BLOCK), np.int64)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, deltas, base, vals, bad)
        for k in range(nv):
            _split_row(vals[k], m, sig[k], exp[k])
        p = 0
        for a in range(nv):
            for b in range(a, nv):
                sa, sb, ea, eb = sig[a], sig[b], exp[a], exp[b]
                for j in range(m):
                    block[(j & (LANES - 1)) * npairs + p, ea[j] + eb[j]] += sa[j] * sb[j]
                p += 1
        _flush_lanes(block, npairs, high, low)


# --- batches: many small whole tensors, one segment of columns each --------------------------------
# A pass-2 batch holds consecutive small tensors side by side: a segment is one tensor's columns
# of every input row and of the output. These kernels give per segment what
# the per-tensor kernels give on the tensor alone, bit for bit, in one call for the whole batch.

_LIMBS = 24  # 30-bit limbs of an exact sum of `gram_sums` words: bucket 511 + 30 + 64 bits + carries < 720


@njit(inline="always")
def _flush_span(block, npairs, p, e0, e1, high, low, used_lo, used_hi):
    """`_flush_lanes` of pair p's buckets e0..e1 only (those a small tensor's exponents reach),
    widening the range of buckets in use, used_lo[p]..used_hi[p], that `exact_f64` rounds."""
    for e in range(e0, e1 + 1):
        v = 0
        for lane in range(LANES):
            v += block[lane * npairs + p, e]
            block[lane * npairs + p, e] = 0
        if v != 0:
            high[p, e] += v >> _LOW_BITS
            low[p, e] += v & ((1 << _LOW_BITS) - 1)
    used_lo[p] = min(used_lo[p], e0)
    used_hi[p] = max(used_hi[p], e1)


@njit(inline="always")
def _split_span(x, m, sig, exp):
    """`_split_row`, returning the smallest and largest exponent field of the non-zero values
    (GRAM_BUCKETS, -1 when all are zero): the buckets their products can reach."""
    lo = GRAM_BUCKETS
    hi = -1
    for j in range(m):
        s, e = _split(x[j])
        sig[j] = s
        exp[j] = e
        if s != 0:
            lo = min(lo, e)
            hi = max(hi, e)
    return lo, hi


@njit(inline="always")
def _add_shifted(limbs, x, shift):
    """limbs += x * 2**shift (x a signed int64), limbs of 30 bits each (not yet carried)."""
    mask = np.int64((1 << _LOW_BITS) - 1)
    q = shift // _LOW_BITS
    r = shift - q * _LOW_BITS
    v = (x & mask) << r
    limbs[q] += v & mask
    limbs[q + 1] += v >> _LOW_BITS
    v = ((x >> _LOW_BITS) & mask) << r
    limbs[q + 1] += v & mask
    limbs[q + 2] += v >> _LOW_BITS
    v = (x >> (2 * _LOW_BITS)) << r  # the signed top: |x >> 60| <= 8
    limbs[q + 2] += v & mask
    limbs[q + 3] += v >> _LOW_BITS


@njit(inline="always")
def _carry(limbs):
    """Carry every limb into [0, 2**30); the top limb keeps the sign."""
    for i in range(_LIMBS - 1):
        c = limbs[i] >> _LOW_BITS
        limbs[i] -= c << _LOW_BITS
        limbs[i + 1] += c


@njit(inline="always")
def _bit(limbs, k):
    return (limbs[k // _LOW_BITS] >> (k % _LOW_BITS)) & 1


@njit(nogil=True, cache=True, error_model="numpy")
def exact_f64(high, low, e0, e1, limbs):
    """The sum `gram_sums` keeps in buckets e0..e1 of `high`, `low` (value (high * 2**30 + low)
    * 2**(e - 300)), correctly rounded to float64 (nearest, ties to even: what
    `statistics.exact_products` gets from Python's exact int / int), those buckets zeroed. The
    result is never subnormal nor infinite (|products| of float32 lie in 2**-298..2**256)."""
    limbs[:] = 0
    for e in range(e0, e1 + 1):
        if high[e] != 0:
            _add_shifted(limbs, high[e], e + _LOW_BITS)
            high[e] = 0
        if low[e] != 0:
            _add_shifted(limbs, low[e], e)
            low[e] = 0
    _carry(limbs)
    neg = limbs[_LIMBS - 1] < 0
    if neg:
        for i in range(_LIMBS):
            limbs[i] = -limbs[i]
        _carry(limbs)
    top = _LIMBS - 1
    while top >= 0 and limbs[top] == 0:
        top -= 1
    if top < 0:
        return 0.0
    width = 0
    v = limbs[top]
    while v:
        width += 1
        v >>= 1
    p = top * _LOW_BITS + width - 1  # the highest set bit
    shift = max(0, p - 52)
    m = np.int64(0)
    for k in range(p, shift - 1, -1):  # the top 53 bits
        m = (m << 1) | _bit(limbs, k)
    if shift > 0 and _bit(limbs, shift - 1):  # round to nearest, ties to even
        r = shift - 1
        sticky = (limbs[r // _LOW_BITS] & ((np.int64(1) << (r % _LOW_BITS)) - 1)) != 0
        for i in range(r // _LOW_BITS):
            sticky = sticky or limbs[i] != 0
        if sticky or (m & 1):
            m += 1
    val = np.float64(m) * f64_from_bits(np.uint64(1023 + shift - 300) << np.uint64(52))  # exact: a power of two
    return -val if neg else val


@njit(nogil=True, cache=True, error_model="numpy")
def gram_batch(src, code, los, his, deltas, out, bad):
    """Per segment i (columns los[i]:his[i]), `gram_sums` over its columns rounded as `statistics.exact_products` rounds
    it: out[i, p] for the pairs (a, b), a <= b, in row-major order. Only the buckets the
    segment's exponents can reach are flushed and rounded (a small tensor's values span a few
    dozen exponents, not 512)."""
    n_in = src.shape[0]
    nv = n_in - 1 if deltas else n_in
    npairs = nv * (nv + 1) // 2
    vals = np.empty((nv, BLOCK), np.float32)
    base = np.empty(BLOCK, np.float32)
    block = np.zeros((LANES * npairs, GRAM_BUCKETS), np.int64)
    high = np.zeros((npairs, GRAM_BUCKETS), np.int64)
    low = np.zeros((npairs, GRAM_BUCKETS), np.int64)
    sig = np.empty((nv, BLOCK), np.int64)
    exp = np.empty((nv, BLOCK), np.int64)
    emin = np.empty(nv, np.int64)
    emax = np.empty(nv, np.int64)
    used_lo = np.empty(npairs, np.int64)
    used_hi = np.empty(npairs, np.int64)
    limbs = np.zeros(_LIMBS, np.int64)
    for i in range(los.shape[0]):
        used_lo[:] = GRAM_BUCKETS
        used_hi[:] = -1
        for s in range(los[i], his[i], BLOCK):
            m = min(BLOCK, his[i] - s)
            _vectors(src, code, s, m, deltas, base, vals, bad)
            for k in range(nv):
                emin[k], emax[k] = _split_span(vals[k], m, sig[k], exp[k])
            p = 0
            for a in range(nv):
                for b in range(a, nv):
                    sa, sb, ea, eb = sig[a], sig[b], exp[a], exp[b]
                    for j in range(m):
                        block[(j & (LANES - 1)) * npairs + p, ea[j] + eb[j]] += sa[j] * sb[j]
                    if emax[a] >= 0 and emax[b] >= 0:  # else every product was 0, added to a zero bucket
                        _flush_span(block, npairs, p, emin[a] + emin[b], emax[a] + emax[b], high, low, used_lo, used_hi)
                    p += 1
        for p in range(npairs):
            out[i, p] = exact_f64(high[p], low[p], used_lo[p], used_hi[p], limbs)


@njit(nogil=True, cache=True, error_model="numpy")
def arc_weights(t, cos, out):
    """Slerp's weights of each (t[k], cos[k]): sin((1 - t) θ) / sin θ and sin(t θ) / sin θ with
    θ = acos(cos), into out[k]; the C library's acos and sin, which Python's math module calls, in
    the same order of float64 operations (no contraction), so the same bits as the scalar code."""
    for k in range(t.shape[0]):
        theta = math.acos(cos[k])
        s = math.sin(theta)
        out[k, 0] = math.sin((1 - t[k]) * theta) / s
        out[k, 1] = math.sin(t[k] * theta) / s


@njit(nogil=True, cache=True, error_model="numpy")
def combine_batch(src, code, los, his, coeffs, deltas, out, out_code, bad):
    """Per segment i (columns los[i]:his[i]), the linear combination with float32 coefficients coeffs[i], with each
    formula's float32 operations as its per-tensor kernel does them: `weighted_sum` (sum_k c_k
    input_k, from 0.0) or, when `deltas`, `delta.gta` with nothing thinned (d_k = model_k - base,
    times c_k unless c_k is 1, summed from d_0, plus the base)."""
    n_in = src.shape[0]
    K = n_in - 1 if deltas else n_in
    base = np.empty(BLOCK, np.float32)
    d = np.empty((K, BLOCK), np.float32)
    acc = np.empty(BLOCK, np.float32)
    one = np.float32(1.0)
    for i in range(los.shape[0]):
        c = coeffs[i]
        for s in range(los[i], his[i], BLOCK):
            m = min(BLOCK, his[i] - s)
            a = acc[:m]
            if deltas:
                bad[0] += widen_block(src[0], code, s, m, base)
                for k in range(K):
                    row = d[k]
                    bad[k + 1] += _deltas(src, code, k + 1, s, m, base, row, False)
                    w = c[k]
                    if w != one:
                        for j in range(m):
                            row[j] = row[j] * w
                a[:] = d[0, :m]
                for k in range(1, K):
                    x = d[k, :m]
                    for j in range(m):
                        a[j] = a[j] + x[j]
                b = base[:m]
                for j in range(m):
                    a[j] = b[j] + a[j]
            else:
                xs = d[0, :m]
                for j in range(m):
                    a[j] = np.float32(0.0)
                for k in range(K):
                    bad[k] += widen_block(src[k], code, s, m, d[0])
                    w = c[k]
                    for j in range(m):
                        a[j] = a[j] + w * xs[j]
            narrow_block(acc, m, out, s, out_code)


# --- row-wise statistics and combinations ----------------------------------------------------------

@njit(inline="always")
def _row_gram(src, code, s0, nrows, row_len, deltas, out, r0, base, vals, bad):
    """out[r0 + r] = the pairwise dot products of row r of the rows starting at element s0."""
    nv = vals.shape[0]
    for r in range(nrows):
        _vectors(src, code, s0 + r * row_len, row_len, deltas, base, vals, bad)
        p = 0
        for a in range(nv):
            for b in range(a, nv):
                acc = 0.0
                for j in range(row_len):
                    acc += np.float64(vals[a, j]) * np.float64(vals[b, j])
                out[r0 + r, p] = acc
                p += 1


@njit(nogil=True, cache=True, error_model="numpy")
def row_gram(src, code, lo, hi, row_len, deltas, out, bad):
    """Per row (row_len consecutive elements, rows [lo, hi) of the unit) the pairwise dot products
    of the vectors, in float64, summed in element order (rows are never split, so this is the
    same for any chunking)."""
    nv = src.shape[0] - 1 if deltas else src.shape[0]
    _row_gram(src, code, lo * row_len, hi - lo, row_len, deltas, out, 0, np.empty(row_len, np.float32),
              np.empty((nv, row_len), np.float32), bad)


@njit(nogil=True, cache=True, error_model="numpy")
def row_gram_batch(src, code, los, row_lens, row_starts, deltas, out, bad):
    """`row_gram` of every row of many segments (segment i: rows of row_lens[i] elements from
    column los[i]), its rows' results at out[row_starts[i]:row_starts[i + 1]]."""
    nv = src.shape[0] - 1 if deltas else src.shape[0]
    width = max(1, row_lens.max()) if row_lens.shape[0] else 1
    base = np.empty(width, np.float32)
    vals = np.empty((nv, width), np.float32)
    for i in range(los.shape[0]):
        _row_gram(src, code, los[i], row_starts[i + 1] - row_starts[i], row_lens[i], deltas, out, row_starts[i],
                  base, vals, bad)


@njit(inline="always")
def _row_combine(src, code, s0, nrows, row_len, coeffs, r0, deltas, out, out_code, base, x, acc, bad):
    """The rows starting at element s0 combined with coefficients coeffs[r0 + r] (`row_combine`)."""
    n_in = src.shape[0]
    for r in range(nrows):
        s = s0 + r * row_len
        c = coeffs[r0 + r]
        for j in range(row_len):
            acc[j] = np.float32(0.0)
        if deltas:
            bad[0] += widen_block(src[0], code, s, row_len, base)
            for k in range(n_in - 1):
                bad[k + 1] += widen_block(src[k + 1], code, s, row_len, x)
                w = c[k]
                for j in range(row_len):
                    acc[j] = acc[j] + w * (x[j] - base[j])
            for j in range(row_len):
                acc[j] = base[j] + acc[j]
        else:
            for k in range(n_in):
                bad[k] += widen_block(src[k], code, s, row_len, x)
                w = c[k]
                for j in range(row_len):
                    acc[j] = acc[j] + w * x[j]
        narrow_block(acc, row_len, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def row_combine(src, code, lo, hi, row_len, coeffs, deltas, out, out_code, bad):
    """Rows [lo, hi): out = base + sum_k c[r, k] * (model_k - base) when `deltas`, else
    sum_k c[r, k] * input_k, with float32 coefficients per row (in input order, from 0.0)."""
    _row_combine(src, code, lo * row_len, hi - lo, row_len, coeffs, 0, deltas, out, out_code,
                 np.empty(row_len, np.float32), np.empty(row_len, np.float32), np.empty(row_len, np.float32), bad)


@njit(nogil=True, cache=True, error_model="numpy")
def row_combine_batch(src, code, los, row_lens, row_starts, coeffs, deltas, out, out_code, bad):
    """`row_combine` of many segments (as `row_gram_batch`), row r's coefficients coeffs[r]."""
    width = max(1, row_lens.max()) if row_lens.shape[0] else 1
    base = np.empty(width, np.float32)
    x = np.empty(width, np.float32)
    acc = np.empty(width, np.float32)
    for i in range(los.shape[0]):
        _row_combine(src, code, los[i], row_starts[i + 1] - row_starts[i], row_lens[i], coeffs, row_starts[i],
                     deltas, out, out_code, base, x, acc, bad)


# --- DELLA -----------------------------------------------------------------------------------------

@njit(inline="always")
def _rank_order(keys, n, order, tmp, count):
    """order[:n] = the indices of keys[:n] in ascending order, ties by index: a stable LSD radix
    sort, one pass per byte (a pass where every key has the same byte is skipped). For the bit
    patterns of non-negative float32 values (NaN canonicalised) this is argsort(kind="mergesort")'s
    order, ~4x faster on rows of a few thousand."""
    for i in range(n):
        order[i] = i
    for shift in range(0, 32, 8):
        sh = np.uint32(shift)
        for b in range(257):
            count[b] = 0
        for i in range(n):
            count[np.int64((keys[i] >> sh) & np.uint32(255)) + 1] += 1
        same = False
        for b in range(256):
            same = same or count[b + 1] == n
            count[b + 1] += count[b]
        if same:
            continue
        for i in range(n):
            idx = order[i]
            bucket = np.int64((keys[idx] >> sh) & np.uint32(255))
            tmp[count[bucket]] = idx
            count[bucket] += 1
        for i in range(n):
            order[i] = tmp[i]


@njit(inline="always")
def _della_slices(src, code, model, at, lo_slice, hi_slice, d1, rest, flat0, key, density, epsilon, mask, bad,
                  base, d, mag, order, tmp, count):
    """`della_mask`'s loop for a unit stored at columns at.. of src and mask (flat index flat0 +
    unit-local index), with the caller's scratch."""
    size = d1 * rest
    k = np.uint64(key)
    for sl in range(lo_slice, hi_slice):
        s = sl * size
        bad[0] += widen_block(src[0], code, at + s, size, base)
        bad[model + 1] += widen_block(src[model + 1], code, at + s, size, d)
        for j in range(size):
            d[j] = d[j] - base[j]
        for c in range(rest):
            for i in range(d1):
                u = bits_of_f32(d[i * rest + c]) & np.uint32(0x7FFFFFFF)  # |delta|, ordered as its value
                mag[i] = np.uint32(0x7FC00000) if u > np.uint32(0x7F800000) else u  # one NaN, sorted last
            _rank_order(mag, d1, order, tmp, count)
            for rank0 in range(d1):
                i = order[rank0]
                q = rank0 / (d1 - 1) if d1 > 1 else 0.5
                p = density - epsilon + 2.0 * epsilon * q
                lim = np.uint64(max(0.0, min(1.0, p)) * 16777216.0)
                idx = s + i * rest + c
                mask[at + idx] = 1 if keep_draw(k, flat0 + idx, lim) else 0


@njit(nogil=True, cache=True, error_model="numpy")
def della_mask(src, code, model, lo_slice, hi_slice, d1, rest, flat0, key, density, epsilon, mask, bad):
    """DELLA's keep mask for dim-0 slices [lo_slice, hi_slice) of the unit (each d1 x rest
    elements): within each vector along dim 1, rank |delta| ascending (ties by position), q =
    (rank - 1) / (d1 - 1) (0.5 for a single element), keep probability p = density - epsilon +
    2 epsilon q, drawn from the counter RNG (element's tensor-wide index flat0 + local index)."""
    size = d1 * rest
    _della_slices(src, code, model, 0, lo_slice, hi_slice, d1, rest, flat0, key, density, epsilon, mask, bad,
                  np.empty(size, np.float32), np.empty(size, np.float32), np.empty(d1, np.uint32),
                  np.empty(d1, np.int64), np.empty(d1, np.int64), np.empty(257, np.int64))


@njit(nogil=True, cache=True, error_model="numpy")
def della_mask_segments(src, code, model, starts, d1s, rests, slices, active, sums, keys, density, epsilon, mask,
                        full, kept, bad):
    """`della_mask` of one model over a batch of whole tensors (tensor k: columns
    starts[k]:starts[k+1], layout d1s[k], rests[k], slices[k] as `della_layout` gives it) for the
    tensors with active[k], into mask at the same columns; and for those with sums[k] too,
    `masked_abs_sums` of the tensor into full[k] and kept[k] (DELLA's L1 rescale)."""
    size, width = 1, 1
    for k in range(starts.shape[0] - 1):
        if active[k]:
            size = max(size, d1s[k] * rests[k])
            width = max(width, d1s[k])
    base = np.empty(size, np.float32)
    d = np.empty(size, np.float32)
    mag = np.empty(width, np.uint32)
    order = np.empty(width, np.int64)
    tmp = np.empty(width, np.int64)
    count = np.empty(257, np.int64)
    for k in range(starts.shape[0] - 1):
        if active[k]:
            _della_slices(src, code, model, starts[k], 0, slices[k], d1s[k], rests[k], 0, keys[k], density[k],
                          epsilon[k], mask, bad, base, d, mag, order, tmp, count)
            if sums[k]:
                masked_abs_sums(src, code, model, starts[k], starts[k + 1], mask, full[k], kept[k], bad)


def della_layout(shape: tuple, unit) -> tuple[int, int, int]:
    """`della_mask`'s layout of a unit: (vector length along dim 1, elements between a vector's
    neighbours, dim-0 slices in the unit); a 1-D tensor is one vector, as mergekit unsqueezes it."""
    if len(shape) < 2:
        return max(1, unit.numel), 1, 1 if unit.numel else 0
    rest = 1
    for n in shape[2:]:
        rest *= n
    return shape[1], rest, unit.numel // (shape[1] * rest) if shape[1] * rest else 0


@njit(nogil=True, cache=True, error_model="numpy")
def masked_abs_sums(src, code, model, lo, hi, mask, full, kept, bad):
    """Exact per-exponent significand sums of |delta| and of |delta * mask| over [lo, hi)."""
    b = np.empty(BLOCK, np.float32)
    d = np.empty(BLOCK, np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, b)
        bad[model + 1] += widen_block(src[model + 1], code, s, m, d)
        for j in range(m):
            x = d[j] - b[j]
            _add_abs(x, full)
            _add_abs(x * (np.float32(1.0) if mask[s + j] else np.float32(0.0)), kept)


# --- SCE -------------------------------------------------------------------------------------------

@njit(inline="always")
def _variance(vals, K, j):
    """Population variance across models of element j, in float64 (torch accumulates var in
    double), rounded to float32."""
    mean = 0.0
    for k in range(K):
        mean += np.float64(vals[k, j])
    mean /= K
    acc = 0.0
    for k in range(K):
        dv = np.float64(vals[k, j]) - mean
        acc += dv * dv
    return np.float32(acc / K)


@njit(inline="always")
def _variance_key(vals, K, j):
    """SCE's ranking key of element j: the bits of |variance| (mergekit ranks var.abs()), which
    order as the values do; a NaN variance (Inf - Inf) is above every number."""
    return np.int32(bits_of_f32(_variance(vals, K, j)) & np.uint32(0x7FFFFFFF))


@njit(nogil=True, cache=True, error_model="numpy")
def variance_hist(src, code, lo, hi, hist, bad):
    """Histogram of the top 16 bits of the per-element variance key across models; returns how
    many variances are non-zero (NaN included, as torch.count_nonzero counts it)."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    nnz = 0
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        for j in range(m):
            key = _variance_key(vals, K, j)
            hist[key >> 16] += 1
            nnz += key != 0
    return nnz


@njit(nogil=True, cache=True, error_model="numpy")
def variance_bins(src, code, lo, hi, bins, counts, bad):
    """`count_in_bins` of the per-element variance keys (round 2 of `variance_hist`). The keys
    are made in a loop of their own: counted as they were made, the loop ran 5x slower."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    keys = np.empty(BLOCK, np.int32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        for j in range(m):
            keys[j] = _variance_key(vals, K, j)
        for j in range(m):
            count_in_bins(np.uint32(keys[j]), bins, counts)


@njit(inline="always")
def _selection_row(vals, K, m, kind, value, budget, var, keep):
    """keep[:m] = 1.0 for the elements SCE selects, else 0.0: variance key above `value`'s bits,
    or equal to them while the tie budget lasts (lowest index first); all for TH_ALL, none for
    TH_NONE. Keys in a loop of their own, the tie branch rare, the comparison a select: a branch
    mispredicted on half the elements made SCE's kernels 1.5-5x slower."""
    for j in range(m):
        var[j] = _variance_key(vals, K, j)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if kind == TH_ALL or kind == TH_NONE:
        f = one if kind == TH_ALL else zero
        for j in range(m):
            keep[j] = f
        return
    t = np.int32(bits_of_f32(value))
    left = budget[0]
    for j in range(m):
        key = var[j]
        if key == t:
            keep[j] = one if left > 0 else zero
            left = left - 1 if left > 0 else left
        else:
            keep[j] = one if key > t else zero
    budget[0] = left


@njit(nogil=True, cache=True, error_model="numpy")
def sce_squares(src, code, lo, hi, kind, value, budget, high, low, bad):
    """Per model, exact sums of (delta * selected)^2 (SCE's model weights), as `gram_sums` words."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    var = np.empty(BLOCK, np.int32)
    keep = np.empty(BLOCK, np.float32)
    sig = np.empty(BLOCK, np.int64)
    exp = np.empty(BLOCK, np.int64)
    block = np.zeros((LANES * K, GRAM_BUCKETS), np.int64)
    zero = np.float32(0.0)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        _selection_row(vals, K, m, kind, value, budget, var, keep)
        for k in range(K):
            _split_row(vals[k], m, sig, exp)
            for j in range(m):
                sg = sig[j] if keep[j] != zero else 0
                block[(j & (LANES - 1)) * K + k, exp[j] + exp[j]] += sg * sg
        _flush_lanes(block, K, high, low)


@njit(nogil=True, cache=True, error_model="numpy")
def sce_merge(src, code, lo, hi, kind, value, budget, omega, out, out_code, bad):
    """SCE: keep the elements whose variance across models is selected, elect signs by the sum of
    the kept deltas, and average the agreeing deltas weighted by omega: base + sum_i d_i e_i /
    max(sum_i e_i, 1e-6) with e_i = omega_i [sign d_i == majority]."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    acc = np.empty(BLOCK, np.float32)
    var = np.empty(BLOCK, np.int32)
    keep = np.empty(BLOCK, np.float32)
    total = np.empty(BLOCK, np.float32)
    num = np.empty(BLOCK, np.float32)
    den = np.empty(BLOCK, np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        _selection_row(vals, K, m, kind, value, budget, var, keep)
        for k in range(K):
            x = vals[k]
            for j in range(m):
                v = x[j] * keep[j]  # mergekit's `task_vectors * mask`: a dropped -x is -0.0
                x[j] = v
                total[j] = v if k == 0 else total[j] + v
        for k in range(K):
            x = vals[k]
            w = omega[k]
            for j in range(m):
                majority = one if total[j] >= zero else -one
                sgn = one if x[j] > zero else (-one if x[j] < zero else zero)
                e = w if sgn == majority else zero
                num[j] = x[j] * e if k == 0 else num[j] + x[j] * e
                den[j] = e if k == 0 else den[j] + e
        for j in range(m):
            acc[j] = base[j] + num[j] / max(den[j], np.float32(1e-6))
        narrow_block(acc, m, out, s, out_code)


@njit(inline="always")
def _select_rank(keys, n, r, counts):
    """(key, keys below it, keys equal to it) of the r-th smallest (1-based) of keys[:n] (>= 0,
    < 2**31): a radix selection, 11, 11 and 10 bits at a time (as `core.exact_ranks`)."""
    prefix = np.int64(0)
    mask = np.int64(0)
    below = np.int64(0)
    last = np.int64(0)
    for level in range(3):
        shift = 21 if level == 0 else 10 if level == 1 else 0
        width = 10 if level == 2 else 11
        digits = (np.int64(1) << width) - 1
        counts[:digits + 1] = 0
        for j in range(n):
            k = keys[j]
            if (k & mask) == prefix:
                counts[(k >> shift) & digits] += 1
        acc = np.int64(0)
        digit = 0
        while acc + counts[digit] < r:
            acc += counts[digit]
            digit += 1
        r -= acc
        below += acc
        last = counts[digit]
        prefix |= np.int64(digit) << shift
        mask |= digits << shift
    return prefix, below, last


@njit(nogil=True, cache=True, error_model="numpy")
def sce_batch_plan(src, code, los, his, topks, kinds, values, budgets, squares, bad):
    """SCE's plan of many whole tensors (columns los[i]:his[i]), what its two statistics rounds and
    `Sce.tensor_plan` find per tensor: the variance threshold (kinds[i], values[i], budgets[i]:
    ties kept) keeping the top int(float32(nonzero variances) * float32(topks[i])) of the variance
    keys (ties lowest index first), and each model's exact sum of selected squared deltas,
    squares[i, k] (rounded as `statistics.exact_products`)."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    width = 0
    for i in range(los.shape[0]):
        width = max(width, his[i] - los[i])
    keys = np.empty(width, np.int64)
    counts = np.empty(2048, np.int64)
    high = np.zeros((K, GRAM_BUCKETS), np.int64)
    low = np.zeros((K, GRAM_BUCKETS), np.int64)
    limbs = np.zeros(_LIMBS, np.int64)
    budget = np.zeros(1, np.int64)
    var = np.empty(BLOCK, np.int32)
    keep = np.empty(BLOCK, np.float32)
    sig = np.empty(BLOCK, np.int64)
    exp = np.empty(BLOCK, np.int64)
    block = np.zeros((LANES * K, GRAM_BUCKETS), np.int64)
    used_lo = np.full(K, GRAM_BUCKETS, np.int64)
    used_hi = np.full(K, -1, np.int64)
    zero = np.float32(0.0)
    for i in range(los.shape[0]):
        lo, hi = los[i], his[i]
        n = hi - lo
        kind, value, kept = TH_ALL, np.float32(0.0), np.int64(0)
        topk = topks[i]
        if topk < 1:
            nnz = 0
            for s in range(lo, hi, BLOCK):
                m = min(BLOCK, hi - s)
                _vectors(src, code, s, m, True, base, vals, bad)
                for j in range(m):
                    key = _variance_key(vals, K, j)
                    keys[s - lo + j] = key
                    nnz += key != 0
            k = np.int64(np.float32(nnz) * np.float32(topk)) if topk > 0 else np.int64(0)
            if k <= 0:
                kind = TH_NONE
            elif k < n:
                bits, below, ties = _select_rank(keys, n, n - k + 1, counts)
                kind, value, kept = TH_VALUE, f32_from_bits(np.uint32(bits)), k - (n - below - ties)
        kinds[i], values[i], budgets[i] = kind, value, kept
        budget[0] = kept
        for s in range(lo, hi, BLOCK):  # `sce_squares`, flushing only the buckets the tensor reaches
            m = min(BLOCK, hi - s)
            _vectors(src, code, s, m, True, base, vals, bad)
            _selection_row(vals, K, m, kind, value, budget, var, keep)
            for k in range(K):
                e0, e1 = _split_span(vals[k], m, sig, exp)
                for j in range(m):
                    sg = sig[j] if keep[j] != zero else 0
                    block[(j & (LANES - 1)) * K + k, exp[j] + exp[j]] += sg * sg
                if e1 >= 0:  # else every square was 0, added to a zero bucket
                    _flush_span(block, K, k, e0 + e0, e1 + e1, high, low, used_lo, used_hi)
        for k in range(K):
            squares[i, k] = exact_f64(high[k], low[k], used_lo[k], used_hi[k], limbs)
            used_lo[k], used_hi[k] = GRAM_BUCKETS, -1


@njit(nogil=True, cache=True, error_model="numpy")
def sce_batch_merge(src, code, los, his, kinds, values, budgets, omegas, out, out_code, bad):
    """`sce_merge` of many whole tensors, tensor i with its plan (kinds[i], values[i], budgets[i],
    omegas[i])."""
    budget = np.zeros(1, np.int64)
    for i in range(los.shape[0]):
        budget[0] = budgets[i]
        sce_merge(src, code, los[i], his[i], kinds[i], values[i], budget, omegas[i], out, out_code, bad)


# --- RAM -------------------------------------------------------------------------------------------

@njit(nogil=True, cache=True, error_model="numpy")
def ram_counts(src, code, lo, hi, eps, shared, unique, bad):
    """Per model: how many of its changed elements (|delta| > eps) it shares with another model,
    and how many only it changes (RAM+'s boost)."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        for j in range(m):
            cnt = 0
            for k in range(K):
                cnt += abs(vals[k, j]) > eps
            for k in range(K):
                if abs(vals[k, j]) > eps:
                    if cnt == 1:
                        unique[k] += 1
                    else:
                        shared[k] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def ram_merge(src, code, lo, hi, eps, boost, out, out_code, bad):
    """RAM: an element changed by one model takes that model's delta (times boost[k], RAM+), one
    changed by several takes their mean, one changed by none stays at the base."""
    K = src.shape[0] - 1
    base = np.empty(BLOCK, np.float32)
    vals = np.empty((K, BLOCK), np.float32)
    acc = np.empty(BLOCK, np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        _vectors(src, code, s, m, True, base, vals, bad)
        for j in range(m):
            cnt = 0
            for k in range(K):
                cnt += abs(vals[k, j]) > eps
            total = np.float32(0.0)
            for k in range(K):
                x = vals[k, j]
                if abs(x) > eps:
                    total = total + (x * boost[k] if cnt == 1 else x / np.float32(cnt))
            acc[j] = base[j] + total
        narrow_block(acc, m, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def ram_batch_counts(src, code, los, his, eps, shared, unique, bad):
    """`ram_counts` of many whole tensors (columns los[i]:his[i], threshold eps[i]) into shared[i],
    unique[i]."""
    for i in range(los.shape[0]):
        ram_counts(src, code, los[i], his[i], eps[i], shared[i], unique[i], bad)


@njit(nogil=True, cache=True, error_model="numpy")
def ram_batch_merge(src, code, los, his, eps, boosts, out, out_code, bad):
    """`ram_merge` of many whole tensors, tensor i with eps[i] and boosts[i]."""
    for i in range(los.shape[0]):
        ram_merge(src, code, los[i], his[i], eps[i], boosts[i], out, out_code, bad)


# --- nearswap --------------------------------------------------------------------------------------

@njit(nogil=True, cache=True, error_model="numpy")
def nearswap(src, code, lo, hi, t, out, out_code, bad):
    """w = clamp(t / max(|base - x|, 1e-6), 0, 1); out = w x + (1 - w) base."""
    base = np.empty(BLOCK, np.float32)
    x = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    one = np.float32(1.0)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, base)
        bad[1] += widen_block(src[1], code, s, m, x)
        for j in range(m):
            w = t / max(abs(base[j] - x[j]), np.float32(1e-6))
            w = min(max(w, np.float32(0.0)), one)
            acc[j] = w * x[j] + (one - w) * base[j]
        narrow_block(acc, m, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def nearswap_batch(src, code, los, his, ts, out, out_code, bad):
    """`nearswap` of many whole tensors, tensor i with ts[i]."""
    for i in range(los.shape[0]):
        nearswap(src, code, los[i], his[i], ts[i], out, out_code, bad)


# --- Arcee fusion ----------------------------------------------------------------------------------

@njit(inline="always")
def _kl_row(x, b, n):
    """KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) of one row, computed in float64 and rounded once
    to float32. The rows of a fine-tune and its base are nearly equal, so the KL is a sum of tiny
    differences: in float32 (as mergekit computes it) it carries rounding noise of up to ~1e-3 of
    its value, which moves elements across the selection threshold (docs/mergekit.md)."""
    mx = np.float64(x[0])
    mb = np.float64(b[0])
    for j in range(1, n):
        mx = max(mx, np.float64(x[j]))
        mb = max(mb, np.float64(b[j]))
    sx = 0.0
    sb = 0.0
    for j in range(n):
        sx += math.exp(np.float64(x[j]) - mx)
        sb += math.exp(np.float64(b[j]) - mb)
    kl = 0.0
    for j in range(n):
        p = math.exp(np.float64(x[j]) - mx) / sx + 1e-8
        q = math.exp(np.float64(b[j]) - mb) / sb + 1e-8
        kl += p * math.log(p / q)
    return np.float32(kl)


@njit(inline="always")
def sort_key(f):
    """An unsigned key that orders float32 values as numbers (negatives included)."""
    u = bits_of_f32(f)
    return ~u if u >> np.uint32(31) else u | np.uint32(0x80000000)


@njit(nogil=True, cache=True, error_model="numpy")
def arcee_importance(src, code, lo, hi, row_len, bins, hist, counts, bad):
    """Importance |x - base| * KL(row) of rows [lo, hi) (KL can round below zero): the histogram
    of the top 16 bits of its `sort_key` (65536 bins), and the low-16-bit counts inside `bins`."""
    b = np.empty(row_len, np.float32)
    x = np.empty(row_len, np.float32)
    for r in range(lo, hi):
        s = r * row_len
        bad[0] += widen_block(src[0], code, s, row_len, b)
        bad[1] += widen_block(src[1], code, s, row_len, x)
        kl = _kl_row(x, b, row_len)
        for j in range(row_len):
            bits = sort_key(abs(x[j] - b[j]) * kl)
            hist[bits >> np.uint32(16)] += 1
            count_in_bins(bits, bins, counts)


@njit(inline="always")
def _arcee_rows(src, code, s0, nrows, row_len, threshold, out, out_code, b, x, acc, bad):
    """`arcee_merge` of the nrows rows starting at element s0."""
    for r in range(nrows):
        s = s0 + r * row_len
        bad[0] += widen_block(src[0], code, s, row_len, b)
        bad[1] += widen_block(src[1], code, s, row_len, x)
        kl = _kl_row(x, b, row_len)
        for j in range(row_len):
            d = x[j] - b[j]
            acc[j] = b[j] + d * (np.float32(1.0) if abs(d) * kl >= threshold else np.float32(0.0))
        narrow_block(acc, row_len, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def arcee_merge(src, code, lo, hi, row_len, threshold, out, out_code, bad):
    """mergekit's base + (x - base) * mask, the mask where the importance reaches the threshold."""
    _arcee_rows(src, code, lo * row_len, hi - lo, row_len, threshold, out, out_code, np.empty(row_len, np.float32),
                np.empty(row_len, np.float32), np.empty(row_len, np.float32), bad)


@njit(inline="always")
def _key_value(key):
    """The float32 whose `sort_key` is `key`."""
    u = np.uint32(key)
    return f32_from_bits(u ^ np.uint32(0x80000000) if u >> np.uint32(31) else ~u)


@njit(nogil=True, cache=True, error_model="numpy")
def arcee_batch(src, code, los, row_lens, nrows, out, out_code, bad):
    """Arcee fusion of many whole tensors (tensor i: nrows[i] rows of row_lens[i] elements from
    column los[i]): the importance's quartiles at mergekit's indices floor(float32(q) *
    float32(n - 1)) selected from its keys (what `ArceeFusion.tensor_plan` finds from two histogram
    rounds), the threshold med + 1.5 (q3 - q1) in float32, then `arcee_merge`."""
    width, longest = 1, 1
    for i in range(los.shape[0]):
        width = max(width, row_lens[i] * nrows[i])
        longest = max(longest, row_lens[i])
    keys = np.empty(width, np.int64)
    counts = np.empty(2048, np.int64)
    b = np.empty(longest, np.float32)
    x = np.empty(longest, np.float32)
    acc = np.empty(longest, np.float32)
    for i in range(los.shape[0]):
        row_len = row_lens[i]
        n = row_len * nrows[i]
        if n == 0:
            continue
        for r in range(nrows[i]):
            s = los[i] + r * row_len
            bad[0] += widen_block(src[0], code, s, row_len, b)
            bad[1] += widen_block(src[1], code, s, row_len, x)
            kl = _kl_row(x, b, row_len)
            for j in range(row_len):
                keys[r * row_len + j] = np.int64(sort_key(abs(x[j] - b[j]) * kl))
        last = np.float32(n - 1)
        q1 = _key_value(_select_rank(keys, n, np.int64(np.float32(0.25) * last) + 1, counts)[0])
        med = _key_value(_select_rank(keys, n, np.int64(np.float32(0.5) * last) + 1, counts)[0])
        q3 = _key_value(_select_rank(keys, n, np.int64(np.float32(0.75) * last) + 1, counts)[0])
        threshold = med + np.float32(1.5) * (q3 - q1)
        _arcee_rows(src, code, los[i], nrows[i], row_len, threshold, out, out_code, b, x, acc, bad)
