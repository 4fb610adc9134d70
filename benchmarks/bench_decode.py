"""Where to decode quantized inputs, and what encoding costs: a micro-benchmark of the kernels.

A unit of 512 rows x 7168 columns (DeepSeek-V3's hidden size) from 3 inputs (base + 2 fine-tunes)
in block FP8 (128 x 128 blocks, float32 scales). The merge kernel is `linear`'s weighted sum, the
cheapest per element, so any decoding overhead shows at its largest. Measured, in ns per input
element, each the best of several repetitions in one thread:

- bf16:   the merge kernel on raw bf16 rows (today's fast path): the baseline;
- pass:   one extra pass decoding each input's FP8 codes x scales into float32 rows
          (`kernels.decode_fp8`, what dppa-stream does), then the merge kernel on float32 rows;
- widen:  decoding inside the kernel's widening step (a copy of the weighted sum whose widening
          reads FP8 codes and looks up each element's block scale; written here only to measure);
- and the other per-element costs of quantized merges: MXFP4 decoding (with the transposition to
  transformers' orientation) and encoding FP8 / MXFP4 with fresh scales and the loss accounting;
  the loss accounting alone as dppa-stream does it (float64 sums per row, the rows' sums added
  exactly) next to summing every element exactly (significand² per exponent bucket in int64, as
  `gram_sums` sums products; written here only to measure).

    python benchmarks/bench_decode.py            # ~1 min; writes results/bench_decode.json
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dppa_stream import kernels  # noqa: E402
from dppa_stream.kernels.core import BLOCK, f32_from_bits, narrow_block  # noqa: E402
from dppa_stream.kernels.formats import _row_loss, _row_scratch  # noqa: E402
from dppa_stream.kernels.more import _split  # noqa: E402

from benchmarks.common import save_result  # noqa: E402

ROWS, COLS, INPUTS, B = 512, 7168, 3, 128
REPEAT = 7


@njit(nogil=True, cache=True, error_model="numpy")
def weighted_sum_fp8(codes, values, scales, C, b0, b1, lo, hi, weights, out, out_code):
    """kernels.weighted_sum with its widening step replaced by FP8 decoding: element j of input k
    is values[codes[k, j]] times its block's scale (row j // C, column j % C), decoded as
    kernels.decode_fp8 does (per column block of one scale)."""
    K = codes.shape[0]
    SC = (C + b1 - 1) // b1
    acc = np.empty(BLOCK, np.float32)
    x = np.empty(BLOCK, np.float32)
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        a = acc[:m]
        xs = x[:m]
        for j in range(m):
            a[j] = np.float32(0.0)
        for k in range(K):
            q = codes[k]
            sk = scales[k]
            j = 0
            while j < m:  # row by row: a row's block scales are one slice of the scales
                r = (s + j) // C
                c0 = s + j - r * C
                n = min(m - j, C - c0)
                srow = sk[(r // b0) * SC:(r // b0 + 1) * SC]
                qs = q[s + j:s + j + n]
                t = 0
                while t < n:  # column block by column block: one scale each
                    cb = (c0 + t) // b1
                    stop = min(n, (cb + 1) * b1 - c0)
                    sc = srow[cb]
                    for u in range(t, stop):
                        xs[j + u] = values[qs[u]] * sc
                    t = stop
                j += n
            w = weights[k]
            for j in range(m):
                a[j] = a[j] + w * xs[j]
        narrow_block(acc, m, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def loss_rows(merged, q, src, rows, C, counts, high, low):
    """dppa-stream's loss accounting (kernels.formats._row_loss), row after row."""
    e2, d2, changed, gone = _row_scratch(C)
    for r in range(rows):
        _row_loss(merged[r * C:(r + 1) * C], q[r * C:(r + 1) * C], src, r * C, C, counts, high, low, e2, d2, changed,
                  gone)


