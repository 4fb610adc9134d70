"""Fused per-element loops, compiled by numba: the only code that touches every element.

Each kernel reads the raw bit patterns of a unit's rows (base first, then each fine-tune), widens
them to float32, and in one sweep either accumulates statistics or computes the merged value and
narrows it straight into the output buffer. Work goes in blocks of `BLOCK` elements so scratch
arrays stay in cache.

Why loops and not array expressions: a chain of whole-array operations sweeps memory 15-60 times
per element; one loop sweeps it once (engineering notes §8: 2-3 ns against 25-80 ns per element).
`nogil=True` lets Dask threads run kernels in parallel; no `fastmath`, so LLVM never contracts
a multiply and an add into an FMA or reorders a sum: every result is the IEEE float32 value the
formula's written order gives, which the tests check against plain torch expressions. Compiled
code is cached on disk (`cache=True`), so a run pays the compile once per machine, not per worker.

Each kernel writes out its own block loop (widen, compute, narrow) around shared inline steps
(`widen_block`, `_deltas`, `more._vectors`, `narrow_block`): numba caches a kernel on disk only
when the functions it calls are globals, and one that takes its per-block step as an argument or
from a closure recompiles on every run (~0.5 s each, measured with numba 0.68).

Dtype codes: raw arrays are unsigned views of the stored bytes (uint16 for BF16/F16, uint32 for
F32, uint64 for F64), so NaN payloads and signed zeros survive until the formula touches them.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .codes import BF16, CODES, CONTAINER, F16, F32, F64, TH_ALL, TH_GT, TH_NONE, TH_VALUE  # noqa: F401

BLOCK = 4096

HIST_BINS = 1 << 15
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# --- bit casts (numba has no scalar reinterpretation; these compile to a single bitcast) -------

@intrinsic
def f32_from_bits(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def bits_of_f32(typingctx, f):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def f64_from_bits(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.uint64), codegen


@intrinsic
def bits_of_f64(typingctx, f):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.uint64(types.float64), codegen


# --- widening and narrowing --------------------------------------------------------------------
# Loops run over whole slices (`src[start:start + count]`) so LLVM sees unit-stride, non-negative
# indices and vectorises them (4x faster than indexing the big array with `start + j`).

@njit(nogil=True, cache=True, error_model="numpy")
def widen_block(src, code, start, count, dst):
    """dst[:count] = float32 of src[start:start+count]; returns how many were NaN/Inf."""
    x = src[start:start + count]
    out = dst[:count]
    bad = 0
    if code == BF16:
        for j in range(count):
            u = np.uint32(x[j])
            bad += (u & np.uint32(0x7F80)) == np.uint32(0x7F80)
            out[j] = f32_from_bits(u << np.uint32(16))
    elif code == F16:
        for j in range(count):
            u = x[j]
            bad += (u & 0x7C00) == 0x7C00
            out[j] = _F16_TO_F32[u]
    elif code == F32:
        for j in range(count):
            u = np.uint32(x[j])
            bad += (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
            out[j] = f32_from_bits(u)
    else:
        for j in range(count):
            u = np.uint64(x[j])
            bad += (u & np.uint64(0x7FF0000000000000)) == np.uint64(0x7FF0000000000000)
            out[j] = np.float32(f64_from_bits(u))
    return bad


@njit(nogil=True, cache=True, error_model="numpy")
def count_nonfinite(src, code):
    """How many NaN/Inf values a raw row holds (for the error message)."""
    return widen_block(src, code, 0, src.shape[0], np.empty(src.shape[0], np.float32))


@njit(inline="always")
def bf16_bits(f):
    """Round-to-nearest-even float32 -> bfloat16 bits (NaN -> 0x7FC0), as torch's scalar cast."""
    u = bits_of_f32(f)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint32(0x7FC0) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


@njit(inline="always")
def round_bf16(f):
    """f rounded to the nearest bfloat16 value, as a float32."""
    return f32_from_bits(bf16_bits(f) << np.uint32(16))


