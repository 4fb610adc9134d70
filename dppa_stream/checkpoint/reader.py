"""Lazy reading of Hugging Face safetensors checkpoints.

`Checkpoint.open` builds a catalogue (name -> dtype, shape, file, byte range) from headers alone,
with each quantized weight's stored tensors folded into one logical tensor (`quant.fold`).
`read_range` fetches one element range of one tensor with a single positional read: exactly those
bytes, no mmap. Mapped pages would count in the process RSS and make Dask workers pause or get
killed; plain reads keep memory accounting honest and pickle trivially.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, short
from .format import (NAME, TensorEntry, columns, header_bytes, header_entries, is_text, loads_untrusted, moved,
                     moved_columns)
from .quant import fold, quant_method, relocate

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_JSON_FILE = 100_000_000  # an index or config.json larger than this is not a real one
SAMPLE = 1 << 16  # bytes hashed at the start, middle and end of each file: catches same-size rewrites

_fds: dict[str, tuple[tuple, int]] = {}  # path -> (file identity, descriptor)
_fds_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced or rewritten: device, inode, mtime, size and ctime
    (which no tool can set back, unlike mtime)."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def open_regular(path: str, what: str = "") -> tuple[int, os.stat_result]:
    """Open a file read-only, refusing anything but a regular file. O_NONBLOCK: opening a FIFO
    planted in a model folder must fail, not wait forever for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"{what or path}: cannot open ({e.strerror})") from None
    except ValueError:  # an embedded NUL byte
        raise InputError(f"{what or path}: not a valid file name") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what or path}: not a regular file")
    return fd, st


def _fd(entry: TensorEntry) -> int:
    """A per-process read-only descriptor of the entry's file, reused across tasks (fds cost no
    memory), and reopened if the file at that path was replaced since (long-lived workers)."""
    got = _fds.get(entry.file)
    if got is not None and got[0] == entry.file_id:
        return got[1]
    with _fds_lock:
        got = _fds.get(entry.file)
        if got is not None and got[0] == entry.file_id:
            return got[1]
        fd, st = open_regular(entry.file)
        if entry.file_id and _identity(st) != entry.file_id:
            os.close(fd)
            raise InputError(f"{entry.file}: the file changed while the merge was running")
        if got is not None:
            os.close(got[1])
        _fds[entry.file] = (entry.file_id, fd)
        return fd


def close_all() -> None:
    """Close cached descriptors (tests and long-lived workers call this between runs)."""
    with _fds_lock:
        for _, fd in _fds.values():
            os.close(fd)
        _fds.clear()


def _pickle_hint(path: str) -> InputError:
    return InputError(
        f"{path}: pickled PyTorch weights are refused (loading them can run arbitrary code); convert them "
        "to safetensors first, e.g. `python -c \"import torch, safetensors.torch as s; "
        "s.save_file(torch.load('IN.bin', weights_only=True), 'model.safetensors', {'format': 'pt'})\"`"
    )


def sample_digest(fd: int, size: int) -> str:
    """sha256 of the first, middle and last 64 KiB: a cheap content check that, with the file's
    identity, tells whether a file was rewritten in place (even with its mtime set back)."""
    h = hashlib.sha256()
    for off in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
        h.update(os.pread(fd, SAMPLE, off))
    return h.hexdigest()


@dataclass(frozen=True)
class Stamp:
    """A file as it was when catalogued; `changed()` says how it differs now (or None)."""

    path: str
    identity: tuple
    digest: str

    @classmethod
    def take(cls, path: str, fd: int, st: os.stat_result) -> "Stamp":
        return cls(path, _identity(st), sample_digest(fd, st.st_size))

    def changed(self) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return f"it can no longer be opened ({e.strerror})"
        try:
            now = os.fstat(fd)
            if _identity(now) != self.identity:
                return "its size, times or inode changed"
            if sample_digest(fd, now.st_size) != self.digest:
                return "its content changed"
        finally:
            os.close(fd)
        return None


def _scan_file(path: str, stamps: dict | None = None, known: dict | None = None) -> list[TensorEntry]:
    """A file's entries. `known`: (header bytes, file size) -> entries of files already scanned
    (a fine-tune whose shards repeat the base's headers is not parsed and checked again)."""
    raw, st = _head(path, stamps)
    return _entries(path, raw, st, known)


def _head(path: str, stamps: dict | None) -> tuple[bytes, os.stat_result]:
    """A safetensors file's header bytes and stat, its Stamp taken into `stamps`."""
    fd, st = open_regular(path)
    try:
        raw = header_bytes(path, lambda n, offset: os.pread(fd, n, offset), st.st_size)
        if stamps is not None:
            stamps[path] = Stamp.take(path, fd, st)
    finally:
        os.close(fd)
    return raw, st