@njit(nogil=True, cache=True, error_model="numpy")
def loss_exact(merged, q, src, counts, high, low):
    """The same sums, every element exact: significand² in the bucket of twice its exponent (int64,
    four interleaved copies, moved into two-word accumulators every 4096 elements)."""
    sets = counts.shape[0]
    rows = 2 * sets
    block = np.zeros((4 * rows, 512), np.int64)
    n = merged.shape[0]
    for i in range(n):
        m = merged[i]
        qq = q[i]
        b = f32_from_bits(np.uint32(src[0, i]))
        se, ee = _split(qq - m)
        sd, ed = _split(m - b)
        ch = np.int64(m != b)
        gone = np.int64((m != b) & (qq == b))
        lane = (i & 3) * rows
        for s in range(sets):
            if s == 0 or f32_from_bits(np.uint32(src[s, i])) != b:
                counts[s, 0] += 1
                counts[s, 1] += ch
                counts[s, 2] += gone
                block[lane + 2 * s, 2 * ee] += se * se
                block[lane + 2 * s + 1, 2 * ed] += sd * sd
        if (i & 4095) == 4095 or i == n - 1:
            _flush(block, high, low, rows)


@njit(nogil=True, cache=True, error_model="numpy")
def _flush(block, high, low, rows):
    """(A function of its own: inlined into the loop above, numba 0.68 miscompiled it into a crash.)"""
    for r in range(block.shape[0]):
        for e in range(block.shape[1]):
            v = block[r, e]
            if v != 0:
                high[r % rows, e] += v >> 30
                low[r % rows, e] += v & ((1 << 30) - 1)
                block[r, e] = 0