@njit(inline="always")
def f16_bits(f):
    """Round-to-nearest-even float32 -> float16 bits (overflow -> inf, NaN stays NaN)."""
    u = bits_of_f32(f)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):
        if a > np.uint32(0x7F800000):
            return sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x477FF000):  # >= 65520: rounds to infinity
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):  # normal float16
        a = a - np.uint32(0x38000000)
        return sign | ((a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    e = a >> np.uint32(23)
    if e < np.uint32(102):  # below half the smallest subnormal: zero
        return sign
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e
    r = m >> shift
    rem = m & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (r & np.uint32(1))):
        r += np.uint32(1)
    return sign | r


@njit(nogil=True, cache=True, error_model="numpy")
def narrow_block(src, count, dst, start, code):
    """dst[start:start+count] = src[:count] stored as `code` (round to nearest even)."""
    x = src[:count]
    out = dst[start:start + count]
    if code == BF16:
        for j in range(count):
            out[j] = bf16_bits(x[j])
    elif code == F16:
        for j in range(count):
            out[j] = f16_bits(x[j])
    elif code == F32:
        for j in range(count):
            out[j] = bits_of_f32(x[j])
    else:
        for j in range(count):
            out[j] = bits_of_f64(np.float64(x[j]))


# --- counter-based random numbers --------------------------------------------------------------

@njit(inline="always")
def keep_draw(key, index, limit):
    """DARE keep decision for flat element `index` of the stream `key`: the SplitMix64 finaliser of
    index * golden + key; kept when its top 24 bits are below `limit` (= floor(density * 2**24))."""
    z = np.uint64(index) * np.uint64(0x9E3779B97F4A7C15) + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)) < limit


@njit(nogil=True, cache=True, error_model="numpy")
def keep_mask(key, start, count, limit):
    """The keep decisions for flat elements [start, start+count) (for tests and tools)."""
    out = np.empty(count, np.bool_)
    k = np.uint64(key)
    lim = np.uint64(limit)
    for j in range(count):
        out[j] = keep_draw(k, start + j, lim)
    return out


# --- deltas --------------------------------------------------------------------------------------

@njit(inline="always")
def _deltas(src, code, row, start, count, base, dst, bf16_delta):
    """dst = model row's values minus base (rounded to bf16 when asked); returns NaN/Inf count."""
    bad = widen_block(src[row], code, start, count, dst)
    d = dst[:count]
    b = base[:count]
    if bf16_delta:
        for j in range(count):
            d[j] = round_bf16(d[j] - b[j])
    else:
        for j in range(count):
            d[j] = d[j] - b[j]
    return bad


# --- pass 1: statistics --------------------------------------------------------------------------

@njit(inline="always")
def _add_abs(x, mant):
    bits = bits_of_f32(x) & np.uint32(0x7FFFFFFF)
    e = bits >> np.uint32(23)
    sig = bits & np.uint32(0x7FFFFF)
    if e > 0:
        sig |= np.uint32(0x800000)
    mant[e] += sig


