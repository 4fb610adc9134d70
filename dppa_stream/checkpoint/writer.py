"""Writing sharded safetensors by positional writes into pre-laid-out files.

Every output tensor's name, dtype and shape is known before any data exists, so each shard's
header can be written first and the file sized to its final length. Any task on any worker can
then write any row range at a computed offset, in any order, with no shard buffered in memory;
the bytes cannot depend on scheduling. The layout equals `safetensors.torch.save_file`'s and the
HF sharding convention (greedy in tensor order, `model-0000i-of-0000N.safetensors`).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import threading
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import mul

import numpy as np

from ..durable import fsync_file, write_atomic
from ..errors import OutputError
from .format import DTYPE_SIZES, header_layout
from .reader import INDEX_NAME, SINGLE_NAME

FORMAT_METADATA = {"format": "pt"}


# hashable like a frozen dataclass, without its slower __init__ (one per output tensor)
@dataclass(slots=True, unsafe_hash=True)
class Placement:
    """Where an output tensor's bytes go: shard file name, absolute byte offset, bytes per element."""

    file: str
    offset: int
    itemsize: int


class Places:
    """Each tensor's Placement, in the order given, kept as columns (file, offset, itemsize): a
    Placement is made only where one is asked for, and a slice stays columns (pass 2 hands each
    work unit a slice; a batch of small tensors writes from the columns, `merge_pass.merge_batch`)."""

    __slots__ = ("files", "offsets", "itemsizes")

    def __init__(self, files: list[str], offsets: list[int], itemsizes: list[int]):
        self.files, self.offsets, self.itemsizes = files, offsets, itemsizes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Places(self.files[i], self.offsets[i], self.itemsizes[i])
        return Placement(self.files[i], self.offsets[i], self.itemsizes[i])


def file_offsets(places) -> tuple[list[str], np.ndarray]:
    """(file of each, int64 offsets) of `places`: `Places` columns as they are, or a sequence of
    Placements (a run that also writes quantized tensors hands its tasks those)."""
    if isinstance(places, Places):
        return places.files, np.array(places.offsets, np.int64)
    return [p.file for p in places], np.array([p.offset for p in places], np.int64)


class ShardLayout:
    """Output shards for tensors given in order as (name, dtype, shape). Made in one pass of C
    functions mapped over columns (sizes, the greedy split by bisection on their running sum, each
    shard's `header_layout`, the placements): an MoE output has tens of thousands of tensors."""

    def __init__(self, specs: list[tuple[str, str, tuple[int, ...]]], shard_size: int):
        self._lay_out(*((list(c) for c in zip(*specs)) if specs else ([], [], [])), shard_size)

    @classmethod
    def of_columns(cls, names: list[str], dtypes: list[str], shapes: list[tuple], shard_size: int,
                   nbytes: list[int] | None = None) -> "ShardLayout":
        """The layout of tensors given as columns (name, dtype and shape of each; `nbytes`: each
        one's size, where the caller knows it cheaper than from the shapes)."""
        layout = cls.__new__(cls)
        layout._lay_out(names, dtypes, shapes, shard_size, nbytes)
        return layout

    def _lay_out(self, names: list[str], dtypes: list[str], shapes: list[tuple], shard_size: int,
                 nbytes: list[int] | None = None) -> None:
        itemsizes = list(map(DTYPE_SIZES.__getitem__, dtypes))
        if nbytes is None:
            nbytes = list(map(mul, map(math.prod, shapes), itemsizes))
        at = list(accumulate(nbytes, initial=0))
        bounds = [0]  # greedy in tensor order: a shard takes tensors while they fit, and at least one
        while bounds[-1] < len(names):
            first = bounds[-1]
            bounds.append(max(bisect_right(at, at[first] + shard_size, first + 1) - 1, first + 1))
        if not names:
            bounds.append(0)  # one empty shard
        n = len(bounds) - 1
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.headers: dict[str, bytes] = {}
        self.file_sizes: dict[str, int] = {}
        files, offsets = [], []  # per tensor, in the order given (`place_columns`)
        self.total_size = at[-1]
        self._names = names
        for fname, lo, hi in zip(self.files, bounds, bounds[1:]):
            cols = [names, dtypes, shapes, nbytes]
            if n > 1:
                cols = [c[lo:hi] for c in cols]
            header, order, starts = header_layout(*cols, FORMAT_METADATA)
            self.headers[fname] = header
            self.file_sizes[fname] = len(header) + at[hi] - at[lo]
            placed = np.empty(hi - lo, np.int64)  # header order's starts put back in the order given
            placed[order] = starts
            placed += len(header)
            offsets += placed.tolist()
            files += repeat(fname, hi - lo)
        self.place_columns = (files, offsets, itemsizes)

    @functools.cached_property
    def places(self) -> Places:
        """Each tensor's Placement, in the order given."""
        return Places(*self.place_columns)

    @functools.cached_property
    def placements(self) -> dict[str, Placement]:
        """Tensor name -> its Placement."""
        return dict(zip(self._names, map(Placement, *self.place_columns)))

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
            "weight_map": dict(sorted(zip(self._names, self.place_columns[0]))),
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
    return _write(folder, place.file, [(place.offset + at, data)])


def write_runs(folder: str, runs: list[tuple[Placement, np.ndarray]]) -> int:
    """Write each run's bytes (contiguous uint8) at its place: the runs of a batch of small
    tensors (`merge_pass.merge_batch`), with one open and one lock per file for all of them;
    returns bytes written."""
    by_file: dict[str, list] = {}
    for place, data in runs:
        by_file.setdefault(place.file, []).append((place.offset, data))
    return sum(_write(folder, file, parts) for file, parts in by_file.items())


def _write(folder: str, file: str, parts: list[tuple[int, np.ndarray]]) -> int:
    """Write each (absolute offset, bytes) of `parts` into output shard `file`; returns bytes written."""
    path = os.path.join(folder, file)
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise OutputError(f"{path}: cannot open output shard ({e.strerror})") from None
    written = 0
    try:
        with _file_lock(path):
            for offset, data in parts:
                view, done = memoryview(data), 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
                written += len(view)
    except OSError as e:
        raise OutputError(f"{path}: write failed ({e.strerror})") from None
    finally:
        os.close(fd)
    return written
