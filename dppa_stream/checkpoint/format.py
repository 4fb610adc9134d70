"""The safetensors file format: parsing and validating a header, and building one.

We parse headers ourselves (instead of `safetensors.safe_open`) so that we can (a) read any row
range with a plain positional read, which keeps process memory honest (no mapped pages in RSS),
and (b) lay out output files before any tensor data exists. Format: 8-byte little-endian header
length N, N bytes of JSON, then the raw little-endian, C-order tensor bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass

from ..errors import InputError, short

MAX_HEADER_SIZE = 100_000_000  # the limit safetensors itself enforces

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "F64": 8, "I64": 8, "U64": 8, "F8_E5M2": 1, "F8_E4M3": 1,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}  # codes of quantized weights: real values only with their scales (quant.py)
# safetensors' own dtype order (its `Dtype` enum); save_file lays tensors out by it, descending
_SAVE_ORDER = {d: i for i, d in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}


def __getattr__(name: str):
    """`DTYPES` (name -> (torch dtype, size)) and `NAME_OF_TORCH_DTYPE`, built on first use: tests,
    the demo generator and tools convert torch tensors; the merge itself never imports torch."""
    if name not in ("DTYPES", "NAME_OF_TORCH_DTYPE"):
        raise AttributeError(name)
    import torch

    torch_of = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
                "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
                "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
                "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}
    tables = {"DTYPES": {n: (torch_of[n], size) for n, size in DTYPE_SIZES.items()},
              "NAME_OF_TORCH_DTYPE": {t: n for n, t in torch_of.items()}}
    globals().update(tables)
    return tables[name]


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute offset of the first byte in `file`
    nbytes: int
    file_id: tuple = ()  # (device, inode, mtime_ns, size) when catalogued: a replaced file is detected

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        """Rows along the first axis; a scalar counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def real(self) -> bool:
        """Holds real values that are merged (a plain float tensor); integer tensors are copied."""
        return self.dtype in FLOAT_DTYPES


MAX_INT = 2**63 - 1  # sizes and offsets are int64 everywhere downstream (torch, numpy, the OS)
# Small float formats other than the FP8 codes quant.py reads with their scales: refused.
SMALL_FLOATS = re.compile(r"F[468](_|$)", re.I)  # F8_E8M0, F6_E2M3, F4, F8_E4M3FNUZ, ...


def loads_untrusted(text: str, where: str) -> object:
    """`json.loads` for checkpoint JSON: every way it can fail (syntax, 5000-digit integers, 100k
    levels of nesting, duplicate keys) becomes one InputError naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at char {e.pos})") from None
    except _Duplicate as e:
        raise InputError(f"{where}: key {short(e.args[0])} appears twice") from None
    except RecursionError:
        raise InputError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # int('9' * 5000): Python's integer-size guard
        raise InputError(f"{where}: not valid JSON ({short(str(e), 80)})") from None


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def is_text(value) -> bool:
    """A string that is valid Unicode (JSON escapes can produce lone surrogates, which cannot be
    written back to UTF-8 or used as a file name)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(v) -> bool:
    return type(v) is int and 0 <= v <= MAX_INT  # not bool (JSON makes no other int subclass)


def read_header(path: str, fd: int, file_size: int) -> tuple[dict, int]:
    """Return (header dict, data start offset) of an open safetensors file, validated for sanity."""
    import os

    return parse_header(path, lambda n, offset: os.pread(fd, n, offset), file_size)