@njit(nogil=True, cache=True, error_model="numpy")
def abs_summaries(src, code, models, lo, hi, bf16_delta, want_sums, hists, mants, bad):
    """For each fine-tune models[i] (row models[i] + 1 of src), over elements [lo, hi): the
    histogram of the top 16 bits of |delta| as float32 (hists[i]) and, when `want_sums`, the exact
    per-exponent sums of their significands (mants[i]). The base is widened once per block."""
    b = np.empty(BLOCK, np.float32)
    d = np.empty(BLOCK, np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, b)
        for i in range(models.shape[0]):
            row = models[i] + 1
            bad[row] += _deltas(src, code, row, s, m, b, d, bf16_delta)
            h = hists[i]
            x = d[:m]
            for j in range(m):
                h[(bits_of_f32(x[j]) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1
            if want_sums:
                mt = mants[i]
                for j in range(m):
                    _add_abs(x[j], mt)


@njit(nogil=True, cache=True, error_model="numpy")
def abs_batch_summaries(src, code, starts, stops, models, bf16_delta, want_sums, hists, touched, bins, counts, at, words,
                        bad):
    """`abs_summaries` of many small ranges at once (the tensors of a batch, the experts of a
    fused tensor: range k is columns starts[k]:stops[k]), written sparse: summary (k, i) of fine-tune models[i] holds
    bins[at[k, i]:at[k, i + 1]] (increasing) and their counts, and Σ|delta| exactly as a
    little-endian integer of 64-bit words[k, i] in units of 2**-150 (bf16 deltas: from the bins;
    float32 ones: summed when `want_sums`, else 0). `hists` (a row of HIST_BINS per fine-tune) is
    all zero on entry and left so: only the bins an item touched are read back (`touched`: the
    same shape, scratch), where a whole-histogram scan per range cost 3x the elements of an MoE
    expert. `bad[k]` counts NaN/Inf per input. Returns the bins written."""
    b = np.empty(BLOCK, np.float32)
    d = np.empty(BLOCK, np.float32)
    mant = np.zeros((models.shape[0], 256), np.int64)  # per fine-tune: significand sums per exponent
    n = np.zeros(models.shape[0], np.int64)
    pos = 0
    for k in range(starts.shape[0]):
        lo, hi = starts[k], stops[k]
        n[:] = 0
        for s in range(lo, hi, BLOCK):
            m = min(BLOCK, hi - s)
            bad[k, 0] += widen_block(src[0], code, s, m, b)
            for i in range(models.shape[0]):
                row = models[i] + 1
                bad[k, row] += _deltas(src, code, row, s, m, b, d, bf16_delta)
                h, seen = hists[i], touched[i]
                x = d[:m]
                for j in range(m):
                    key = (bits_of_f32(x[j]) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)
                    if h[key] == 0:
                        seen[n[i]] = key
                        n[i] += 1
                    h[key] += 1
                if want_sums and not bf16_delta:
                    mt = mant[i]
                    for j in range(m):
                        _add_abs(x[j], mt)
        for i in range(models.shape[0]):
            h, mt = hists[i], mant[i]
            used = np.sort(touched[i, :n[i]])
            at[k, i] = pos
            for j in range(used.shape[0]):
                key = used[j]
                c = h[key]
                h[key] = 0
                bins[pos + j] = key
                counts[pos + j] = c
                if bf16_delta:  # each |delta| in a bin is that bin's value: its significand times the count
                    sig = (key & 0x7F) << 16
                    if key >> 7 > 0:
                        sig |= 1 << 23
                    mt[key >> 7] += c * sig
            pos += used.shape[0]
            at[k, i + 1] = pos
            _exact_words(mt, words[k, i])
    return pos


@njit(inline="always")
def _exact_words(mant, out):
    """out (64-bit words, little-endian) = Σ mant[e] * 2**max(e, 1), exactly; mant is left zero."""
    out[:] = 0
    for e in range(256):
        v = mant[e]
        if v == 0:
            continue
        mant[e] = 0
        shift = max(e, 1)
        w, o = shift // 64, shift % 64
        parts = (np.uint64(v) << np.uint64(o), np.uint64(v) >> np.uint64(64 - o) if o else np.uint64(0))
        carry = np.uint64(0)
        for t in range(w, out.shape[0]):
            add = parts[t - w] if t - w < 2 else np.uint64(0)
            old = out[t]
            new = old + add
            c1 = new < old
            new2 = new + carry
            c2 = new2 < new
            out[t] = new2
            carry = np.uint64(1) if (c1 or c2) else np.uint64(0)
            if t - w >= 1 and carry == 0:
                break


@njit(inline="always")
def count_in_bins(bits, bins, counts):
    """counts[i, low 16 bits] += 1 where the top 16 bits of `bits` (uint32) are bins[i]. One bin is
    the usual case (a threshold's boundary bin) and gets a single compare: the loop over bins made
    it 2x slower."""
    top = bits >> np.uint32(16)
    if bins.shape[0] == 1:
        if top == np.uint32(bins[0]):
            counts[0, bits & np.uint32(0xFFFF)] += 1
    else:
        for i in range(bins.shape[0]):
            if np.int64(top) == bins[i]:
                counts[i, bits & np.uint32(0xFFFF)] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def bin_counts(src, code, model, lo, hi, bf16_delta, bins, counts, bad):
    """counts[i, v] = number of |delta| whose float32 bits are (bins[i] << 16) | v."""
    b = np.empty(BLOCK, np.float32)
    d = np.empty(BLOCK, np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, b)
        bad[model + 1] += _deltas(src, code, model + 1, s, m, b, d, bf16_delta)
        x = d[:m]
        for j in range(m):
            count_in_bins(bits_of_f32(x[j]) & np.uint32(0x7FFFFFFF), bins, counts)


@njit(nogil=True, cache=True, error_model="numpy")
def exact_ranks(src, code, model, lo, hi, bf16_delta, ranks, out, keys, counts, bad):
    """The keys of |delta| over [lo, hi) (float32 bits, as `abs_summaries` bins them) at each
    1-based ascending rank ranks[i]: out[i] = (key, keys below it, keys equal to it). What the
    two histogram rounds of `methods/ranks.py` find, for a tensor held whole in one unit: a
    32k-bin histogram costs more than a small tensor's elements. A radix selection (`_select`).
    `keys` (int64, at least 2 (hi - lo)) and `counts` (int64, 2048; contents ignored) are the
    caller's scratch: allocating them here, in the worker threads, grew the heap by ~90 MiB over
    a merge of 45k small tensors."""
    counts[:] = 0
    _select(src, code, model, lo, hi, bf16_delta, ranks, out, keys, counts, bad, np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32))


@njit(inline="always")
def _select(src, code, model, lo, hi, bf16_delta, ranks, out, keys, counts, bad, b, d):
    """`exact_ranks` with `counts` all zero on entry, and left so. The keys' digits are 11, 11
    and 10 bits: the first digit is counted while the keys are made (keys[:n]); for each rank,
    the keys sharing the digits found so far are copied behind them (keys[n:], `_gather`) and
    only those are counted at the next digit, so a rank costs about one pass more."""
    n = hi - lo
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, b)
        bad[model + 1] += _deltas(src, code, model + 1, s, m, b, d, bf16_delta)
        kk = keys[s - lo:s - lo + m]
        for j in range(m):
            k = np.int64(bits_of_f32(d[j]) & np.uint32(0x7FFFFFFF))
            kk[j] = k
            counts[k >> 21] += 1
    for i in range(ranks.shape[0]):  # every rank's first digit, before the counts are reused
        digit, below, r = _digit_of(counts, ranks[i], np.int64(0))
        out[i, 0], out[i, 1], out[i, 2] = digit, below, r
    counts[:1024] = 0  # keys are below 2**31: 10 bits of the first digit in use
    for i in range(ranks.shape[0]):
        prefix, below, r = out[i, 0] << 21, out[i, 1], out[i, 2]
        found = keys[n:2 * n]
        cand = _gather(keys[:n], n, found, prefix, np.int64(0x7FE00000))
        last = np.int64(0)
        for level in range(2):
            shift = 10 if level == 0 else 0
            digits = np.int64(2047) if level == 0 else np.int64(1023)
            for j in range(cand):
                counts[(found[j] >> shift) & digits] += 1
            digit, below, r = _digit_of(counts, r, below)
            last = counts[digit]
            for j in range(cand):
                counts[(found[j] >> shift) & digits] = 0
            prefix |= np.int64(digit) << shift
            if level == 0:
                cand = _gather(found, cand, found, prefix, np.int64(0x7FFFFC00))
        out[i, 0] = prefix
        out[i, 1] = below
        out[i, 2] = last


