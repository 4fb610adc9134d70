"""What each output tensor is written as, and writing one unit of it.

The output keeps the reference model's format (the base, else the first model: the input whose
dtype and shape an output tensor takes). A tensor the reference stores quantized is written in
that format, under the same names, dtypes and shapes, with fresh scales; every other real-valued
tensor is written plain in `out_dtype`, else `dtype`, else the reference's dtype. With `out_dtype`
every real-valued tensor is written plain, quantized ones included (MXFP4 experts under the names
and orientation transformers gives them after dequantization). `dtype` never changes a quantized
tensor's format: it only names the arithmetic, which is float32 anyway. Integer tensors are copied.

Encoding happens in the unit's task, on the merged float32 values (see kernels/formats.py for the
rules), and accounts for what requantization lost; `RequantLoss` adds the units' partial sums
(integers: each row's float64 sums, added exactly), so its numbers do not depend on the unit size
(docs/quantized.md defines them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from . import kernels
from .checkpoint import DTYPE_SIZES, Placement, read_range
from .checkpoint.quant import Quantized
from .checkpoint.writer import write_at
from .sources import scale_range
from .statistics import exact_integers
from .units import scratch


# hashable like a frozen dataclass, without its slower __init__ (one per output tensor); slots: no
# dict per instance to make
@dataclass(slots=True, unsafe_hash=True)
class Target:
    """How an output tensor is stored: its logical shape, and `ref`, the reference's quantized
    storage it keeps (None: written plain as `dtype`); `scale` the (bits, value) of a per-tensor FP8
    scale, once the merged tensor's amax is known. Nameless: one Target serves a whole class of
    tensors (`units.Classes`), so a checkpoint of tens of thousands of tensors makes a few dozen."""

    shape: tuple[int, ...]
    dtype: str
    ref: Quantized | None = None
    scale: tuple[int, float] | None = None

    def specs(self, name: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every stored tensor of output tensor `name`, in the order they are laid out."""
        if self.ref is None:
            return [(name, self.dtype, self.shape)]
        return [(self.ref.part_name(p, name), p.dtype, p.shape) for p in self.ref.parts]

    @property
    def needs_amax(self) -> bool:
        """One FP8 scale for the whole tensor: it needs the merged tensor's amax before any unit
        is encoded (a pass of its own, `merge_pass.tensor_scales`)."""
        return self.ref is not None and self.ref.format == "fp8" and self.ref.lead_stride == 0

    @property
    def align(self) -> int:
        """Unit boundaries must be multiples of this many elements: whole blocks of scales."""
        q = self.ref
        if q is None or self.needs_amax:
            return 1
        if q.format == "mxfp4":
            return q.row_numel  # whole experts
        L, R, C = q.lrc
        b0 = q.block[0]
        return R * C if b0 >= R or (L > 1 and R % b0) else b0 * C

    @property
    def out_bytes(self) -> int:
        """Bytes a unit holds per element for its output: the stored value, or for a quantized
        tensor the merged float32 value plus its code (MXFP4: and the requantized value)."""
        if self.ref is None:
            return DTYPE_SIZES[self.dtype]
        return 9 if self.ref.format == "mxfp4" else 5

    @property
    def stored_bytes(self) -> int:
        return sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape in self.specs(""))


def class_targets(inputs, out_dtype: str | None, dtype: str | None) -> list[Target]:
    """The Target of every class of output tensors (`units.Classes`; rules in the module
    docstring); made once per inputs and dtypes (planning, the space check and pass 2 each ask).
    A class of many tensors is stored plain (no `ref`): only a class of its own may keep one."""
    memo = getattr(inputs, "targets", None)
    if memo is None:
        return _targets(inputs, out_dtype, dtype)
    if (out_dtype, dtype) not in memo:
        memo[out_dtype, dtype] = _targets(inputs, out_dtype, dtype)
    return memo[out_dtype, dtype]


def output_targets(inputs, out_dtype: str | None, dtype: str | None) -> dict[str, Target]:
    """Tensor name -> its Target (`class_targets`, shared by the tensors of a class)."""
    from .units import tensor_classes

    return tensor_classes(inputs).per_tensor(class_targets(inputs, out_dtype, dtype))


def _targets(inputs, out_dtype: str | None, dtype: str | None) -> list[Target]:
    from .units import tensor_classes

    c = tensor_classes(inputs)
    return [_target(c.refs[i], out_dtype, dtype) for i in c.first]


def _target(e, out_dtype: str | None, dtype: str | None) -> Target:
    if not e.real:
        return Target(e.shape, e.dtype)
    if isinstance(e, Quantized):
        return Target(e.shape, out_dtype) if out_dtype else Target(e.shape, e.dtype, e)
    return Target(e.shape, out_dtype or dtype or e.dtype)


# --- writing a unit -----------------------------------------------------------------------------