def _entries(path: str, raw: bytes, st: os.stat_result, known: dict | None) -> list[TensorEntry]:
    same = known.get((raw, st.st_size)) if known is not None else None
    if same is not None:
        return moved(same, path, _identity(st))
    entries = header_entries(path, raw, st.st_size, _identity(st))
    if known is not None:
        known[raw, st.st_size] = entries
    return entries


@dataclass(eq=False)
class Layout:
    """What a sharded checkpoint is apart from where its files are: its index and shard headers
    (bytes), and what was checked and built from them. A fine-tune whose index, shard headers and
    shard sizes repeat these byte for byte (one tool wrote them all) has the same names, shapes,
    dtypes, mapping and quantization, so only its entries are relocated: no second pass of checks."""

    shards: list[tuple[str, bytes, int, list[TensorEntry]]]  # (file name in the index, header, size, entries)
    quant: tuple  # quant_method's answer for its config.json (the fold depends on it)
    tensors: dict[str, object]  # the catalogue
    token: object = field(default_factory=object)  # what the checkpoints opened from it share (`Checkpoint.layout`)
    moves: list | None = None  # each shard's entries as `format.columns`, taken at the first relocation

    def columns(self) -> list[tuple]:
        if self.moves is None:
            self.moves = [columns(entries) for *_, entries in self.shards]
        return self.moves


def _relocated(layout: Layout, folder: str, index: str, stamps: dict) -> tuple[list[str], dict] | None:
    """(files, catalogue) of the checkpoint in `folder` whose index repeats `layout`'s, or None if
    any shard's header or size, or its quantization config, differs (then it is opened from scratch)."""
    files, entries = _shard_paths(folder, [rel for rel, *_ in layout.shards], index), []
    for (rel, raw, size, _), cols, full in zip(layout.shards, layout.columns(), files):
        _check_shard(full, rel, index)
        got, st = _head(full, stamps)
        if st.st_size != size or got != raw:
            return None
        entries += moved_columns(cols, full, _identity(st))
    if quant_method(folder_config(folder), os.path.join(folder, "config.json")) != layout.quant:
        return None
    return files, relocate(layout.tensors, entries)


def _shard_paths(folder: str, rels, index: str) -> list[str]:
    """The real paths of an index's shard files (every name checked before any file is opened)."""
    roots = model_roots(folder)  # once for the folder, not per shard
    return [resolve_inside(folder, rel, index, "shard filename", roots) for rel in rels]


def _check_shard(full: str, rel: str, index: str) -> None:
    if not os.path.isfile(full):
        what = "missing" if not os.path.lexists(full) else "not a regular file"
        raise InputError(f"{index}: shard {short(rel)} is {what}")


# --- where a model's files may live -------------------------------------------------------------


def model_roots(folder: str) -> tuple[str, ...]:
    """The folders a model folder's files may resolve into: the folder itself and, when it is a
    Hugging Face cache snapshot (models--ORG--NAME/snapshots/REV/...), the cache repository folder
    models--ORG--NAME, whose blobs/ the snapshot's symlinks point into. Nothing else."""
    real = os.path.realpath(folder)
    roots = [real]
    child, up = real, os.path.dirname(real)
    while up != child:
        if os.path.basename(up) == "snapshots" and child != up:
            repo = os.path.dirname(up)
            if os.path.basename(repo).startswith("models--") and os.path.isdir(os.path.join(repo, "blobs")):
                roots.append(repo)
            break
        child, up = up, os.path.dirname(up)
    return tuple(roots)


def check_relative(rel, where: str, what: str = "file name") -> None:
    """A name from an untrusted index must be a plain relative path inside the folder."""
    if not is_text(rel) or not rel or "\0" in rel or "\\" in rel or os.path.isabs(rel):
        raise InputError(f"{where}: {what} {short(rel)} must be a relative path inside the checkpoint folder")
    if ".." in rel.split("/"):
        raise InputError(f"{where}: {what} {short(rel)} contains '..'; names that may lead outside the checkpoint folder are refused")