@njit(inline="always")
def _digit_of(counts, r, below):
    """The digit whose count holds the r-th key (1-based, r no more than the counts' sum), with r
    made relative to it and `below` advanced by the keys under it: (digit, below, r). Eight counts
    at a time first (their sum is independent adds), then one by one: stepping count by count
    through up to 2,048 digits was a chain of dependent subtractions as long as a small tensor."""
    digit = 0
    while True:
        eight = counts[digit] + counts[digit + 1] + counts[digit + 2] + counts[digit + 3] + \
            counts[digit + 4] + counts[digit + 5] + counts[digit + 6] + counts[digit + 7]
        if r <= eight:
            break
        r -= eight
        below += eight
        digit += 8
    while r > counts[digit]:
        r -= counts[digit]
        below += counts[digit]
        digit += 1
    return digit, below, r


@njit(inline="always")
def _gather(keys, n, dst, prefix, mask):
    """Copies the keys[:n] whose bits under `mask` equal `prefix` to dst (which may be keys
    itself) in order; returns how many. Every key is stored and the count advanced by the test,
    so no branch mispredicts on keys that match at random."""
    m = 0
    for j in range(n):
        k = keys[j]
        dst[m] = k
        m += (k & mask) == prefix
    return m


@njit(nogil=True, cache=True, error_model="numpy")
def exact_ranks_segments(src, code, starts, bf16_delta, ranks, active, out, keys, counts, bad):
    """`exact_ranks` of a batch of whole tensors (`units.BatchRows`): tensor k is columns
    starts[k]:starts[k+1] of src; for each model m with active[k, m], the ranks ranks[k, m] into
    out[k, m] (one call per batch instead of one per tensor and model)."""
    counts[:] = 0
    b, d = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for k in range(starts.shape[0] - 1):
        for m in range(ranks.shape[1]):
            if active[k, m]:
                _select(src, code, m, starts[k], starts[k + 1], bf16_delta, ranks[k, m], out[k, m], keys, counts, bad,
                        b, d)