def write_quantized(target: Target, folder: str, places: tuple[Placement, ...], lo: int, hi: int,
                    merged: np.ndarray, rows) -> tuple[int, list]:
    """Encode the merged float32 values of elements [lo, hi) into the target's format and write
    codes and scales at their final places; returns (bytes written, loss partial). The input
    rows (float32, reference first) are what the loss is measured against."""
    q = target.ref
    if target.needs_amax and target.scale is None:  # a tensor held in one unit: its amax is this unit's
        if lo or hi != q.numel:
            raise AssertionError(f"{q.name}: a per-tensor FP8 scale over several units was not chosen before pass 2")
        target = tensor_scale(target, float(kernels.max_abs(merged)))
    sets = rows.src.shape[0]
    counts = np.zeros((sets, 3), np.int64)
    words = np.zeros((2, 2 * sets, kernels.LOSS_BUCKETS), np.int64)
    written = 0
    if q.format == "mxfp4":
        per = q.row_numel
        e0, n = lo // per, (hi - lo) // per
        E, C, R = q.shape
        G = C // kernels.MX_GROUP
        blocks = scratch("codes", n * R * G * 16)
        scales = np.empty(n * R * G, np.uint8)
        requant = scratch("requant", (hi - lo) * 4).view(np.float32)
        kernels.encode_mxfp4(merged, rows.src, n, R, G, blocks, scales, requant, counts, words[0], words[1])
        written += write_at(folder, places[0], e0 * R * G * 16, blocks)
        written += write_at(folder, places[1], e0 * R * G, scales)
    else:
        L, R, C = q.lrc
        b0, b1 = q.block
        g0, g1 = lo // C, hi // C
        first, last = scale_range(q, g0, g1)
        codes = scratch("codes", hi - lo)
        scale_bits = np.empty(last - first, np.uint32)
        fixed = target.scale[1] if target.needs_amax else 0.0
        kernels.encode_fp8(merged, rows.src, g0, g1 - g0, R, C, b0, b1, q.lead_stride, first, fixed,
                           kernels.FP8_CODES[q.codes.dtype], kernels.SCALE_CODES[q.scales.dtype], codes, scale_bits,
                           counts, words[0], words[1])
        written += write_at(folder, places[0], lo, codes)
        if target.needs_amax:
            scale_bits[:] = target.scale[0]
        if not target.needs_amax or lo == 0:
            stored = scale_bits.astype(kernels.CONTAINER[q.scales.dtype]).view(np.uint8)
            written += write_at(folder, places[1], first * q.scales.itemsize, stored)
    if lo == 0:  # companions copied from the reference (an activation scale), once
        for part, place in zip(q.extras, places[2:]):
            data = np.empty(part.nbytes, np.uint8)
            read_range(part, 0, part.numel, data)
            written += write_at(folder, place, 0, data)
    sums = exact_integers(words)
    return written, [[int(c[0]), int(c[1]), int(c[2]), sums[2 * s], sums[2 * s + 1]] for s, c in enumerate(counts)]


def tensor_scale(target: Target, amax: float) -> Target:
    """The target with its per-tensor FP8 scale chosen from the merged tensor's amax."""
    q = target.ref
    bits, value = kernels.fp8_scale(np.float32(amax), kernels.FP8_CODES[q.codes.dtype],
                                    kernels.SCALE_CODES[q.scales.dtype])
    return replace(target, scale=(int(bits), float(value)))


# --- the requantization loss --------------------------------------------------------------------

LOSS_UNIT = 1075  # a float64 with exponent field f and significand s is s << f units of 2**-1075

@dataclass
class RequantLoss:
    """Totals of the units' loss partials, per set: every element of the requantized tensors
    ("all") and, per fine-tune, the elements it changed. For a set: elements, changed (merged !=
    reference), vanished (changed, but requantized == reference), Σ (requantized − merged)² and
    Σ (merged − reference)² (integers in units of 2**-LOSS_UNIT: rows' float64 sums added exactly,
    kernels/formats.py)."""

    sets: dict = field(default_factory=dict)
    tensors: set = field(default_factory=set)

    def add(self, tensor: str, partial: list, keys: list) -> None:
        """Add one unit's partial; keys[s] names set s (None: the reference itself, not reported)."""
        self.tensors.add(tensor)
        for key, row in zip(keys, partial):
            if key is None:
                continue
            total = self.sets.setdefault(key, [0, 0, 0, 0, 0])
            for i, v in enumerate(row):
                total[i] += v

    def to_json(self) -> dict | None:
        if not self.tensors:
            return None

        def one(t):
            n, changed, vanished, err, delta = t
            return {"elements": n, "changed": changed, "vanished": vanished,
                    "vanished_share": vanished / changed if changed else 0.0,
                    "relative_l2_loss": math.sqrt(err / delta) if delta else (None if err else 0.0),
                    "l2_error": math.sqrt(err / (1 << LOSS_UNIT)), "l2_delta": math.sqrt(delta / (1 << LOSS_UNIT))}

        return {"tensors": len(self.tensors), "all": one(self.sets.get("all", [0] * 5)),
                "models": {k: one(v) for k, v in self.sets.items() if k != "all"}}



def _share(x: float) -> str:
    """A share as a percentage, with the digits a small one needs (0.0057%, not 0.0%)."""
    return f"{x:.1%}" if x == 0 or x >= 0.001 else f"{100 * x:.2g}%"


def loss_summary(report: dict) -> str:
    """The summary line of a loss report (`RequantLoss.to_json`)."""
    a = report["all"]
    if not a["changed"]:
        return (f"requantized {report['tensors']} tensor(s) into the reference's format; the merge changed none of "
                f"their elements (L2 norm of the requantization error: {a['l2_error']:.3g})")
    per = "; ".join(f"{os.path.basename(k.rstrip('/')) or k}: {m['relative_l2_loss']:.2%} lost, "
                    f"{_share(m['vanished_share'])} vanished" for k, m in report["models"].items() if m["changed"])
    return (f"requantized {report['tensors']} tensor(s) into the reference's format: the merge's change lost "
            f"{a['relative_l2_loss']:.2%} of its L2 norm, and {_share(a['vanished_share'])} of the {a['changed']} "
            f"changed elements came out equal to the reference" + (f" (per model: {per})" if per else ""))
