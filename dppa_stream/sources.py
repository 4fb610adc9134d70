"""Reading one input's part of a work unit: the flat element range [lo, hi) (whole rows) of a
logical tensor, as its stored bit patterns or as float32 values.

`UnitRows` (units.py) asks. When every input of a tensor is stored plain in one float dtype, rows
are read raw with one positional read each: the fast path, which never decodes. Otherwise (an
input is quantized, or the inputs mix bf16, fp16 and fp32) every input is decoded to float32, so
methods, statistics and kernels see one dtype of real values.

Each kind of catalogue entry has a `Source`: how to decode a range and what it needs of unit
boundaries. A new kind of input (a LoRA-adapted weight W + s·B·A, an embedding whose output row r
comes from input row p(r)) is one catalogue entry class and one Source class chosen in `source`;
units, methods and writers do not change.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .checkpoint import TensorEntry, read_range
from .checkpoint.quant import Quantized
from .errors import InputError, short

CHUNK = 1 << 20  # stored bytes read and decoded at a time: they are still in cache when decoded


def _scratch(slot: str, nbytes: int) -> np.ndarray:
    from .units import scratch

    return scratch(slot, nbytes)


class PlainSource:
    """A tensor stored plain: raw bit patterns, or float32 values widened from them."""

    align = 1

    def __init__(self, entry: TensorEntry):
        self.entry = entry

    def read_raw(self, lo: int, hi: int, buf: np.ndarray) -> None:
        read_range(self.entry, lo, hi, buf)

    def decode(self, lo: int, hi: int, dst: np.ndarray) -> None:
        e = self.entry
        code, container = kernels.CODES[e.dtype], kernels.CONTAINER[e.dtype]
        row = max(1, e.row_numel) if self.whole_rows else 1
        step = max(1, CHUNK // (e.itemsize * row)) * row
        raw = _scratch("raw", min(step, hi - lo) * e.itemsize)
        for a in range(lo, hi, step):
            n = min(step, hi - a)
            self.read_raw(a, a + n, raw[:n * e.itemsize])
            kernels.widen_block(raw[:n * e.itemsize].view(container), code, 0, n, dst[a - lo:a - lo + n])

    whole_rows = False  # `read_raw` takes any flat range


class RemapSource(PlainSource):
    """A vocabulary tensor on the output's tokens (tokenizer.py): each output row gathered from an
    input row or a computed row by `entry.remap`, which reads whole rows."""

    whole_rows = True

    def read_raw(self, lo: int, hi: int, buf: np.ndarray) -> None:
        self.entry.remap.read(lo, hi, buf)


class FP8Source:
    """FP8 codes times their scales (per block, row or tensor; quant.py). Any whole rows decode:
    a row knows its scales."""

    align = 1

    def __init__(self, q: Quantized):
        self.q = q

    def decode(self, lo: int, hi: int, dst: np.ndarray) -> None:
        q = self.q
        L, R, C = q.lrc
        b0, b1 = q.block
        g0, g1 = lo // C, hi // C
        if g1 == g0:
            return
        first, last = scale_range(q, g0, g1)
        scales = read_scales(q, first, last)
        fmt = kernels.FP8_CODES[q.codes.dtype]
        step = max(1, CHUNK // C)
        raw = _scratch("raw", min(step, g1 - g0) * C)
        for g in range(g0, g1, step):
            n = min(step, g1 - g)
            read_range(q.codes, g * C, (g + n) * C, raw[:n * C])
            kernels.decode_fp8(raw[:n * C], fmt, scales, first, g, n, R, C, b0, b1, q.lead_stride,
                               dst[(g - g0) * C:(g - g0 + n) * C])


class MXFP4Source:
    """MXFP4 experts, decoded to the logical [E, 32 G, R] (transposed from storage): units hold
    whole experts."""

    def __init__(self, q: Quantized):
        self.q = q
        E, C, R = q.shape
        self.align = C * R

    def decode(self, lo: int, hi: int, dst: np.ndarray) -> None:
        q = self.q
        _, C, R = q.shape
        G = C // kernels.MX_GROUP
        e0, e1 = lo // self.align, hi // self.align
        per = R * G * 16  # stored bytes of one expert's blocks
        step = max(1, CHUNK // per)
        raw = _scratch("raw", min(step, e1 - e0) * per)
        for e in range(e0, e1, step):
            n = min(step, e1 - e)
            scales = np.empty(n * R * G, np.uint8)
            read_range(q.scales, e * R * G, (e + n) * R * G, scales)
            bad = int(np.count_nonzero(scales == 255))  # E8M0's NaN
            if bad:
                raise _bad_scales(q, bad, f"experts {e}..{e + n - 1}")
            read_range(q.codes, e * per, (e + n) * per, raw[:n * per])
            kernels.decode_mxfp4(raw[:n * per], scales, n, R, G, dst[(e - e0) * self.align:(e - e0 + n) * self.align])


class AdaptedSource(PlainSource):
    """A base tensor with a LoRA delta (lora.py): the base's rows covering the range, decoded,
    plus `scale * left[rows] @ right`, sliced to the range. On a plain base the sum is rounded
    to the base's dtype (`read_raw`: the bits an adapted checkpoint written in full would hold);
    on a quantized base it stays float32."""

    def __init__(self, entry):
        self.entry = entry
        self.base = QUANTIZED_SOURCES[entry.format](entry) if isinstance(entry, Quantized) else PlainSource(entry)
        self.align = self.base.align

    def _values(self, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """float32 values of the whole rows covering [lo, hi), adapted; and the first row's flat start."""
        from .lora import add_delta

        e = self.entry
        cols = max(1, e.row_numel)
        r0, r1 = lo // cols, -(-hi // cols)
        vals = _scratch("adapted", (r1 - r0) * cols * 4).view(np.float32)
        self.base.decode(r0 * cols, r1 * cols, vals)
        add_delta(e.factors, r0, r1, vals.reshape(r1 - r0, cols))
        return vals, r0 * cols

    def read_raw(self, lo: int, hi: int, buf: np.ndarray) -> None:
        vals, first = self._values(lo, hi)
        e = self.entry
        kernels.narrow_block(vals[lo - first:hi - first], hi - lo, buf.view(kernels.CONTAINER[e.dtype]), 0,
                             kernels.CODES[e.dtype])

    def decode(self, lo: int, hi: int, dst: np.ndarray) -> None:
        if isinstance(self.entry, Quantized):
            vals, first = self._values(lo, hi)
            dst[:hi - lo] = vals[lo - first:hi - first]
        else:  # rounded to the base dtype first, as read raw
            raw = _scratch("adapted_raw", (hi - lo) * self.entry.itemsize)
            self.read_raw(lo, hi, raw)
            kernels.widen_block(raw.view(kernels.CONTAINER[self.entry.dtype]), kernels.CODES[self.entry.dtype], 0,
                                hi - lo, dst)