@njit(nogil=True, cache=True, error_model="numpy")
def dare_sums(src, code, model, lo, hi, flat0, key, limit, full, kept, bad):
    """Exact per-exponent significand sums of |delta| and of |delta * keep-mask| (DARE's L1
    rescale); flat0 is the tensor-wide index of element lo."""
    _dare_sums(src, code, model, lo, hi, flat0, key, limit, full, kept, bad, np.empty(BLOCK, np.float32),
               np.empty(BLOCK, np.float32))


@njit(inline="always")
def _dare_sums(src, code, model, lo, hi, flat0, key, limit, full, kept, bad, b, d):
    """`dare_sums` with its scratch given (see `delta._gta`)."""
    k = np.uint64(key)
    lim = np.uint64(limit)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, b)
        bad[model + 1] += _deltas(src, code, model + 1, s, m, b, d, False)
        x = d[:m]
        first = flat0 + s - lo
        for j in range(m):
            _add_abs(x[j], full)
            _add_abs(x[j] * (np.float32(1.0) if keep_draw(k, first + j, lim) else np.float32(0.0)), kept)


@njit(nogil=True, cache=True, error_model="numpy")
def dare_sums_segments(src, code, model, starts, active, keys, limits, full, kept, bad):
    """`dare_sums` of one model over a batch of whole tensors (columns starts[k]:starts[k+1]), for
    the tensors with active[k], into full[k] and kept[k]."""
    b, d = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for k in range(starts.shape[0] - 1):
        if active[k]:
            _dare_sums(src, code, model, starts[k], starts[k + 1], 0, keys[k], limits[k], full[k], kept[k], bad, b, d)


