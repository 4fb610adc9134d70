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
from json.encoder import encode_basestring as _quote
from itertools import accumulate, chain, islice, repeat
from operator import add, attrgetter, itemgetter, mul, sub
from typing import NamedTuple

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


class TensorEntry(NamedTuple):
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape.

    A named tuple, not a frozen dataclass: catalogues hold one per tensor and model (hundreds of
    thousands for MoE merges), and a tuple can be built in C (`_entries`: `tuple.__new__` over a
    zip of columns) where any class with an `__init__` costs a Python call per entry. Immutable,
    equal and hashed by its fields all the same."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute offset of the first byte in `file`
    nbytes: int
    file_id: tuple = ()  # (device, inode, mtime_ns, size) when catalogued: a replaced file is detected

    def __eq__(self, other) -> bool:  # as the dataclass it was: equal to an entry of the same class only
        return type(other) is type(self) and tuple.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    __hash__ = tuple.__hash__

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


def entries_of_columns(*columns) -> list[TensorEntry]:
    """TensorEntry of each row of the columns (name, dtype, shape, file, offset, nbytes, file_id:
    what `zip(*entries)` makes of them), built in C (no Python call per entry)."""
    return list(map(tuple.__new__, repeat(TensorEntry), zip(*columns)))


NAME, _DTYPE, _SHAPE, _OFFSET, _NBYTES = map(attrgetter, ("name", "dtype", "shape", "offset", "nbytes"))  # columns in C

MAX_INT = 2**63 - 1  # sizes and offsets are int64 everywhere downstream (torch, numpy, the OS)
# Small float formats other than the FP8 codes quant.py reads with their scales: refused.
SMALL_FLOATS = re.compile(r"F[468](_|$)", re.I)  # F8_E8M0, F6_E2M3, F4, F8_E4M3FNUZ, ...


def loads_untrusted(text: str, where: str) -> object:
    """`json.loads` for checkpoint JSON: every way it can fail (syntax, 5000-digit integers, 100k
    levels of nesting, duplicate keys) becomes one InputError naming `where`.

    Parsed without a hook first (an index maps tens of thousands of names: a hook call per object
    and a list of pairs each cost more than the parse), then repeated keys, which that parse drops
    silently, are ruled out by counting ':' as `_usual_entries` does; any doubt, and the hooked
    parse decides."""
    if "\\u003a" not in text and "\\u003A" not in text:
        try:
            got = json.loads(text)
        except (ValueError, RecursionError):  # the hooked parse below names the fault
            pass
        else:
            if _key_colons(got) == text.count(":"):
                return got
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


def _key_colons(value) -> int:
    """The ':' that the JSON text of a parsed value holds, written with no ':' escaped: one per
    key and those inside its strings."""
    count, todo = 0, [value]
    while todo:
        v = todo.pop()
        if type(v) is dict:
            count += len(v) + "".join(v).count(":")
            values = list(v.values())
        elif type(v) is list:
            values = v
        elif type(v) is str:
            count += v.count(":")
            continue
        else:
            continue
        kinds = set(map(type, values))
        if kinds == {str}:  # a weight_map's values: one join, in C
            count += "".join(values).count(":")
        elif kinds & {dict, list, str}:
            todo.extend(values)
    return count


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    out = dict(pairs)  # one C call per object; the loop only when a key repeats
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
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


def header_bytes(path: str, pread, file_size: int) -> bytes:
    """The header's JSON bytes, after checking its length against the limit and the file."""
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
    return raw


