"""Lazy reading of Hugging Face safetensors checkpoints.

`Checkpoint.open` builds a catalogue (name -> dtype, shape, file, byte range) from headers alone.
`read_rows` fetches one row range of one tensor with a single positional read: exactly those
bytes, no mmap. Mapped pages would count in the process RSS and make Dask workers pause or get
killed (engineering-notes §3.6); plain reads keep memory accounting honest and pickle trivially.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .format import TensorEntry, parse_entries, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_fds: dict[str, tuple[tuple, int]] = {}  # path -> (file identity, descriptor)
_fds_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


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
        try:
            fd = os.open(entry.file, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"{entry.file}: cannot open ({e.strerror})") from None
        if entry.file_id and _identity(os.fstat(fd)) != entry.file_id:
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


def _scan_file(path: str) -> list[TensorEntry]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        header, data_start = read_header(path, fd, st.st_size)
    finally:
        os.close(fd)
    ident = _identity(st)
    return [dataclasses.replace(e, file_id=ident) for e in parse_entries(path, header, data_start, st.st_size)]


def _inside(folder: str, rel: str, index_path: str) -> str:
    """Resolve a shard filename from an index, refusing anything that leaves the folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise InputError(f"{index_path}: shard filename {rel!r} must be a relative path inside the checkpoint folder")
    full = os.path.realpath(os.path.join(folder, rel))
    root = os.path.realpath(folder)
    if os.path.commonpath([full, root]) != root:
        raise InputError(f"{index_path}: shard filename {rel!r} points outside the checkpoint folder")
    return full


@dataclass
class Checkpoint:
    """A safetensors checkpoint: a folder (single file or sharded index) or one bare file."""

    path: str
    tensors: dict[str, TensorEntry]
    folder: str | None = None  # where config.json / tokenizer files live, if any
    files: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str) -> "Checkpoint":
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isfile(path):
            if path.endswith(PICKLE_SUFFIXES):
                raise _pickle_hint(path)
            entries = _scan_file(path)
            return cls(path, _catalogue(entries, path), None, [path])
        if not os.path.isdir(path):
            raise InputError(f"{path}: no such checkpoint file or folder")
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.isfile(index):
            files, entries = cls._read_index(path, index)
        elif os.path.isfile(single):
            files, entries = [single], _scan_file(single)
        else:
            pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            if pickled:
                raise _pickle_hint(os.path.join(path, pickled[0]))
            raise InputError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in this folder")
        return cls(path, _catalogue(entries, path), path, files)

    @staticmethod
    def _read_index(folder: str, index: str) -> tuple[list[str], list[TensorEntry]]:
        try:
            with open(index, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except OSError as e:
            raise InputError(f"{index}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{index}: not valid JSON ({e})") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise InputError(f"{index}: needs a non-empty 'weight_map' object")
        files: dict[str, str] = {}
        for name, rel in wmap.items():
            if not isinstance(rel, str) or rel not in files:  # _inside refuses non-strings
                files[rel] = _inside(folder, rel, index)
        entries = []
        for rel, full in files.items():
            if not os.path.isfile(full):
                raise InputError(f"{index}: shard {rel!r} is missing")
            got = _scan_file(full)
            for e in got:
                if wmap.get(e.name) != rel:
                    raise InputError(f"{full}: tensor {e.name!r} is not mapped to this shard in {INDEX_NAME}")
            missing = {n for n, r in wmap.items() if r == rel} - {e.name for e in got}
            if missing:
                raise InputError(f"{index}: tensor {sorted(missing)[0]!r} is mapped to {rel!r} but not stored there")
            entries.extend(got)
        return list(files.values()), entries

    def read_config(self) -> dict | None:
        """config.json of a folder checkpoint, or None."""
        if not self.folder:
            return None
        p = os.path.join(self.folder, "config.json")
        if not os.path.isfile(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                cfg = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: not valid JSON ({e})") from None
        return cfg if isinstance(cfg, dict) else None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _catalogue(entries: list[TensorEntry], where: str) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    for e in entries:
        if e.name in out:
            raise InputError(f"{where}: tensor {e.name!r} is stored twice")
        out[e.name] = e
    return out


def read_into(entry: TensorEntry, start: int, stop: int, buf: np.ndarray) -> None:
    """Read rows [start, stop) of a tensor into `buf` (bytes, exactly that many) with one
    positional read of exactly those bytes."""
    nbytes = (stop - start) * entry.row_numel * entry.itemsize
    if not nbytes:
        return
    got = os.preadv(_fd(entry), [buf], entry.offset + start * entry.row_numel * entry.itemsize)
    if got != nbytes:
        raise InputError(f"{entry.file}: short read of tensor {entry.name!r} (file changed or truncated?)")


def read_rows(entry: TensorEntry, start: int, stop: int):
    """Rows [start, stop) of a tensor as a torch tensor (for tests and tools; the merge reads raw
    bytes with `read_into`)."""
    import torch

    from .format import DTYPES

    shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
    if not (stop - start) * entry.row_numel:
        return torch.empty(shape, dtype=DTYPES[entry.dtype][0])
    buf = np.empty((stop - start) * entry.row_numel * entry.itemsize, np.uint8)  # the read fills every byte
    read_into(entry, start, stop, buf)
    return torch.from_numpy(buf).view(DTYPES[entry.dtype][0]).reshape(shape)