def parse_header(path: str, pread, file_size: int) -> tuple[dict, int]:
    """`read_header` over any `pread(n, offset) -> bytes` (a local file, or HTTP range requests
    for a file not downloaded yet)."""
    head = pread(8, 0)
    if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_SIZE:
        raise InputError(f"{path}: header length {n} exceeds the safetensors limit of {MAX_HEADER_SIZE} bytes")
    if 8 + n > file_size:
        raise InputError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes); truncated?")
    raw = pread(n, 8)
    if len(raw) != n:
        raise InputError(f"{path}: short read of the header (file changed or truncated?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: header is not valid UTF-8") from None
    header = loads_untrusted(text, f"{path}: header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    return header, 8 + n


class _Where:
    """`PATH: tensor NAME` for an error message, escaped only when one is raised: escaping every
    name up front was a quarter of the start-up on a checkpoint of 100k tensors."""

    __slots__ = ("path", "name")

    def __init__(self, path: str, name):
        self.path, self.name = path, name

    def __format__(self, spec: str) -> str:
        return f"{self.path}: tensor {short(self.name)}"


def parse_entries(path: str, header: dict, data_start: int, file_size: int, file_id: tuple = ()) -> list[TensorEntry]:
    """Validate a parsed header and return its tensors sorted by offset.

    Checks: valid Unicode names, known dtype (FP8 codes included; other small floats refused), shape of int64-sized non-negative
    integers, byte count = numel x itemsize, offsets inside the file, contiguous from 0 with no
    overlaps or holes (as safetensors requires), file size exact. Zero-size and 0-D tensors are
    valid safetensors and accepted.
    """
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(is_text(k) and is_text(v) for k, v in info.items())
            ):
                raise InputError(f"{path}: __metadata__ must map strings to strings")
            continue
        where = _Where(path, name)
        if not is_text(name):
            raise InputError(f"{where}: the tensor name is not valid Unicode (lone surrogate)")
        if not isinstance(info, dict):
            raise InputError(f"{where}: entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if isinstance(dtype, str) and SMALL_FLOATS.match(dtype) and dtype not in FP8_DTYPES:
            raise InputError(f"{where}: dtype {short(dtype)} is a small float format dppa-stream does not read (FP8 "
                             "F8_E4M3/F8_E5M2 with scales and MXFP4 are supported); dequantize the checkpoint to bf16, "
                             "fp16 or fp32 first")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InputError(f"{where}: unsupported dtype {short(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(s) for s in shape):
            raise InputError(f"{where}: shape {short(shape)} is not a list of non-negative integers below 2**63")
        if math.prod(s for s in shape if s) > MAX_INT:
            raise InputError(f"{where}: shape {short(shape)} has more than 2**63 elements")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or offs[0] > offs[1]:
            raise InputError(f"{where}: data_offsets {short(offs)} are not two ordered non-negative integers")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != nbytes:
            raise InputError(
                f"{where}: holds {offs[1] - offs[0]} bytes but shape {short(shape)} x {dtype} needs {nbytes}"
            )
        if data_start + offs[1] > file_size:
            raise InputError(f"{where}: data ends at byte {data_start + offs[1]}, past the end of the file ({file_size}); truncated?")
        # names interned: the base and every fine-tune name the same tensors (100k of them for an MoE model)
        entries.append(TensorEntry(sys.intern(name), dtype, tuple(shape), path, data_start + offs[0], nbytes, file_id))
    entries.sort(key=lambda e: (e.offset, e.nbytes))
    pos = data_start
    for e in entries:
        if e.offset < pos:
            raise InputError(f"{path}: tensor {short(e.name)} overlaps the previous tensor")
        if e.offset > pos:
            raise InputError(f"{path}: {e.offset - pos} unused bytes before tensor {short(e.name)} (a hole)")
        pos = e.offset + e.nbytes
    if pos != file_size:
        raise InputError(f"{path}: {file_size - pos} bytes after the last tensor; the file is malformed")
    return entries


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors given as (name, dtype, shape).

    Ordered and padded exactly as `safetensors.torch.save_file` does (descending safetensors dtype
    order, then name; JSON padded with spaces to a multiple of 8), so our files are byte-identical to it.
    Returns the header and each tensor's offset relative to the data start.
    """
    ordered = sorted(specs, key=lambda s: (-_SAVE_ORDER[s[1]], s[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offsets, pos = {}, 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