def decode_header(path: str, raw: bytes) -> dict:
    """The header object from its JSON bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: header is not valid UTF-8") from None
    header = loads_untrusted(text, f"{path}: header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    return header


def header_entries(path: str, raw: bytes, file_size: int, file_id: tuple = ()) -> list[TensorEntry]:
    """`parse_entries` of the header whose JSON bytes are `raw`. The usual header (what
    safetensors writes) is parsed without a hook and checked a whole column at a time
    (`_usual_entries`); anything else, or anything wrong, goes the strict way, one entry at a time,
    which gives exactly its answer or error."""
    if len(raw) >= SCAN_MIN_BYTES:
        entries = _scanned_entries(path, raw, 8 + len(raw), file_size, file_id)
        if entries is not None:
            return entries
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8 or not JSON: the strict path names it
        header = None
    if type(header) is dict and b"\\u003a" not in raw and b"\\u003A" not in raw:  # no ":" written as an escape
        entries = _usual_entries(path, header, 8 + len(raw), file_size, file_id, raw.count(b":"))
        if entries is not None:
            return entries
    return parse_entries(path, decode_header(path, raw), 8 + len(raw), file_size, file_id)


SCAN_MIN_BYTES = 8 << 10  # headers this long are scanned (`kernels.headers`) before they are parsed as JSON
_USUAL_METADATA = b'{"__metadata__":{"format":"pt"},'


def _scanned_entries(path: str, raw: bytes, data_start: int, file_size: int, file_id: tuple):
    """`parse_entries`'s answer for a header in safetensors' own form (`kernels.headers`), whose
    columns are split from its text, with the checks of `_usual_entries`; None for any other header.
    A long header costs a third of its JSON parse: no dict or list per entry."""
    import numpy as np

    from ..kernels.headers import scan_header

    if raw.startswith(_USUAL_METADATA):
        start = len(_USUAL_METADATA)
    elif raw.startswith(b'{"') and not raw.startswith(b'{"__metadata__"'):
        start = 1
    else:
        return None
    rows = raw.count(b'"data_offsets":[')
    offsets = np.empty((rows, 2), np.int64)
    if not rows or scan_header(np.frombuffer(raw, np.uint8), start, offsets) != rows:
        return None
    # split at its quotes (no escapes: the scan admits printable ASCII without a backslash), an entry is ten
    # pieces: NAME, ':{', 'dtype', ':', DTYPE, ',', 'shape', ':[SHAPE],', 'data_offsets', ':[A,B]},'
    parts = str(memoryview(raw)[start:], "ascii").split('"')  # decoded in place: no copy of the bytes first
    names, dtypes, shape_texts = parts[1::10], parts[5::10], parts[8::10]
    if len(set(names)) != rows or "__metadata__" in names:
        return None
    dims = {t: tuple(map(int, t[2:-2].split(","))) if t != ":[]," else () for t in set(shape_texts)}
    sizes = list(map(DTYPE_SIZES.get, dtypes))
    if None in sizes or any(0 in d for d in dims.values()):
        return None
    numel = {t: math.prod(d) for t, d in dims.items()}
    starts, stops = offsets.T.tolist()
    return _laid_out(path, names, dtypes, list(map(dims.__getitem__, shape_texts)),
                     list(map(numel.__getitem__, shape_texts)), sizes, starts, stops, data_start, file_size, file_id)


def _usual_entries(path: str, header: dict, data_start: int, file_size: int, file_id: tuple, colons: int):
    """`parse_entries`'s answer for a header that passes all its checks with room to spare: entries
    of exactly dtype, shape and data_offsets, no zero-size tensor, no repeated key; None for any
    other header (then the strict path decides). Each check runs over a whole column in C (map,
    set, min/max), not entry by entry.

    Repeated keys (which the plain parse drops silently) are ruled out by counting ':': every key
    puts exactly one outside strings, so the JSON's count equals the parsed keys plus the ':' in
    the strings exactly when no key repeats (given no ':' written as a \\u escape: the caller's test)."""
    names = list(header)
    infos = list(header.values())
    meta = header.get("__metadata__", {})
    if "__metadata__" in header:
        if meta is None:
            meta = {}
        if type(meta) is not dict or set(map(type, meta.values())) - {str}:
            return None
        i = names.index("__metadata__")
        del names[i], infos[i]
    keys = "".join(names)
    if not names or not is_text(keys) or not all(map(is_text, meta)) or not all(map(is_text, meta.values())):
        return None
    if set(map(type, infos)) != {dict} or set(map(len, infos)) != {3}:
        return None
    wanted = len(header) + 3 * len(infos) + len(meta) + keys.count(":") + \
        sum(k.count(":") + v.count(":") for k, v in meta.items())
    if wanted != colons:
        return None
    try:
        dtypes = list(map(itemgetter("dtype"), infos))
        shapes = list(map(itemgetter("shape"), infos))
        offs = list(map(itemgetter("data_offsets"), infos))
        sizes = list(map(DTYPE_SIZES.get, dtypes))
    except (KeyError, TypeError):  # a key missing, an unhashable dtype
        return None
    if None in sizes or set(map(type, shapes)) != {list} or set(map(type, offs)) != {list}:
        return None
    dims = list(chain.from_iterable(shapes))
    if dims and (set(map(type, dims)) != {int} or min(dims) <= 0):
        return None
    if set(map(len, offs)) != {2}:
        return None
    starts, stops = list(map(itemgetter(0), offs)), list(map(itemgetter(1), offs))
    if set(map(type, starts)) | set(map(type, stops)) != {int}:
        return None
    return _laid_out(path, names, dtypes, shapes, list(map(math.prod, shapes)), sizes, starts, stops, data_start,
                     file_size, file_id)


def _laid_out(path: str, names: list, dtypes: list, shapes: list, numels: list, sizes: list, starts: list,
              stops: list, data_start: int, file_size: int, file_id: tuple):
    """The entries of a header given as checked columns whose sizes match their data_offsets and
    tile the file, in file order; None for any other (the strict path decides)."""
    nbytes = list(map(mul, numels, sizes))
    if list(map(sub, stops, starts)) != nbytes:  # (then no size passes the file's, nor 2**63: checked below)
        return None
    first = sorted(starts)
    if first == starts:  # listed in file order, as safetensors writes them: nothing to reorder
        last, pick = stops, list
    else:
        order = sorted(range(len(starts)), key=starts.__getitem__)
        first, last = list(map(starts.__getitem__, order)), list(map(stops.__getitem__, order))
        pick = itemgetter(*order) if len(order) > 1 else lambda xs: (xs[order[0]],)
    if first[0] != 0 or first[1:] != last[:-1] or data_start + last[-1] != file_size:  # contiguous, whole file
        return None
    return entries_of_columns(map(sys.intern, pick(names)), pick(dtypes), map(tuple, pick(shapes)), repeat(path),
                    map(add, first, repeat(data_start)), pick(nbytes), repeat(file_id))


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

    One plain loop with inexpensive checks (an MoE checkpoint has 100k entries per model): names
    are checked for Unicode all at once (one by one, in order, only when that fails), and entries
    are built as plain named tuples.
    """
    names_ok = is_text("".join(header))  # JSON object keys are strings
    found = []  # (offset, nbytes, position in the header, name, dtype, shape): sorted by offset below
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(is_text(k) and is_text(v) for k, v in info.items())
            ):
                raise InputError(f"{path}: __metadata__ must map strings to strings")
            continue
        if not names_ok and not is_text(name):
            raise InputError(f"{_Where(path, name)}: the tensor name is not valid Unicode (lone surrogate)")
        if type(info) is not dict:
            raise InputError(f"{_Where(path, name)}: entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
        if size is None:
            _bad_dtype(_Where(path, name), dtype)
        if type(shape) is not list:
            _bad_shape(_Where(path, name), shape)
        for s in shape:
            if type(s) is not int or s < 0 or s > MAX_INT:
                _bad_shape(_Where(path, name), shape)
        numel = math.prod(shape)
        if numel > MAX_INT or (not numel and math.prod(s for s in shape if s) > MAX_INT):
            raise InputError(f"{_Where(path, name)}: shape {short(shape)} has more than 2**63 elements")
        if type(offs) is not list or len(offs) != 2:
            _bad_offsets(_Where(path, name), offs)
        start, stop = offs
        if type(start) is not int or type(stop) is not int or not 0 <= start <= stop <= MAX_INT:
            _bad_offsets(_Where(path, name), offs)
        nbytes = numel * size
        if stop - start != nbytes:
            raise InputError(
                f"{_Where(path, name)}: holds {stop - start} bytes but shape {short(shape)} x {dtype} needs {nbytes}"
            )
        if data_start + stop > file_size:
            raise InputError(f"{_Where(path, name)}: data ends at byte {data_start + stop}, past the end of the file "
                             f"({file_size}); truncated?")
        found.append((data_start + start, nbytes, len(found), name, dtype, shape))
    found.sort()
    entries = []
    pos = data_start
    for offset, nbytes, _, name, dtype, shape in found:
        if offset < pos:
            raise InputError(f"{path}: tensor {short(name)} overlaps the previous tensor")
        if offset > pos:
            raise InputError(f"{path}: {offset - pos} unused bytes before tensor {short(name)} (a hole)")
        pos = offset + nbytes
        # names interned: the base and every fine-tune name the same tensors (100k of them for an MoE model)
        entries.append(TensorEntry(sys.intern(name), dtype, tuple(shape), path, offset, nbytes, file_id))
    if pos != file_size:
        raise InputError(f"{path}: {file_size - pos} bytes after the last tensor; the file is malformed")
    return entries


def moved(entries: list[TensorEntry], path: str, file_id: tuple) -> list[TensorEntry]:
    """`entries` as the same header in another file of the same size makes them (sharded
    fine-tunes written by one tool repeat their base's headers byte for byte)."""
    return moved_columns(columns(entries), path, file_id)


def columns(entries: list[TensorEntry]) -> tuple[list, ...]:
    """What `moved_columns` needs of `entries` (names, dtypes, shapes, offsets, sizes): taken once
    for every checkpoint that repeats them."""
    return tuple(list(map(get, entries)) for get in (NAME, _DTYPE, _SHAPE, _OFFSET, _NBYTES))


def moved_columns(cols: tuple[list, ...], path: str, file_id: tuple) -> list[TensorEntry]:
    """`moved` of the entries whose `columns` are `cols`."""
    names, dtypes, shapes, offsets, nbytes = cols
    return entries_of_columns(names, dtypes, shapes, repeat(path), offsets, nbytes, repeat(file_id))


def _bad_dtype(where: _Where, dtype) -> None:
    if isinstance(dtype, str) and SMALL_FLOATS.match(dtype) and dtype not in FP8_DTYPES:
        raise InputError(f"{where}: dtype {short(dtype)} is a small float format dppa-stream does not read (FP8 "
                         "F8_E4M3/F8_E5M2 with scales and MXFP4 are supported); dequantize the checkpoint to bf16, "
                         "fp16 or fp32 first")
    raise InputError(f"{where}: unsupported dtype {short(dtype)}")


def _bad_shape(where: _Where, shape) -> None:
    raise InputError(f"{where}: shape {short(shape)} is not a list of non-negative integers below 2**63")


def _bad_offsets(where: _Where, offs) -> None:
    raise InputError(f"{where}: data_offsets {short(offs)} are not two ordered non-negative integers")


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors given as (name, dtype, shape), and each
    tensor's offset relative to the data start (`header_layout` on columns)."""
    names, dtypes, shapes = (list(c) for c in zip(*specs)) if specs else ([], [], [])
    nbytes = list(map(mul, map(math.prod, shapes), map(DTYPE_SIZES.__getitem__, dtypes)))
    header, order, starts = header_layout(names, dtypes, shapes, nbytes, metadata)
    return header, dict(zip(map(names.__getitem__, order), starts))


_NOT_PLAIN = bytes(range(32)) + b'\x7f"\\'  # what JSON escapes in an ASCII name, or isprintable refuses


def header_layout(names: list[str], dtypes: list[str], shapes: list[tuple], nbytes: list[int],
                  metadata: dict[str, str]) -> tuple[bytes, list[int], list[int]]:
    """The header of one file holding tensors given as columns (`nbytes`: each one's size): its
    bytes (length prefix included), the tensors' order in it (indexes into the columns) and each
    ordered tensor's offset relative to the data start.

    Ordered and padded exactly as `safetensors.torch.save_file` does (descending safetensors dtype
    order, then name; JSON padded with spaces to a multiple of 8), so our files are byte-identical
    to it. Every step maps a C function over whole columns (sorts, sums, the entries' text: the
    JSON `json.dumps(header, separators=(",", ":"), ensure_ascii=False)` writes, with each
    (dtype, shape)'s middle made once), as an MoE checkpoint has tens of thousands of entries."""
    n = len(names)
    kinds = set(dtypes)
    if len(kinds) == 1:
        order = sorted(range(n), key=names.__getitem__)  # names are unique
        kind = shapes  # what an entry's text between its name and offsets depends on
    else:
        rank = {d: -_SAVE_ORDER[d] for d in kinds}
        keys = list(zip(map(rank.__getitem__, dtypes), names))
        order = sorted(range(n), key=keys.__getitem__)
        kind = list(zip(dtypes, shapes))
    at = list(accumulate(map(nbytes.__getitem__, order), initial=0))
    # names that JSON leaves as they are (no quotes, backslashes, control characters) get their
    # quotes from the text around them (printable text without either: C scans, no escaped copy)
    joined = "".join(names)
    if joined.isascii():  # printable ASCII: no control characters (a byte scan, faster than isprintable's)
        plain = len(joined.encode().translate(None, _NOT_PLAIN)) == len(joined)
    else:
        plain = joined.isprintable() and '"' not in joined and "\\" not in joined
    q = '"' if plain or len(_quote(joined)) == len(joined) + 2 else ""

    def middle(d: str, shape: tuple) -> str:
        return f'{q}:{{"dtype":"{d}","shape":[{",".join(map(str, shape))}],"data_offsets":['

    middles = {k: middle(dtypes[0], k) if kind is shapes else middle(*k) for k in set(kind)}
    offsets = list(map(str, at))
    ordered = map(names.__getitem__, order)
    pieces = chain.from_iterable(zip(  # entry: "name":{"dtype":..,"shape":[..],"data_offsets":[start,end]},
        ordered if q else map(_quote, ordered), map(middles.__getitem__, map(kind.__getitem__, order)),
        offsets, repeat(","), islice(offsets, 1, None), repeat("]}," + q)))
    meta = '"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False) + "," if metadata else ""
    # the text (megabytes for an MoE shard) is joined, encoded and copied behind its length prefix:
    # three copies, each into fresh pages; concatenating it step by step made five
    if n or metadata:
        body = "".join(chain(("{", meta, q if n else ""), pieces)).encode()
        end = len(body) - 1 - (len(q) if n else 0)  # the last separator left out (a ',' and maybe a quote)
    else:
        body, end = b"{", 1
    pad = -(end + 1) % 8
    return b"".join((struct.pack("<Q", end + 1 + pad), memoryview(body)[:end], b"}" + b" " * pad)), order, at[:-1]
