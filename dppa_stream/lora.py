"""LoRA adapters as inputs: a model string `BASE+ADAPTER` (mergekit's syntax) is the base model with
a PEFT LoRA adapter applied, row range by row range, as its rows are read.

An adapter is PEFT's `adapter_config.json` plus `adapter_model.safetensors`. For every adapted
module the catalogue entry of its weight is replaced by an `AdaptedEntry` (or, on a quantized base,
an `AdaptedQuantized`) that carries the two factors; `sources.AdaptedSource` reads the base's rows,
adds `scale * left[rows] @ right` (kernels/lora.py: float64 products, one rounding to float32) and,
on a plain base, rounds to the base's dtype, as peft's `merge_and_unload` stores the weight. The
adapted model therefore never exists whole, in memory or on disk, and enters every method (and
DP/DPA statistics) as an ordinary input. `modules_to_save` tensors replace the base's.

Layouts (peft's `get_delta_weight`): a Linear weight W [out, in] gets `B @ A` (A [r, in],
B [out, r]); with `fan_in_fan_out` (GPT-2 Conv1D, W [in, out]) `(B @ A)^T`; an Embedding W
[vocab, dim] gets `(B @ A)^T` with A = lora_embedding_A [r, vocab], B = lora_embedding_B [dim, r].
The scale is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` and
`alpha_pattern` override r and alpha per module. DoRA, other peft types, LoRA biases and
convolution adapters are refused with one line.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, fields

import numpy as np

from .checkpoint import Checkpoint, TensorEntry
from .checkpoint.quant import Quantized
from .checkpoint.reader import read_json_file, resolve_inside
from .errors import InputError, short

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?:[^.]+\.)?weight$|"
                     r"^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


# --- the composite model key --------------------------------------------------------------------

def key(base: str, adapter: str) -> str:
    """The model key of `base` with `adapter` applied (both resolved): what configs hold."""
    return f"{base}+{adapter}"


def split_key(path: str) -> tuple[str, str] | None:
    """(base, adapter folder) of a key made by `key`, or None for a plain model. A `+` may occur
    inside either path: the split is the last one whose right side is an adapter folder."""
    if "+" not in path or os.path.lexists(path):
        return None
    for i in range(len(path) - 1, 0, -1):
        if path[i] == "+" and is_adapter_folder(path[i + 1:]):
            return path[:i], path[i + 1:]
    return None


# --- the factors --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Factors:
    """One adapted tensor's delta, `scale * left @ right` ([rows, r] @ [r, cols]) as peft applies
    it. `left`/`right` are the stored A or B entries; `*_t` says a factor is used transposed."""

    left: TensorEntry
    left_t: bool
    right: TensorEntry
    right_t: bool
    scale: float
    module: str
    adapter: str  # the adapter folder, for messages

    @property
    def rank(self) -> int:
        return self.right.shape[1] if self.right_t else self.right.shape[0]

    @property
    def nbytes(self) -> int:
        """Float32 bytes of both factors."""
        return 4 * (self.left.numel + self.right.numel)

    def left_rows(self, r0: int, r1: int) -> np.ndarray:
        """float32 [r1 - r0, r]: rows r0..r1 of the left factor."""
        if self.left_t:  # A [r, rows]: columns r0..r1 of each of its r rows
            e = self.left
            cols = np.stack([_flat(e, k * e.row_numel + r0, k * e.row_numel + r1) for k in range(e.rows)])
            return np.ascontiguousarray(cols.T)
        return _flat(self.left, r0 * self.left.row_numel, r1 * self.left.row_numel).reshape(r1 - r0, -1)

    def right_matrix(self) -> np.ndarray:
        """float32 [r, cols]."""
        m = _load(self.right)
        return np.ascontiguousarray(m.T) if self.right_t else m


def _flat(e: TensorEntry, lo: int, hi: int) -> np.ndarray:
    """Elements [lo, hi) of a float tensor as float32."""
    from . import kernels
    from .checkpoint import read_range

    raw = np.empty((hi - lo) * e.itemsize, np.uint8)
    read_range(e, lo, hi, raw)
    out = np.empty(hi - lo, np.float32)
    bad = kernels.widen_block(raw.view(kernels.CONTAINER[e.dtype]), kernels.CODES[e.dtype], 0, hi - lo, out)
    if bad:
        raise InputError(f"{e.file}: LoRA factor {short(e.name)} has {bad} NaN/Inf values; the adapter is damaged")
    return out


def _load(e: TensorEntry) -> np.ndarray:
    return _flat(e, 0, e.numel).reshape(e.rows, e.row_numel)


class AdaptedEntry(TensorEntry):
    """A plain base tensor with a LoRA delta: the base's bytes, read through `factors`
    (sources.AdaptedSource); dtype and shape are the base's. `factors` lives in the instance's
    dict (a named tuple's subclass cannot add fields)."""

    factors: Factors | None

    def __new__(cls, name, dtype, shape, file, offset, nbytes, file_id=(), factors=None):
        self = tuple.__new__(cls, (name, dtype, shape, file, offset, nbytes, file_id))
        self.factors = factors
        return self


@dataclass(frozen=True, eq=False)
class AdaptedQuantized(Quantized):
    """A quantized base tensor with a LoRA delta: decoded, then the delta added (float32)."""

    factors: Factors | None = None


def adapted(entry, factors: Factors):
    if isinstance(entry, Quantized):
        return AdaptedQuantized(**{f.name: getattr(entry, f.name) for f in fields(entry)}, factors=factors)
    return AdaptedEntry(*entry, factors=factors)


# --- reading an adapter -------------------------------------------------------------------------

def read_adapter_config(folder: str) -> dict:
    path = os.path.join(folder, ADAPTER_CONFIG)
    cfg = read_json_file(resolve_inside(folder, ADAPTER_CONFIG, path), path)
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"{path}: peft_type {short(kind)} is not supported; only LoRA adapters (peft_type LORA) are")
    if cfg.get("use_dora"):
        raise InputError(f"{path}: DoRA adapters (use_dora: true) are not supported; only plain LoRA is")
    if cfg.get("lora_bias"):
        raise InputError(f"{path}: LoRA adapters with a bias (lora_bias: true) are not supported")
    if cfg.get("layer_replication"):
        raise InputError(f"{path}: adapters with layer_replication are not supported")
    for k in ("r", "lora_alpha"):
        v = cfg.get(k, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"{path}: {k} {short(v)} must be a positive number")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            raise InputError(f"{path}: {k} must be an object")
    return cfg


