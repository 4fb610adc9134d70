"""Decoding and encoding of quantized storage formats, compiled by numba: FP8 codes with scales
(block, per-channel, per-tensor) and MXFP4 (E2M1 codes in groups of 32 with E8M0 scales).

Reading turns a work unit's stored codes into float32 values once, in a pass of their own (see
benchmarks/README.md, "Decoding: an extra pass or the widening step"), so every method, statistic
and kernel only ever sees real values. Writing turns merged float32 values back into codes and
fresh scales and, row by row as it goes, accounts for what the requantization lost (`_row_loss`).

Tensors are viewed as (L, R, C): L = the leading dimensions (experts) flattened, R rows, C columns.
An FP8 scale covers a block of b0 rows x b1 columns of one leading slice; its index is
`l * lead_stride + (r // b0) * SC + c // b1` (SC = ceil(C / b1); lead_stride = 0 when one scale
serves every slice, as a per-tensor scale does). MXFP4 tensors are stored as [E, R, G, 16] bytes
(two codes per byte, low nibble first) and [E, R, G] exponents, and read, as transformers does, as
the logical [E, 32 G, R]: the stored row r is the logical column r.

Same conventions as `core`: no fastmath (every float32 operation is the IEEE result of the written
order), nogil, cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .core import bf16_bits, bits_of_f32, bits_of_f64, f16_bits, f32_from_bits

E4M3, E5M2 = 0, 1  # FP8 code formats
FP8_CODES = {"F8_E4M3": E4M3, "F8_E5M2": E5M2}
FP8_MAX_E4M3, FP8_MAX_E5M2 = 448.0, 57344.0  # largest finite values
SCALE_CODES = {"F32": 0, "BF16": 1, "F16": 2}  # dtypes an FP8 scale may be stored in
MX_GROUP = 32  # MXFP4 elements per shared exponent
E2M1_MAX_EXP = 2  # exponent of E2M1's largest value (6 = 1.5 * 2**2)


def _fp8_values(exp_bits: int, man_bits: int, finite_only: bool) -> np.ndarray:
    """float32 value of every 8-bit code (sign, exponent, mantissa; bias 2**(exp_bits-1) - 1).
    `finite_only` (e4m3fn): no infinities, only S.1111.111 is NaN; otherwise (e5m2) IEEE-like."""
    codes = np.arange(256)
    bias = (1 << (exp_bits - 1)) - 1
    e = (codes >> man_bits) & ((1 << exp_bits) - 1)
    m = (codes & ((1 << man_bits) - 1)).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** (1 - bias - man_bits), (1 + m / (1 << man_bits)) * 2.0 ** (e - bias))
    top = (1 << exp_bits) - 1
    if finite_only:
        mag = np.where((e == top) & (m == (1 << man_bits) - 1), np.nan, mag)
    else:
        mag = np.where(e == top, np.where(m == 0, np.inf, np.nan), mag)
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


FP8_VALUES = np.stack([_fp8_values(4, 3, True), _fp8_values(5, 2, False)])  # [format, code]
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


# --- scalar conversions ------------------------------------------------------------------------

@njit(inline="always")
def _rint(x):
    """x rounded to the nearest integer, ties to even, for 0 <= x < 2**22 (float32)."""
    return (x + np.float32(8388608.0)) - np.float32(8388608.0)


@njit(inline="always")
def fp8_code(x, fmt):
    """The FP8 code of float32 x: round to nearest even, saturating at the largest finite value
    (also for infinities); NaN gives a NaN code. Branch-free (selects), so loops vectorise."""
    u = bits_of_f32(x)
    sign = (u >> np.uint32(24)) & np.uint32(0x80)
    a = u & np.uint32(0x7FFFFFFF)
    fa = f32_from_bits(a)
    if fmt == E4M3:  # normal: drop 20 mantissa bits (RNE), rebias 127 -> 7; below 2**-6 steps of 2**-9
        c = ((a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)) - np.uint32(120 << 3)
        c = np.uint32(_rint(fa * np.float32(512.0))) if a < np.uint32(0x3C800000) else c
        c = np.uint32(0x7E) if a >= np.uint32(0x43E00000) else c  # >= 448
    else:  # e5m2: drop 21 bits, rebias 127 -> 15; below 2**-14 steps of 2**-16
        c = ((a + np.uint32(0xFFFFF) + ((a >> np.uint32(21)) & np.uint32(1))) >> np.uint32(21)) - np.uint32(112 << 2)
        c = np.uint32(_rint(fa * np.float32(65536.0))) if a < np.uint32(0x38800000) else c
        c = np.uint32(0x7B) if a >= np.uint32(0x47600000) else c  # >= 57344
    c = np.uint32(0x7F) if a > np.uint32(0x7F800000) else c
    return np.uint8(c | sign)


@njit(inline="always")
def e2m1_code(y):
    """The E2M1 code of float32 y: round to nearest even on {0, 0.5, 1, 1.5, 2, 3, 4, 6},
    saturating at 6 (NaN gives +0: a NaN group is marked by its scale instead). Between
    neighbours k and k + 1 the midpoint goes up only when k + 1 is even; the code is how many
    midpoints y passes (compares, no branches)."""
    a = abs(y)
    c = ((a > np.float32(0.25)) + (a >= np.float32(0.75)) + (a > np.float32(1.25)) + (a >= np.float32(1.75))
         + (a > np.float32(2.5)) + (a >= np.float32(3.5)) + (a > np.float32(5.0)))
    return np.uint8(c) | np.uint8((bits_of_f32(y) >> np.uint32(31)) << np.uint32(3))


@njit(inline="always")
def e8m0_value(s):
    """2**(s - 127) as float32 (s = 0 is the subnormal 2**-127; 255, NaN, is refused on input)."""
    if s == 0:
        return f32_from_bits(np.uint32(0x00400000))
    return f32_from_bits(np.uint32(s) << np.uint32(23))


@njit(inline="always")
def _scale_bits(s, scale_code):
    """float32 s rounded to the scale dtype, as its bits (in a uint32)."""
    if scale_code == 0:
        return bits_of_f32(s)
    if scale_code == 1:
        return bf16_bits(s)
    return f16_bits(s)


@njit(inline="always")
def _scale_value(bits, scale_code):
    if scale_code == 0:
        return f32_from_bits(bits)
    if scale_code == 1:
        return f32_from_bits(bits << np.uint32(16))
    return np.float32(_f16_value(bits))


@njit(inline="always")
def _f16_value(bits):
    e = (bits >> np.uint32(10)) & np.uint32(0x1F)
    m = np.float64(bits & np.uint32(0x3FF))
    if e == 0:
        v = m * 2.0 ** -24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1.0 + m / 1024.0) * 2.0 ** (np.float64(e) - 15.0)
    return -v if bits & np.uint32(0x8000) else v


@njit(inline="always")
def _block_scale(amax, fmt, scale_code):
    """The bits of a fresh FP8 scale for a block whose largest finite |value| is amax: amax / FP8
    max rounded to the scale dtype; 1 for a zero block; the dtype's smallest positive value when
    the quotient would round to 0."""
    if amax == 0:
        return _scale_bits(np.float32(1.0), scale_code)
    fmax = np.float32(FP8_MAX_E4M3) if fmt == E4M3 else np.float32(FP8_MAX_E5M2)
    bits = _scale_bits(amax / fmax, scale_code)
    if _scale_value(bits, scale_code) == 0:
        bits = _scale_bits(_smallest_scale(scale_code), scale_code)
    return bits


@njit(nogil=True, cache=True)
def fp8_scale(amax, fmt, scale_code):
    """`_block_scale` for Python callers (a per-tensor scale): (bits, float32 value)."""
    bits = _block_scale(np.float32(amax), fmt, scale_code)
    return bits, _scale_value(bits, scale_code)


@njit(inline="always")
def _smallest_scale(scale_code):
    """The smallest positive value of the scale dtype (a block whose scale would round to zero)."""
    if scale_code == 0:
        return f32_from_bits(np.uint32(1))
    if scale_code == 1:
        return f32_from_bits(np.uint32(1) << np.uint32(16))
    return np.float32(2.0 ** -24)


# --- reading -----------------------------------------------------------------------------------

@njit(nogil=True, cache=True, error_model="numpy")
def decode_fp8(codes, fmt, scales, first_scale, g0, nrows, R, C, b0, b1, lead_stride, dst):
    """dst[j*C + c] = value(codes[j*C + c]) * scale, for rows g0 .. g0+nrows-1 of the (L*R, C)
    view; `scales` holds the float32 scales from index `first_scale` on. (A 256-entry table:
    faster here than rebuilding the value from the code's bits, 0.6 against 1.7 ns.)"""
    SC = (C + b1 - 1) // b1
    values = FP8_VALUES[fmt]
    for j in range(nrows):
        g = g0 + j
        lead = g // R
        srow = lead * lead_stride + ((g - lead * R) // b0) * SC - first_scale
        x = codes[j * C:(j + 1) * C]
        out = dst[j * C:(j + 1) * C]
        for cb in range(SC):
            s = scales[srow + cb]
            for c in range(cb * b1, min(C, (cb + 1) * b1)):
                out[c] = values[x[c]] * s


TILE = 16  # MXFP4 stored rows decoded together: each logical row then gets 16 contiguous values


@njit(nogil=True, cache=True, error_model="numpy")
def decode_mxfp4(blocks, scales, experts, R, G, dst):
    """Logical [experts, 32 G, R] float32 values into dst from stored [experts, R, G, 16] bytes and
    [experts, R, G] exponents (whole experts)."""
    C = G * MX_GROUP
    s = np.empty(TILE, np.float32)
    for e in range(experts):
        for r0 in range(0, R, TILE):
            n = min(TILE, R - r0)
            for g in range(G):
                for t in range(n):
                    s[t] = e8m0_value(scales[(e * R + r0 + t) * G + g])
                for k in range(16):
                    c = g * MX_GROUP + 2 * k
                    lo = dst[(e * C + c) * R + r0:(e * C + c) * R + r0 + n]
                    hi = dst[(e * C + c + 1) * R + r0:(e * C + c + 1) * R + r0 + n]
                    for t in range(n):
                        byte = blocks[((e * R + r0 + t) * G + g) * 16 + k]
                        lo[t] = E2M1_VALUES[byte & np.uint8(15)] * s[t]
                        hi[t] = E2M1_VALUES[byte >> np.uint8(4)] * s[t]


# --- the requantization loss -------------------------------------------------------------------
# Per element: e = requantized - merged and d = merged - reference (float32 differences), squared in
# float64 (exact). Per row of the logical tensor (its last axis), for set 0 (every element) and set
# k (the elements fine-tune k, src row k, changed: its value differs from the reference's): Σ e² and
# Σ d² in float64 as eight partial sums over the columns c = 0..7 (mod 8), each in column order,
# added as ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)). The rows' sums are then added exactly
# (float64 significands per exponent, in two int64 words). A row is never split across work units,
# so the totals do not depend on the unit size. Counted exactly per set: elements, changed (d != 0),
# vanished (changed, but requantized == reference). (Exact sums per element, as `gram_sums` keeps
# them, cost twice as much: 5.5 ns more per element with two fine-tunes, benchmarks/README.md.)

LOSS_BUCKETS = 2048  # float64 exponent fields
LOSS_LANES = 8


@njit(inline="always")
def _lanes_total(acc):
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@njit(inline="always")
def _add_exact(v, row, high, low):
    """Add the float64 v >= 0 exactly to accumulator row `row` (significand in the bucket of its
    exponent field; a bucket holds 2**33 additions)."""
    u = bits_of_f64(v)
    f = np.int64((u >> np.uint64(52)) & np.uint64(0x7FF))
    sig = np.int64(u & np.uint64(0xFFFFFFFFFFFFF))
    if f > 0:
        sig += np.int64(1) << 52
    else:
        f = np.int64(1)
    high[row, f] += sig >> 30
    low[row, f] += sig & ((1 << 30) - 1)


@njit(inline="always")
def _row_loss(m, q, src, at, n, counts, high, low, e2, d2, changed, gone):
    """Account one row: merged m[:n] and requantized q[:n] at elements at .. at+n-1 of the unit,
    against the reference (src row 0) and each fine-tune (src rows 1..). Set k's sums multiply by
    its 0/1 mask rather than select (a select compiled to a mispredicted branch: 2x slower); so
    with --allow-nonfinite a NaN anywhere in a row makes every set's sums NaN."""
    ref = src[0, at:at + n]
    ae = np.zeros(LOSS_LANES)
    ad = np.zeros(LOSS_LANES)
    nch = 0
    ngone = 0
    for c in range(n):
        b = f32_from_bits(np.uint32(ref[c]))
        e = np.float64(q[c] - m[c])
        d = np.float64(m[c] - b)
        e *= e
        d *= d
        e2[c] = e
        d2[c] = d
        ch = d != 0.0
        gn = ch & (q[c] == b)
        changed[c] = ch
        gone[c] = gn
        nch += np.int64(ch)
        ngone += np.int64(gn)
        ae[c % LOSS_LANES] += e
        ad[c % LOSS_LANES] += d
    counts[0, 0] += n
    counts[0, 1] += nch
    counts[0, 2] += ngone
    _add_exact(_lanes_total(ae), 0, high, low)
    _add_exact(_lanes_total(ad), 1, high, low)
    full = n - n % LOSS_LANES
    for s in range(1, counts.shape[0]):
        x = src[s, at:at + n]
        ae[:] = 0.0
        ad[:] = 0.0
        nsel = 0
        nch = 0
        ngone = 0
        for c0 in range(0, full, LOSS_LANES):
            for lane in range(LOSS_LANES):
                c = c0 + lane
                mk = f32_from_bits(np.uint32(x[c])) != f32_from_bits(np.uint32(ref[c]))
                f = np.float64(mk)
                ae[lane] += e2[c] * f
                ad[lane] += d2[c] * f
                nsel += np.int64(mk)
                nch += np.int64(mk & changed[c])
                ngone += np.int64(mk & gone[c])
        for c in range(full, n):
            mk = f32_from_bits(np.uint32(x[c])) != f32_from_bits(np.uint32(ref[c]))
            f = np.float64(mk)
            ae[c % LOSS_LANES] += e2[c] * f
            ad[c % LOSS_LANES] += d2[c] * f
            nsel += np.int64(mk)
            nch += np.int64(mk & changed[c])
            ngone += np.int64(mk & gone[c])
        counts[s, 0] += nsel
        counts[s, 1] += nch
        counts[s, 2] += ngone
        _add_exact(_lanes_total(ae), 2 * s, high, low)
        _add_exact(_lanes_total(ad), 2 * s + 1, high, low)


@njit(inline="always")
def _row_scratch(n):
    return np.empty(n), np.empty(n), np.empty(n, np.bool_), np.empty(n, np.bool_)


# --- writing -----------------------------------------------------------------------------------

@njit(nogil=True, cache=True, error_model="numpy")
def encode_fp8(merged, src, g0, nrows, R, C, b0, b1, lead_stride, first_scale, fixed_scale, fmt, scale_code,
               codes, scale_out, counts, high, low):
    """FP8 codes (round to nearest even, saturating) of merged float32 rows g0 .. g0+nrows-1 of
    the (L*R, C) view, with a fresh scale per block: amax(|finite values|) / FP8 max, rounded to
    the scale dtype (a zero block gets scale 1; one that would round to 0 the dtype's smallest
    value). `fixed_scale` > 0 is a per-tensor scale already chosen. Whole blocks only: the rows
    start and end on block boundaries. Scales land in scale_out[index - first_scale] (bits).
    The loss of each element against the reference (src row 0, float32 bits) is accounted."""
    SC = (C + b1 - 1) // b1
    values = FP8_VALUES[fmt]
    e2, d2, changed, gone = _row_scratch(C)
    s_of = np.empty(SC, np.float32)
    q = np.empty(C, np.float32)
    j = 0
    while j < nrows:
        g = g0 + j
        lead = g // R
        r = g - lead * R
        rows = min(b0 - r % b0, nrows - j, R - r)  # this band of blocks
        base = j * C
        for cb in range(SC):
            c0 = cb * b1
            c1 = min(C, c0 + b1)
            if fixed_scale > 0:
                s_of[cb] = np.float32(fixed_scale)
                continue
            top = np.uint32(0)  # amax as bits: integer maxima vectorise, float ones do not without fastmath
            for t in range(rows):
                x = merged[base + t * C + c0:base + t * C + c1]
                for c in range(c1 - c0):
                    a = bits_of_f32(x[c]) & np.uint32(0x7FFFFFFF)
                    top = max(top, a if a < np.uint32(0x7F800000) else np.uint32(0))  # NaN and infinities ignored
            bits = _block_scale(f32_from_bits(top), fmt, scale_code)
            scale_out[lead * lead_stride + (r // b0) * SC + cb - first_scale] = bits
            s_of[cb] = _scale_value(bits, scale_code)
        for t in range(rows):
            at = base + t * C
            x = merged[at:at + C]
            out = codes[at:at + C]
            for cb in range(SC):
                s = s_of[cb]
                for c in range(cb * b1, min(C, (cb + 1) * b1)):
                    code = fp8_code(x[c] / s, fmt)
                    out[c] = code
                    q[c] = values[code] * s
            _row_loss(x, q, src, at, C, counts, high, low, e2, d2, changed, gone)
        j += rows


@njit(inline="always")
def _floor_log2(a):
    return math.frexp(np.float64(a))[1] - 1


@njit(inline="always")
def _group_error(v, inv, scale):
    """Σ (decoded - v)² (float64, in element order) of a group encoded with 2**X (inv = 2**-X,
    scale = 2**X)."""
    err = 0.0
    for t in range(MX_GROUP):
        d = np.float64(E2M1_VALUES[e2m1_code(v[t] * inv)] * scale) - np.float64(v[t])
        err += d * d
    return err


@njit(nogil=True, cache=True, error_model="numpy")
def encode_mxfp4(merged, src, experts, R, G, blocks, scales, requant, counts, high, low):
    """MXFP4 bytes [experts, R, G, 16] and exponents [experts, R, G] of merged logical
    [experts, 32 G, R] float32 values. Each group's shared exponent is the OCP MX v1.0 choice
    X = floor(log2 amax) - 2, or X + 1 when that encodes the group with a smaller squared error:
    no more error than OCP's rule by construction (X clips values in (6, 8) * 2**X to 6 * 2**X;
    when nothing clips, X's grid is at least as close for every element, and X is kept). Codes are
    E2M1, round to nearest even, saturating. A group with a NaN gets the NaN exponent 255. The
    requantized values land in `requant` (the layout of `merged`), and the loss of each element
    against the reference (src row 0) is accounted, logical row by logical row."""
    C = G * MX_GROUP
    v = np.empty((TILE, MX_GROUP), np.float32)
    codes = np.empty((TILE, MX_GROUP), np.uint8)
    scale = np.empty(TILE, np.float32)
    for e in range(experts):
        for r0 in range(0, R, TILE):
            n = min(TILE, R - r0)
            for g in range(G):
                for t in range(MX_GROUP):  # stored rows r0.. are contiguous in each logical row
                    row = merged[(e * C + g * MX_GROUP + t) * R + r0:(e * C + g * MX_GROUP + t) * R + r0 + n]
                    for k in range(n):
                        v[k, t] = row[k]
                for k in range(n):
                    at = (e * R + r0 + k) * G + g
                    scale[k] = _encode_group(v[k], codes[k], scales, at)
                    for b in range(16):
                        blocks[at * 16 + b] = codes[k, 2 * b] | (codes[k, 2 * b + 1] << np.uint8(4))
                for t in range(MX_GROUP):
                    out = requant[(e * C + g * MX_GROUP + t) * R + r0:(e * C + g * MX_GROUP + t) * R + r0 + n]
                    for k in range(n):
                        out[k] = E2M1_VALUES[codes[k, t]] * scale[k]
    e2, d2, changed, gone = _row_scratch(R)
    for row in range(experts * C):
        at = row * R
        _row_loss(merged[at:at + R], requant[at:at + R], src, at, R, counts, high, low, e2, d2, changed, gone)


@njit(inline="always")
def _encode_group(v, codes, scales, at):
    """Encode one group of 32 values: its exponent into scales[at], its codes into `codes`;
    returns the group's scale 2**X (NaN for a group holding a NaN)."""
    amax = np.float32(0.0)
    nan = False
    for t in range(MX_GROUP):
        a = abs(v[t])
        nan = nan or a != a
        amax = max(amax, a if a <= np.float32(3.4028235e38) else np.float32(0.0))
    if nan:
        scales[at] = 255
        codes[:] = 0
        return np.float32(np.nan)
    best = -127 if amax == 0 else max(-127, min(127, _floor_log2(amax) - E2M1_MAX_EXP))
    if amax * e8m0_value(127 - best) > np.float32(6.0) and best < 127:  # X clips: is X + 1 closer?
        if _group_error(v, e8m0_value(126 - best), e8m0_value(best + 128)) < \
                _group_error(v, e8m0_value(127 - best), e8m0_value(best + 127)):
            best += 1
    scales[at] = best + 127
    inv = e8m0_value(127 - best)
    for t in range(MX_GROUP):
        codes[t] = e2m1_code(v[t] * inv)
    return e8m0_value(best + 127)


@njit(nogil=True, cache=True, error_model="numpy")
def max_abs(values):
    """The largest finite |value| (0 when there is none)."""
    amax = np.float32(0.0)
    for i in range(values.shape[0]):
        a = abs(values[i])
        if a > amax and a != np.inf:
            amax = a
    return amax


__all__ = ["E4M3", "E5M2", "FP8_CODES", "SCALE_CODES", "MX_GROUP", "FP8_VALUES", "E2M1_VALUES",
           "fp8_code", "e2m1_code", "e8m0_value", "decode_fp8", "decode_mxfp4", "encode_fp8",
           "encode_mxfp4", "fp8_scale", "max_abs", "LOSS_BUCKETS"]