@njit(nogil=True, cache=True, error_model="numpy")
def exact_sums(mants, out):
    """`summaries.exact_sum` of each row of `mants` ([rows, 256] per-exponent sums of float32
    significands, each below 2**63) into out[row]: the value Σ_e mants[e] · 2**(max(e, 1) - 150)
    exactly rounded to float64 (to nearest, ties to even), from an exact sum in 32-bit limbs.
    A batch of small tensors needs thousands; Python integers cost ~30 µs each."""
    limbs = np.zeros(12, np.int64)  # 384 bits: 255 + 63 + a carry
    mask32 = np.int64(0xFFFFFFFF)
    for r in range(mants.shape[0]):
        limbs[:] = 0
        for e in range(256):
            v = mants[r, e]
            if v == 0:
                continue
            sh = max(e, 1)
            w, b = sh // 32, sh % 32
            lo = (v & mask32) << b  # below 2**63
            hi = (v >> 32) << b  # below 2**62
            limbs[w] += lo & mask32
            limbs[w + 1] += (lo >> 32) + (hi & mask32)
            limbs[w + 2] += hi >> 32
        carry = np.int64(0)
        top = -1
        for i in range(12):
            t = limbs[i] + carry
            limbs[i] = t & mask32
            carry = t >> 32
            if limbs[i]:
                top = i
        if top < 0:
            out[r] = 0.0
            continue
        L = 0
        while (limbs[top] >> L) != 0:
            L += 1
        nbits = 32 * top + L
        sticky = False
        if nbits <= 64:
            u = np.uint64(limbs[0]) | (np.uint64(limbs[1]) << np.uint64(32))
            if nbits <= 53:
                out[r] = math.ldexp(np.float64(u), -150)
                continue
            shift = np.uint64(nbits - 53)
        else:
            u = (np.uint64(limbs[top]) << np.uint64(64 - L)) | (np.uint64(limbs[top - 1]) << np.uint64(32 - L)) | \
                (np.uint64(limbs[top - 2]) >> np.uint64(L))
            sticky = (limbs[top - 2] & ((np.int64(1) << L) - 1)) != 0
            for i in range(top - 2):
                sticky = sticky or limbs[i] != 0
            shift = np.uint64(11)
        q = u >> shift
        rem = u & ((np.uint64(1) << shift) - np.uint64(1))
        half = np.uint64(1) << (shift - np.uint64(1))
        if rem > half or (rem == half and (sticky or (q & np.uint64(1)) != 0)):
            q += np.uint64(1)
        out[r] = math.ldexp(np.float64(q), nbits - 53 - 150)


# --- pass 2: merges ------------------------------------------------------------------------------

@njit(inline="always")
def tie_trim(x, value, rel, span, signed):
    """The threshold rule of TIES and DPA bands for one element: x is kept when |x| > value (NaN
    too: it is not <= value), or |x| == value and its running tie index, counted from the window's
    first, `rel`, is in [0, span) (ties kept lowest flat index first: `Level` first and stop);
    otherwise it becomes x * 0 when `signed` (mergekit's `tensor * mask`: -0.0 for a negative x),
    else +0.0. Returns (value, next rel). Ties are a rare, well-predicted branch and the window one
    unsigned compare; the common case is a select: as a branch it mispredicted on every other
    element at density 0.5 (3x slower), and so did a kept flag selected on afterwards."""
    a = abs(x)
    dropped = x * np.float32(0.0) if signed else np.float32(0.0)
    if a == value:
        return (x if np.uint64(rel) < np.uint64(span) else dropped), rel + 1
    return (dropped if a <= value else x), rel


@njit(nogil=True, cache=True, error_model="numpy")
def weighted_sum(src, code, lo, hi, weights, normalize, total_weight, out, out_code, bad):
    """`linear`: sum_i w_i x_i (accumulated from 0.0 in model order, as torch's sum over models
    does for up to 4 models), divided by the weights' sum when normalising."""
    _weighted_sum(src, code, lo, hi, weights, normalize, total_weight, out, out_code, bad, np.empty(BLOCK, np.float32),
                  np.empty(BLOCK, np.float32))


@njit(inline="always")
def _weighted_sum(src, code, lo, hi, weights, normalize, total_weight, out, out_code, bad, x, acc):
    """`weighted_sum` with its scratch given (see `delta._gta`)."""
    K = src.shape[0]
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        a = acc[:m]
        xs = x[:m]
        for j in range(m):
            a[j] = np.float32(0.0)
        for k in range(K):
            bad[k] += widen_block(src[k], code, s, m, x)
            w = weights[k]
            for j in range(m):
                a[j] = a[j] + w * xs[j]
        if normalize:
            for j in range(m):
                a[j] = a[j] / total_weight
        narrow_block(acc, m, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def weighted_sum_segments(src, code, starts, weights, normalize, total_weight, out, out_code, bad):
    """`weighted_sum` of a batch of whole tensors, tensor k (columns starts[k]:starts[k+1]) with
    weights[k], normalize[k] and total_weight[k]."""
    x, acc = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for k in range(starts.shape[0] - 1):
        _weighted_sum(src, code, starts[k], starts[k + 1], weights[k], normalize[k], total_weight[k], out, out_code,
                      bad, x, acc)