def resolve_inside(folder: str, rel: str, where: str, what: str = "file name", roots: tuple | None = None) -> str:
    """The real path of `folder/rel`, following symlinks only while they stay inside the model's
    folder or its Hugging Face cache repository folder (see `model_roots`, or `roots` when the
    caller has them); InputError otherwise."""
    check_relative(rel, where, what)
    roots = roots or model_roots(folder)
    full = os.path.join(roots[0], rel)
    if "/" in rel or rel == "." or stat.S_ISLNK(_lstat_mode(full)):  # else `full` is real already: roots[0] is
        full = os.path.realpath(full)
    if not any(os.path.commonpath([full, r]) == r for r in roots):
        raise InputError(f"{where}: {what} {short(rel)} points outside the checkpoint folder (to {full}); "
                         "only links inside the model folder or its Hugging Face cache folder are followed")
    return full


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:  # missing (realpath leaves the name as it is) or unreadable: let realpath decide
        return stat.S_IFLNK


def read_json_file(path: str, where: str | None = None):
    """A small JSON file from a checkpoint folder (index, config.json), parsed defensively."""
    where = where or path
    return _parse_json(_read_small(path, where), where)


def _read_small(path: str, where: str) -> bytes:
    fd, st = open_regular(path, where)
    try:
        if st.st_size > MAX_JSON_FILE:
            raise InputError(f"{where}: {st.st_size} bytes is too large for a JSON file of a checkpoint")
        return os.pread(fd, st.st_size + 1, 0)
    finally:
        os.close(fd)


def _parse_json(raw: bytes, where: str):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where}: not valid UTF-8") from None
    return loads_untrusted(text, where)


@dataclass
class Checkpoint:
    """A safetensors checkpoint: a folder (single file or sharded index) or one bare file.
    `tensors` is the logical catalogue (TensorEntry, or quant.Quantized for a quantized weight)."""

    path: str
    tensors: dict[str, object]
    folder: str | None = None  # where config.json / tokenizer files live, if any
    files: list[str] = field(default_factory=list)
    stamps: dict[str, Stamp] = field(default_factory=dict)  # each weight file as catalogued
    # the same object for checkpoints opened from the same index and headers (`Layout`: same names, shapes,
    # dtypes), else None; a token, not the Layout, which holds the header bytes only while opening
    layout: object = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str, known: dict | None = None) -> "Checkpoint":
        """`known`: headers seen in checkpoints opened before (see `_scan_file`), added to."""
        path = os.path.abspath(os.path.expanduser(path))
        stamps: dict[str, Stamp] = {}
        if os.path.isfile(path):
            if path.endswith(PICKLE_SUFFIXES):
                raise _pickle_hint(path)
            entries = _scan_file(path, stamps)
            return cls(path, _catalogue(entries, path, None), None, [path], stamps)
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise InputError(f"{path}: not a checkpoint file or folder (a device, FIFO or socket?)")
            raise InputError(f"{path}: no such checkpoint file or folder")
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.lexists(index):
            return cls._open_sharded(path, resolve_inside(path, INDEX_NAME, index, "index"), known)
        if os.path.lexists(single):
            full = resolve_inside(path, SINGLE_NAME, single, "weights file")
            return cls(path, _catalogue(_scan_file(full, stamps), path, path), path, [full], stamps)
        pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise _pickle_hint(os.path.join(path, pickled[0]))
        raise InputError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in this folder")

    @classmethod
    def _open_sharded(cls, folder: str, index: str, known: dict | None) -> "Checkpoint":
        """A sharded checkpoint; one that repeats a `known` checkpoint's index and headers byte for
        byte reuses its checks and catalogue (see `Layout`)."""
        stamps: dict[str, Stamp] = {}
        raw = _read_small(index, index)
        layout = known.get(("index", raw)) if known is not None else None
        if layout is not None:
            got = _relocated(layout, folder, index, stamps)
            if got is not None:
                return cls(folder, got[1], folder, got[0], stamps, layout.token)
            stamps.clear()
        files, shards = cls._read_index(folder, index, _parse_json(raw, index), stamps, known)
        entries = [e for *_, got in shards for e in got]
        tensors = _catalogue(entries, folder, folder)
        layout = Layout(shards, quant_method(folder_config(folder), os.path.join(folder, "config.json")), tensors)
        if known is not None:
            known.setdefault(("index", raw), layout)
        return cls(folder, layout.tensors, folder, files, stamps, layout.token)

    @classmethod
    def from_headers(cls, folder: str, files: list[tuple[str, object, int]]) -> "Checkpoint":
        """The catalogue of a folder whose weight files are not on disk yet (a download), from each
        file's (path, pread, size): the same header checks as `open`, no data read."""
        entries = []
        for path, pread, size in files:
            entries.extend(header_entries(path, header_bytes(path, pread, size), size))
        return cls(folder, _catalogue(entries, folder, folder), folder, [f for f, _, _ in files])

    @staticmethod
    def _read_index(folder: str, index: str, data, stamps: dict, known: dict | None = None) -> tuple[list[str], list]:
        """(shard paths, each shard's (file name, header, size, entries)) of an index's checkpoint."""
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise InputError(f"{index}: needs a non-empty 'weight_map' object")
        if not is_text("".join(wmap)) or set(map(type, wmap.values())) != {str}:  # a column at a time, in C
            seen = set()
            for name, rel in wmap.items():  # the first bad name or file name, in order
                if not is_text(name):
                    raise InputError(f"{index}: tensor name {short(name)} is not valid Unicode")
                if not isinstance(rel, str) or rel not in seen:
                    resolve_inside(folder, rel, index, "shard filename")
                    seen.add(rel)
        counts = Counter(wmap.values())  # shard -> how many tensors the index puts there
        files = _shard_paths(folder, counts, index)
        shards = []
        for rel, full in zip(counts, files):
            _check_shard(full, rel, index)
            raw, st = _head(full, stamps)
            got = _entries(full, raw, st, known)
            if list(map(wmap.get, map(NAME, got))).count(rel) != len(got):  # some entry mapped elsewhere
                e = next(e for e in got if wmap.get(e.name) != rel)
                raise InputError(f"{full}: tensor {short(e.name)} is not mapped to this shard in {INDEX_NAME}")
            if len(got) != counts[rel]:  # names in a shard are unique: fewer stored than mapped
                stored = {e.name for e in got}
                missing = min(n for n, r in wmap.items() if r == rel and n not in stored)
                raise InputError(f"{index}: tensor {short(missing)} is mapped to {short(rel)} but not stored there")
            shards.append((rel, raw, st.st_size, got))
        return files, shards

    def read_config(self) -> dict | None:
        """config.json of a folder checkpoint, or None; InputError if present but not a JSON object."""
        return folder_config(self.folder)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def folder_config(folder: str | None) -> dict | None:
    """config.json of a model folder, or None; InputError if present but not a JSON object."""
    if not folder:
        return None
    p = os.path.join(folder, "config.json")
    if not os.path.lexists(p):
        return None
    cfg = read_json_file(resolve_inside(folder, "config.json", p), p)
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: not a JSON object")
    return cfg