def best(fn, repeat: int = REPEAT) -> float:
    """Best thread-CPU seconds of `fn()` over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times)


def main() -> int:
    rng = np.random.default_rng(0)
    n = ROWS * COLS
    codes = rng.integers(0, 0x7E, size=(INPUTS, n), dtype=np.uint8) | (rng.integers(0, 2, size=(INPUTS, n), dtype=np.uint8) << 7)
    sr, sc = -(-ROWS // B), -(-COLS // B)
    scales = rng.uniform(1e-4, 1e-3, size=(INPUTS, sr * sc)).astype(np.float32)
    weights = np.array([0.2, 0.5, 0.3], np.float32)
    bad = np.zeros(INPUTS, np.int64)
    bf16 = (rng.standard_normal((INPUTS, n), np.float32).view(np.uint32) >> 16).astype(np.uint16)
    f32 = np.empty((INPUTS, n), np.float32)
    out16 = np.empty(n, np.uint16)

    def decode_all():
        for k in range(INPUTS):
            kernels.decode_fp8(codes[k], kernels.E4M3, scales[k], 0, 0, ROWS, ROWS, COLS, B, B, sr * sc, f32[k])

    t_bf16 = best(lambda: kernels.weighted_sum(bf16, kernels.BF16, 0, n, weights, False, np.float32(1), out16,
                                               kernels.BF16, bad))
    t_dec = best(decode_all)
    t_f32 = best(lambda: kernels.weighted_sum(f32.view(np.uint32), kernels.F32, 0, n, weights, False, np.float32(1),
                                              out16, kernels.BF16, bad))
    t_widen = best(lambda: weighted_sum_fp8(codes, kernels.FP8_VALUES[kernels.E4M3], scales, COLS, B, B, 0, n, weights, out16, kernels.BF16))
    ref = out16.copy()
    decode_all()
    kernels.weighted_sum(f32.view(np.uint32), kernels.F32, 0, n, weights, False, np.float32(1), out16, kernels.BF16, bad)
    assert np.array_equal(ref, out16), "the two ways of decoding must give the same merge"

    # MXFP4: experts of 2880 x 2880 (gpt-oss), decoded to float32 [E, C, R]
    E, R, G = 2, 2880, 90
    blocks = rng.integers(0, 256, size=E * R * G * 16, dtype=np.uint8)
    mx_scales = rng.integers(110, 130, size=E * R * G, dtype=np.uint8)
    mx = np.empty(E * R * G * 32, np.float32)
    t_mx = best(lambda: kernels.decode_mxfp4(blocks, mx_scales, E, R, G, mx))

    # encoding (with the loss accounting) of merged float32 values against 3 float32 inputs
    src = f32.view(np.uint32)
    merged = (f32[0] * np.float32(1.001)).astype(np.float32)
    sets = INPUTS
    codes_out = np.empty(n, np.uint8)
    scale_out = np.empty(sr * sc, np.uint32)

    def enc_fp8():
        counts = np.zeros((sets, 3), np.int64)
        words = np.zeros((2, 2 * sets, kernels.LOSS_BUCKETS), np.int64)
        kernels.encode_fp8(merged, src, 0, ROWS, ROWS, COLS, B, B, sr * sc, 0, 0.0, kernels.E4M3, 0, codes_out, scale_out,
                           counts, words[0], words[1])

    t_enc = best(enc_fp8)
    # the loss accounting alone, on the unit just encoded: fine-tune 1 equal to the base in a third
    # of the elements, at random
    q_vals = kernels.FP8_VALUES[kernels.E4M3][codes_out].astype(np.float32) * np.repeat(
        np.repeat(scale_out.view(np.float32).reshape(sr, sc), B, 0)[:ROWS], B, 1)[:, :COLS].reshape(-1)
    same = rng.random(n) < 1 / 3
    loss_src = np.stack([f32[0], np.where(same, f32[0], f32[1]), f32[2]]).view(np.uint32)

    def loss_state():
        return np.zeros((sets, 3), np.int64), np.zeros((2, 2 * sets, kernels.LOSS_BUCKETS), np.int64)

    t_rows = best(lambda: loss_rows(merged, q_vals, loss_src, ROWS, COLS, *(lambda c, w: (c, w[0], w[1]))(*loss_state())))
    t_exact = best(lambda: loss_exact(merged, q_vals, loss_src, *(lambda c, w: (c, w[0], w[1]))(*loss_state())))
    mx_src = np.stack([mx, mx * np.float32(1.01), mx]).view(np.uint32)
    mx_merged = (mx * np.float32(1.005)).astype(np.float32)

    def enc_mx():
        counts = np.zeros((sets, 3), np.int64)
        words = np.zeros((2, 2 * sets, kernels.LOSS_BUCKETS), np.int64)
        kernels.encode_mxfp4(mx_merged, mx_src, E, R, G, np.empty(E * R * G * 16, np.uint8), np.empty(E * R * G, np.uint8),
                             np.empty(mx.size, np.float32), counts, words[0], words[1])

    t_enc_mx = best(enc_mx)

    per = lambda t, elems: t / elems * 1e9  # noqa: E731
    elems = n * INPUTS
    result = {
        "unit": {"rows": ROWS, "cols": COLS, "inputs": INPUTS, "block": [B, B]},
        "ns_per_input_element": {
            "bf16 merge (baseline)": per(t_bf16, elems),
            "pass: decode": per(t_dec, elems),
            "pass: float32 merge": per(t_f32, elems),
            "widen: merge decoding FP8 inline": per(t_widen, elems),
        },
        "extra_ns_per_input_element": {
            "pass (decode + float32 merge - bf16 merge)": per(t_dec + t_f32 - t_bf16, elems),
            "widen (inline merge - bf16 merge)": per(t_widen - t_bf16, elems),
        },
        "ns_per_element": {
            "MXFP4 decode (to [E, C, R])": per(t_mx, mx.size),
            "FP8 block encode + loss, 3 inputs": per(t_enc, n),
            "MXFP4 encode + loss, 3 inputs": per(t_enc_mx, mx.size),
            "loss accounting, 3 sets: per-row float64, rows exact (kept)": per(t_rows, n),
            "loss accounting, 3 sets: every element exact": per(t_exact, n),
        },
    }
    for section in ("ns_per_input_element", "extra_ns_per_input_element", "ns_per_element"):
        print(section)
        for k, v in result[section].items():
            print(f"  {k:<48} {v:6.2f} ns")
    print("written", save_result("bench_decode.json", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
