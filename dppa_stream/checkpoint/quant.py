"""Quantized checkpoints: which storage formats a checkpoint uses, refusing the ones we cannot
read, and folding each quantized weight's stored tensors into one logical real-valued tensor.

The logical catalogue is what transformers' `from_pretrained(..., dequantize=True)` holds: names
and shapes of real-valued parameters. Supported (see docs/quantized.md for the facts and sources):

- **FP8 with scales** (`quant_method` fp8, fbgemm_fp8, compressed-tensors float-quantized, or no
  config at all): `X` stored as F8_E4M3/F8_E5M2 codes with `X_scale_inv` or `X_scale` (F32, BF16 or
  F16) wherever the index puts it; real value = code x scale. The scale's shape says which scale
  an element uses: one per tensor ([] or [1]), one per row ([..., rows, 1]) or one per block of
  b0 x b1 ([..., ceil(rows/b0), ceil(cols/b1)], the block from `weight_block_size` or the
  compressed-tensors group's `block_structure`, else 128 x 128). `X.input_scale` (an activation
  scale, not a weight) travels with `X.weight` and is copied from the reference model.
- **MXFP4** (gpt-oss): `X_blocks` U8 [E, R, G, 16] and `X_scales` U8 [E, R, G]; the logical
  tensor `X` is [E, 32 G, R] (transformers transposes the last two axes on dequantization).

Everything else that is quantization data is refused with one line naming the method (GPTQ, AWQ,
bitsandbytes, NVFP4/modelopt, compressed-tensors integer packs, any other `quant_method`), so
no packed integer is ever merged as a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import compress
from operator import attrgetter, itemgetter, methodcaller, or_

from ..errors import InputError, short
from .format import FP8_DTYPES, NAME, TensorEntry

SCALE_DTYPES = ("F32", "BF16", "F16")
DEFAULT_BLOCK = (128, 128)
READ_METHODS = {"fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4"}
COMPRESSED_FORMATS = {"float-quantized", "naive-quantized", "dense"}  # compressed-tensors formats of plain FP8 codes

# name endings that only packed-integer formats use: (ending, the format it belongs to)
PACKED_NAMES = (
    (".qweight", "GPTQ/AWQ int4"), (".qzeros", "GPTQ/AWQ int4"), (".g_idx", "GPTQ"),
    (".absmax", "bitsandbytes"), (".quant_map", "bitsandbytes"), (".nested_absmax", "bitsandbytes"),
    (".nested_quant_map", "bitsandbytes"), (".SCB", "bitsandbytes int8"), (".weight_format", "bitsandbytes int8"),
    (".weight_packed", "compressed-tensors packed integers"), (".weight_zero_point", "compressed-tensors integers"),
    (".weight_g_idx", "compressed-tensors integers"), (".weight_shape", "compressed-tensors packed integers"),
    (".weight_scale_2", "NVFP4 (modelopt)"), (".weight_global_scale", "NVFP4 (compressed-tensors)"),
)
_PACKED_ENDINGS = tuple(ending for ending, _ in PACKED_NAMES)
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
_SUSPECT_ENDINGS = _PACKED_ENDINGS + ("_scale_inv", ".weight_scale", MXFP4_BLOCKS, MXFP4_SCALES)
_TAIL = slice(-max(map(len, _SUSPECT_ENDINGS)), None)  # the end of a name that says whether it is a suspect
_DTYPE = attrgetter("dtype")


@dataclass(frozen=True)
class Quantized:
    """A logical real-valued tensor stored quantized: its codes, its scales and companions copied
    as they are. Quacks like a TensorEntry for everything that reads catalogues (name, shape,
    dtype, file, sizes); `dtype` is the codes' format ("F8_E4M3", "F8_E5M2" or "MXFP4")."""

    name: str  # the logical name
    format: str  # "fp8" or "mxfp4"
    shape: tuple[int, ...]  # the logical shape
    codes: TensorEntry  # FP8 codes, or the MXFP4 _blocks
    scales: TensorEntry  # FP8 scales (any shape above), or the MXFP4 _scales
    block: tuple[int, int] = (0, 0)  # FP8: rows x cols one scale covers, within one leading slice
    lead_stride: int = 0  # FP8: scales per leading slice (0: one set of scales serves every slice)
    extras: tuple[TensorEntry, ...] = ()  # copied from the reference (FP8 input_scale)

    @property
    def dtype(self) -> str:
        return "MXFP4" if self.format == "mxfp4" else self.codes.dtype

    @property
    def real(self) -> bool:
        return True

    @property
    def file(self) -> str:
        return self.codes.file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and scales): what reading the whole tensor costs."""
        return self.codes.nbytes + self.scales.nbytes

    @property
    def parts(self) -> tuple[TensorEntry, ...]:
        return (self.codes, self.scales, *self.extras)

    @property
    def lrc(self) -> tuple[int, int, int]:
        """The logical shape as (leading slices, rows, columns)."""
        return lrc(self.shape)

    def part_name(self, part: TensorEntry, out_name: str) -> str:
        """The name `part` takes for the output tensor `out_name` (slices renumber layers): the
        part's name with the logical name's module path replaced by the output's."""
        stem = _stem(self.name)
        return _stem(out_name) + part.name[len(stem):] if part.name.startswith(stem) else part.name