def _catalogue(entries: list[TensorEntry], where: str, folder: str | None) -> dict[str, object]:
    by_name = dict(zip(map(NAME, entries), entries))
    if len(by_name) != len(entries):
        seen: set[str] = set()
        for e in entries:
            if e.name in seen:
                raise InputError(f"{where}: tensor {short(e.name)} is stored twice")
            seen.add(e.name)
    if not entries:
        raise InputError(f"{where}: holds no tensors")
    return fold(entries, folder_config(folder), os.path.join(folder, "config.json") if folder else where, by_name)


def read_range(entry: TensorEntry, lo: int, hi: int, buf: np.ndarray) -> None:
    """Read the flat elements [lo, hi) of a tensor into `buf` (bytes, exactly that many) with one
    positional read."""
    nbytes = (hi - lo) * entry.itemsize
    if not nbytes:
        return
    got = os.preadv(_fd(entry), [buf], entry.offset + lo * entry.itemsize)
    if got != nbytes:
        raise InputError(f"{entry.file}: short read of tensor {short(entry.name)} (file changed or truncated?)")


def read_run(first: TensorEntry, buf: np.ndarray) -> None:
    """Read `buf` (bytes) from `first`'s file at `first`'s offset with one positional read: tensors
    stored back to back from `first` on (`units.BatchRows`)."""
    got = os.preadv(_fd(first), [buf], first.offset)
    if got != buf.nbytes:
        raise InputError(f"{first.file}: short read of the tensors from {short(first.name)} on (file changed or "
                         "truncated?)")


def read_rows(entry: TensorEntry, start: int, stop: int):
    """Rows [start, stop) of a tensor as a torch tensor (for tests and tools; the merge reads raw
    bytes with `read_range`)."""
    import torch

    from .format import DTYPES

    shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
    if not (stop - start) * entry.row_numel:
        return torch.empty(shape, dtype=DTYPES[entry.dtype][0])
    buf = np.empty((stop - start) * entry.row_numel * entry.itemsize, np.uint8)  # the read fills every byte
    read_range(entry, start * entry.row_numel, stop * entry.row_numel, buf)
    return torch.from_numpy(buf).view(DTYPES[entry.dtype][0]).reshape(shape)
