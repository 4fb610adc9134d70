"""Writing sharded safetensors by positional writes into pre-laid-out files.

Every output tensor's name, dtype and shape is known before any data exists, so each shard's
header can be written first and the file sized to its final length. Any task on any worker can
then write any row range at a computed offset, in any order, with no shard buffered in memory;
the bytes cannot depend on scheduling. The layout equals `safetensors.torch.save_file`'s and the
HF sharding convention (greedy in tensor order, `model-0000i-of-0000N.safetensors`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..durable import fsync_file, write_atomic
from ..errors import OutputError
from .format import DTYPE_SIZES, build_header
from .reader import INDEX_NAME, SINGLE_NAME

FORMAT_METADATA = {"format": "pt"}


# hashable like a frozen dataclass, without its slower __init__ (one per output tensor)
@dataclass(slots=True, unsafe_hash=True)
class Placement:
    """Where an output tensor's bytes go: shard file name, absolute byte offset, bytes per element."""

    file: str
    offset: int
    itemsize: int


class ShardLayout:
    """Output shards for tensors given in order as (name, dtype, shape)."""

    def __init__(self, specs: list[tuple[str, str, tuple[int, ...]]], shard_size: int):
        groups: list[list] = [[]]
        sizes = [0]
        for spec in specs:
            nbytes = DTYPE_SIZES[spec[1]] * math.prod(spec[2])
            if groups[-1] and sizes[-1] + nbytes > shard_size:
                groups.append([])
                sizes.append(0)
            groups[-1].append(spec)
            sizes[-1] += nbytes
        n = len(groups)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.headers: dict[str, bytes] = {}
        self.file_sizes: dict[str, int] = {}
        self.placements: dict[str, Placement] = {}
        self.total_size = sum(sizes)
        for fname, group, size in zip(self.files, groups, sizes):
            header, offsets = build_header(group, FORMAT_METADATA)
            self.headers[fname] = header
            self.file_sizes[fname] = len(header) + size
            start = len(header)
            for name, dtype, _ in group:
                self.placements[name] = Placement(fname, start + offsets[name], DTYPE_SIZES[dtype])

    def preallocate(self, folder: str) -> None:
        """Write each shard's header and size the file (sparse) so rows can land anywhere."""
        for fname in self.files:
            path = os.path.join(folder, fname)
            try:
                with open(path, "wb") as f:
                    f.write(self.headers[fname])
                    f.truncate(self.file_sizes[fname])
                    _reserve(f.fileno(), self.file_sizes[fname])
            except OSError as e:
                raise OutputError(f"{path}: cannot create output shard of {self.file_sizes[fname] / 1e9:.2f} GB "
                                  f"({e.strerror})") from None

    def check_preallocated(self, folder: str) -> None:
        """For resume: every shard exists with its final size and header."""
        for fname in self.files:
            path = os.path.join(folder, fname)
            try:
                with open(path, "rb") as f:
                    ok = f.read(len(self.headers[fname])) == self.headers[fname] and os.fstat(f.fileno()).st_size == self.file_sizes[fname]
            except OSError:
                ok = False
            if not ok:
                raise OutputError(f"{path}: does not match the planned output layout; remove the partial output to start over")

    def index(self) -> dict | None:
        """`model.safetensors.index.json` content, or None for a single shard (HF convention)."""
        if len(self.files) == 1:
            return None
        return {
            "metadata": {"total_size": self.total_size},
            "weight_map": {name: p.file for name, p in sorted(self.placements.items())},
        }

    def finish(self, folder: str) -> None:
        """Flush shards to disk and write the index."""
        for fname in self.files:
            fsync_file(os.path.join(folder, fname))
        idx = self.index()
        if idx is not None:
            write_atomic(os.path.join(folder, INDEX_NAME), (json.dumps(idx, indent=2, sort_keys=True) + "\n").encode())


def _reserve(fd: int, size: int) -> None:
    """Reserve the disk space now, so a full disk fails at the start, not hours in."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # filesystem cannot reserve (e.g. some network filesystems): find out when writing
        raise


_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    """One lock per output file in this process. ext4 serialises buffered writes to one inode, and a
    thread waiting for that lock spins in the kernel (~5 % of a two-thread merge's CPU); waiting here
    sleeps instead, leaving the core to the other thread's compute."""
    with _file_locks_guard:
        return _file_locks.setdefault(path, threading.Lock())


def write_rows(folder: str, place: Placement, start: int, rows) -> int:
    """Write consecutive values starting at flat element `start` of the tensor (a numpy array of
    the stored bit patterns, or a torch tensor from tests and the demo generator) at their final
    position; returns bytes written."""
    if isinstance(rows, np.ndarray):
        data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
    else:
        import torch

        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
    return write_at(folder, place, start * place.itemsize, data)


def write_at(folder: str, place: Placement, at: int, data: np.ndarray) -> int:
    """Write bytes `data` (a contiguous uint8 array) at byte `at` of a tensor's place (a unit's
    FP8 codes and the scales of its blocks); returns bytes written."""
    path = os.path.join(folder, place.file)
    offset = place.offset + at
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise OutputError(f"{path}: cannot open output shard ({e.strerror})") from None
    try:
        view, done = memoryview(data), 0
        with _file_lock(path):
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise OutputError(f"{path}: write failed ({e.strerror})") from None
    finally:
        os.close(fd)
    return len(data)