QUANTIZED_SOURCES = {"fp8": FP8Source, "mxfp4": MXFP4Source}


def source(entry):
    """The Source that reads a catalogue entry."""
    if getattr(entry, "factors", None) is not None:
        return AdaptedSource(entry)
    if isinstance(entry, Quantized):
        return QUANTIZED_SOURCES[entry.format](entry)
    if getattr(entry, "remap", None) is not None:
        return RemapSource(entry)
    return PlainSource(entry)


def reads_raw(entries) -> bool:
    """Whether a unit of these inputs is read as raw bit patterns: every input stored plain in one
    dtype (float or integer). Otherwise every input is decoded to float32."""
    first = entries[0]
    return all(isinstance(e, TensorEntry) and e.dtype == first.dtype for e in entries)


def memory_per_element(entries) -> int:
    """Bytes a unit holds per element for its inputs: their raw values, or float32 when decoded
    (the stored bytes are read and decoded CHUNK at a time, a constant)."""
    extra = sum(_adapter_bytes(e) for e in entries)
    if reads_raw(entries):
        return entries[0].itemsize * len(entries) + extra
    return 4 * len(entries) + extra


def _adapter_bytes(entry) -> int:
    """Per element, what reading an adapted input holds on top: its float32 rows (and their
    rounded copy) and its share of the two factors. The right factor ([r, cols] float32, a few
    MiB at most) is held whole by a task that reads part of the tensor: within TASK_OVERHEAD."""
    f = getattr(entry, "factors", None)
    if f is None:
        return 0
    return 4 + getattr(entry, "itemsize", 0) + -(-f.nbytes // max(1, entry.numel))


def align(entries) -> int:
    """Unit boundaries of a tensor must be multiples of this many elements, for its inputs."""
    return math.lcm(*(source(e).align for e in entries))


# --- scales -------------------------------------------------------------------------------------

def scale_index(q: Quantized, g: int, c: int) -> int:
    """Index (in the stored scales, flat) of the scale of row g of the (L*R, C) view, column c."""
    _, R, C = q.lrc
    b0, b1 = q.block
    lead, r = divmod(g, R)
    return lead * q.lead_stride + (r // b0) * -(-C // b1) + c // b1


def scale_range(q: Quantized, g0: int, g1: int) -> tuple[int, int]:
    """The contiguous range of stored scales that rows [g0, g1) use."""
    _, _, C = q.lrc
    return scale_index(q, g0, 0), scale_index(q, g1 - 1, C - 1) + 1


def read_scales(q: Quantized, first: int, last: int) -> np.ndarray:
    """Stored FP8 scales [first, last) as float32; NaN or infinite scales are bad input."""
    s = q.scales
    raw = np.empty((last - first) * s.itemsize, np.uint8)
    read_range(s, first, last, raw)
    if s.dtype == "F32":
        vals = raw.view(np.float32)
    elif s.dtype == "BF16":
        vals = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        vals = raw.view(np.float16).astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(vals)))
    if bad:
        raise _bad_scales(q, bad, f"scales {first}..{last - 1}")
    return vals


def _bad_scales(q: Quantized, count: int, where: str) -> InputError:
    return InputError(f"{q.scales.file}: tensor {short(q.scales.name)} has {count} NaN/Inf scale(s) ({where}); "
                      "the checkpoint is damaged")