def lrc(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading slices, rows, columns) of a shape: [..., R, C]; a vector is one row."""
    if not shape:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, 1, shape[0]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _stem(name: str) -> str:
    return name.rpartition(".")[0]


# --- quantization_config ------------------------------------------------------------------------

def quant_method(config: dict | None, where: str) -> tuple[str | None, tuple[int, int] | None]:
    """(quant_method, FP8 block size) that config.json names, after refusing every quantization
    method we cannot read."""
    qc = None if not isinstance(config, dict) else config.get("quantization_config", config.get("compression_config"))
    if qc is None:
        return None, None
    if not isinstance(qc, dict):
        raise InputError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method not in READ_METHODS:
        raise InputError(f"{where}: quantization_config.quant_method {short(method)} is not supported: dppa-stream "
                         "reads FP8 (fp8, fbgemm_fp8, compressed-tensors float-quantized) and MXFP4 checkpoints; "
                         "packed integer weights cannot be merged as numbers, so use a bf16, fp16 or fp32 release "
                         "of this model (or dequantize it)")
    block = qc.get("weight_block_size")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt is not None and fmt not in COMPRESSED_FORMATS:
            raise InputError(f"{where}: compressed-tensors format {short(fmt)} is not supported (only "
                             f"float-quantized FP8 weights are); use a bf16, fp16 or fp32 release of this model")
        groups = qc.get("config_groups")
        for gname, group in (groups.items() if isinstance(groups, dict) else ()):
            w = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(w, dict):
                continue
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise InputError(f"{where}: compressed-tensors group {short(gname)} quantizes weights to "
                                 f"{short(w.get('num_bits'))}-bit {short(w.get('type'))}, which is not supported (only "
                                 "8-bit float is); use a bf16, fp16 or fp32 release of this model")
            block = block or w.get("block_structure")
    if block is None:
        return method, None
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise InputError(f"{where}: the FP8 block size {short(block)} is not two positive integers")
    return method, (block[0], block[1])


# --- folding ------------------------------------------------------------------------------------

def fold(entries: list[TensorEntry], config: dict | None, config_where: str,
         by_name: dict | None = None) -> dict[str, object]:
    """The logical catalogue of a checkpoint's stored tensors (in their order): plain entries as
    they are, each quantized weight as one `Quantized` in its codes' place, companions folded in.
    InputError (one line) for anything quantized we cannot read. `by_name`: the entries by name,
    when the caller has them."""
    method, block = quant_method(config, config_where)
    by_name = dict(zip(map(NAME, entries), entries)) if by_name is None else by_name
    names = list(by_name)
    # the entries any rule below applies to (FP8 codes, and names that packed formats, scales or
    # MXFP4 parts use); every other entry is a plain tensor. Tested a column at a time (in C):
    # an MoE checkpoint has 100k entries, whose names end in a few hundred ways (`_TAIL`)
    joined = "\0".join(names)
    if FP8_DTYPES.isdisjoint(map(_DTYPE, entries)) and ".quant_state." not in joined and not any(
            map(methodcaller("endswith", _SUSPECT_ENDINGS), set(map(itemgetter(_TAIL), names)))):
        return by_name  # no suspect: every entry is a plain tensor
    if ".quant_state." in joined:  # no name can hold it across the separator
        suspects = [e for e in entries if e.dtype in FP8_DTYPES or e.name.endswith(_SUSPECT_ENDINGS)
                    or ".quant_state." in e.name]
    else:
        suspects = list(compress(entries, map(or_, map(FP8_DTYPES.__contains__, map(_DTYPE, entries)),
                                              map(methodcaller("endswith", _SUSPECT_ENDINGS), map(NAME, entries)))))
    for e in suspects:
        _refuse_packed(e)
    by_codes: dict[str, Quantized] = {}
    parts: set[str] = set()
    for e in suspects:
        if e.dtype in FP8_DTYPES:
            q = _fp8(e, by_name, block)
        elif e.name.endswith(MXFP4_BLOCKS) and (method == "mxfp4" or (
                e.dtype == "U8" and e.name[:-len(MXFP4_BLOCKS)] + MXFP4_SCALES in by_name)):
            q = _mxfp4(e, by_name)
        else:
            continue
        if q.name != e.name and q.name in by_name:
            raise InputError(f"{e.file}: tensor {short(q.name)} is stored both plain and quantized")
        by_codes[e.name] = q
        parts.update(p.name for p in q.parts)
    for e in suspects:
        if e.name not in by_codes and e.name not in parts:
            _refuse_stray(e, by_name, method)
    if not by_codes:
        return by_name
    out: dict[str, object] = {}
    for e in entries:
        if e.name in by_codes:
            out[by_codes[e.name].name] = by_codes[e.name]
        elif e.name not in parts:
            out[e.name] = e
    return out


def relocate(catalogue: dict[str, object], entries: list[TensorEntry]) -> dict[str, object]:
    """`fold`'s catalogue for `entries`, given its `catalogue` for entries of the same names,
    dtypes and shapes in the same order (a fine-tune laid out exactly like its base), with no
    rule applied again."""
    if len(catalogue) == len(entries):  # nothing folded: fold's own answer, its names in the same order
        return dict(zip(catalogue, entries))
    by_name = dict(zip(map(NAME, entries), entries))
    return {name: by_name[t.name] if type(t) is TensorEntry else
            replace(t, codes=by_name[t.codes.name], scales=by_name[t.scales.name],
                    extras=tuple(by_name[x.name] for x in t.extras))
            for name, t in catalogue.items()}


def _refuse_packed(e: TensorEntry) -> None:
    what = None
    if e.name.endswith(_PACKED_ENDINGS):  # one check for the usual name (an MoE model has 100k of them)
        what = next(w for ending, w in PACKED_NAMES if e.name.endswith(ending))
    if what is None and ".quant_state." in e.name:
        what = "bitsandbytes 4-bit"
    if what is not None:
        raise InputError(f"{e.file}: tensor {short(e.name)} is {what} quantization data, which cannot be merged "
                         "as numbers; use a bf16, fp16 or fp32 release of this model (or dequantize it)")


def _fp8(w: TensorEntry, by_name: dict, block: tuple[int, int] | None) -> Quantized:
    where = f"{w.file}: tensor {short(w.name)}"
    found = [by_name[n] for n in (w.name + "_scale_inv", w.name + "_scale") if n in by_name]
    if not found:
        raise InputError(f"{where}: {w.dtype} codes without a scale ({short(w.name + '_scale_inv')} or "
                         f"{short(w.name + '_scale')}); the checkpoint is incomplete")
    if len(found) > 1:
        raise InputError(f"{where}: has two scales ({short(found[0].name)} and {short(found[1].name)})")
    s = found[0]
    if s.dtype not in SCALE_DTYPES:
        raise InputError(f"{s.file}: tensor {short(s.name)}: FP8 scales stored as {s.dtype} are not supported "
                         f"(F32, BF16 or F16 are)")
    L, R, C = lrc(w.shape)
    lead = tuple(w.shape[:-2])
    if s.numel == 1 and len(s.shape) <= 2:
        blk, stride = (R, C), 0  # one scale for the whole tensor
    elif s.shape in (lead + (R, 1), lead + (R,)) and len(w.shape) >= 2:
        blk, stride = (1, C), R  # one scale per row
    else:
        b0, b1 = block or DEFAULT_BLOCK
        want = lead + (-(-R // b0), -(-C // b1))
        if s.shape != want or len(w.shape) < 2:
            raise InputError(f"{s.file}: tensor {short(s.name)} has shape {list(s.shape)}, but {short(w.name)} "
                             f"{list(w.shape)} needs {list(want)} (blocks of {b0}x{b1}), one scale per row or one "
                             "for the tensor")
        blk, stride = (b0, b1), want[-2] * want[-1]
    extras = ()
    if w.name.endswith(".weight") and _stem(w.name) + ".input_scale" in by_name:
        extras = (by_name[_stem(w.name) + ".input_scale"],)
    return Quantized(w.name, "fp8", w.shape, w, s, blk, stride, extras)


def _mxfp4(b: TensorEntry, by_name: dict) -> Quantized:
    name = b.name[:-len(MXFP4_BLOCKS)]
    where = f"{b.file}: tensor {short(b.name)}"
    s = by_name.get(name + MXFP4_SCALES)
    if s is None:
        raise InputError(f"{where}: MXFP4 blocks without their scales {short(name + MXFP4_SCALES)}; the checkpoint "
                         "is incomplete")
    if b.dtype != "U8" or s.dtype != "U8":
        raise InputError(f"{where}: MXFP4 blocks and scales must be U8, found {b.dtype} and {s.dtype}")
    if len(b.shape) != 4 or b.shape[-1] != 16 or s.shape != b.shape[:-1]:
        raise InputError(f"{where}: MXFP4 blocks of shape {list(b.shape)} with scales {list(s.shape)}; expected "
                         "[experts, rows, groups, 16] and [experts, rows, groups]")
    E, R, G, _ = b.shape
    return Quantized(name, "mxfp4", (E, G * 32, R), b, s)


def _refuse_stray(e: TensorEntry, by_name: dict, method) -> None:
    """Scales or MXFP4 parts left over after folding: quantization data with nothing to belong to."""
    for ending in ("_scale_inv", ".weight_scale"):
        if e.name.endswith(ending):
            weight = e.name[:-len("_scale_inv")] if ending == "_scale_inv" else e.name[:-len("_scale")]
            what = f"{short(weight)} is {by_name[weight].dtype}, not FP8" if weight in by_name else \
                f"there is no {short(weight)}"
            raise InputError(f"{e.file}: tensor {short(e.name)} looks like an FP8 scale but {what}; the checkpoint "
                             "is inconsistent")
    if e.name.endswith(MXFP4_SCALES) and (method == "mxfp4" or e.name[:-len(MXFP4_SCALES)] + MXFP4_BLOCKS in by_name):
        raise InputError(f"{e.file}: tensor {short(e.name)} looks like MXFP4 scales without their blocks "
                         f"{short(e.name[:-len(MXFP4_SCALES)] + MXFP4_BLOCKS)}; the checkpoint is inconsistent")