def _pattern(patterns: dict, module: str):
    """peft's rule: the pattern that matches the end of the module name (at a dot)."""
    for p, v in patterns.items():
        try:
            if re.match(rf"(.*\.)?({p})$", module):
                return v
        except re.error:
            if module == p or module.endswith("." + p):
                return v
    return None


def _target(module: str, base: dict, suffix: str, where: str) -> str:
    """The base tensor a peft module name adapts: `<module>.<suffix>`, the module named with or
    without a leading wrapper (`model.`) as the base checkpoint's names have it."""
    cands = [module, f"model.{module}"]
    if "." in module:
        cands.append(module.split(".", 1)[1])
    found = [c + suffix for c in cands if c + suffix in base]
    if not found:
        raise InputError(f"{where}: module {short(module)} matches no tensor of the base model "
                         f"(looked for {short(cands[0] + suffix)})")
    return found[0]


def open_adapted(base: Checkpoint, folder: str) -> Checkpoint:
    """`base` with the adapter in `folder` applied: a catalogue whose adapted tensors read through
    their factors (nothing is read but headers)."""
    cfg = read_adapter_config(folder)
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.lexists(weights):
        pickled = os.path.join(folder, "adapter_model.bin")
        extra = " (adapter_model.bin is pickled and refused)" if os.path.exists(pickled) else ""
        raise InputError(f"{folder}: no {ADAPTER_WEIGHTS}{extra}")
    adapter = Checkpoint.open(resolve_inside(folder, ADAPTER_WEIGHTS, weights, "adapter weights"))
    where = adapter.path
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rs, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    pairs: dict[str, dict[str, TensorEntry]] = {}
    saved: dict[str, TensorEntry] = {}
    for name, e in adapter.tensors.items():
        if not isinstance(e, TensorEntry) or e.dtype not in ("F32", "F16", "BF16", "F64"):
            raise InputError(f"{where}: tensor {short(name)} is {e.dtype}; adapter factors must be float tensors")
        inner = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = _FACTOR.match(inner)
        if m is None:
            if ".lora_" in inner or "lora_magnitude" in inner:
                raise InputError(f"{where}: tensor {short(name)} is not a LoRA factor this version reads "
                                 "(DoRA magnitudes, LoRA biases and other variants are not supported)")
            saved[inner.replace(".base_layer.", ".")] = e  # modules_to_save, or a saved embedding's base layer
            continue
        module = m.group("module") or m.group("emodule")
        part = m.group("part") or m.group("epart")
        pairs.setdefault(module, {})[part] = e
    tensors = dict(base.tensors)
    for name, e in saved.items():  # first: an adapted module's saved base layer is what the delta goes onto
        for cand in (name, f"model.{name}", name.split(".", 1)[1] if "." in name else name):
            if cand in tensors:
                break
        else:
            raise InputError(f"{where}: saved module tensor {short(name)} matches no tensor of the base model")
        w = tensors[cand]
        if tuple(e.shape) != tuple(w.shape):
            raise InputError(f"{where}: saved tensor {short(name)} has shape {list(e.shape)} but the base's "
                             f"{short(cand)} has {list(w.shape)}")
        tensors[cand] = e._replace(name=cand)  # named as the tensor it stands for (vocabulary rules go by name)
    for module, parts in pairs.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a_name not in parts or b_name not in parts:
            missing = b_name if a_name in parts else a_name
            raise InputError(f"{where}: module {short(module)} has no {missing} factor")
        a, b = parts[a_name], parts[b_name]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise InputError(f"{where}: module {short(module)}: factors of shape {list(a.shape)} and {list(b.shape)}; "
                             "only 2-D (Linear, Embedding) LoRA factors are supported, not convolutions")
        target = _target(module, tensors, ".weight", where)
        w = tensors[target]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise InputError(f"{where}: module {short(module)}: lora A has rank {rank} but B has {b.shape[1]}")
        if emb:  # delta (B A)^T = A^T B^T: [vocab, dim]
            left, left_t, right, right_t = a, True, b, True
            want = (a.shape[1], b.shape[0])
        elif fan_in_fan_out:  # W [in, out]: (B A)^T
            left, left_t, right, right_t = a, True, b, True
            want = (a.shape[1], b.shape[0])
        else:
            left, left_t, right, right_t = b, False, a, False
            want = (b.shape[0], a.shape[1])
        if len(w.shape) != 2 or tuple(w.shape) != want:
            raise InputError(f"{where}: module {short(module)} makes a delta of shape {list(want)} but the base's "
                             f"{short(target)} has shape {list(w.shape)}")
        if not w.real:
            raise InputError(f"{where}: module {short(module)} adapts {short(target)}, which is {w.dtype}, not real-valued")
        r = _pattern(rs, module) or r_default
        alpha = _pattern(alphas, module) or alpha_default
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if isinstance(w, (AdaptedEntry, AdaptedQuantized)):
            raise InputError(f"{where}: module {short(module)} is adapted twice")
        tensors[target] = adapted(w, Factors(left, left_t, right, right_t, float(scale), module, folder))
    # the adapter's config counts as one of its files: a changed alpha changes a resumed run's identity
    return Checkpoint(key(base.path, folder), tensors, base.folder,
                      base.files + adapter.files + [os.path.join(folder, ADAPTER_CONFIG)], {**base.stamps, **adapter.stamps})


# --- reading adapted rows -----------------------------------------------------------------------

_cache = threading.local()  # per thread: the right factor of the tensor it read last (a task reads a tensor's rows in order)


def right_of(f: Factors) -> np.ndarray:
    got = getattr(_cache, "right", None)
    if got is not None and got[0] is f:
        return got[1]
    m = f.right_matrix()
    _cache.right = (f, m)
    return m


def add_delta(f: Factors, r0: int, r1: int, vals: np.ndarray) -> None:
    """vals (float32 [r1 - r0, cols], rows r0..r1 of the base) += the delta's rows."""
    from .kernels import add_low_rank

    if r1 > r0:
        add_low_rank(vals, f.left_rows(r0, r1), right_of(f), f.scale)
