"""A zarr store of pass-1 results, kept in the output's work folder so a resumed run (and the
factor search) never recomputes statistics it already has, and so that a run does not hold them
in memory: an MoE model's statistics (a histogram per tensor and fine-tune) outgrow any budget.

Results are saved in batches, each as ONE int64 array (zarr costs milliseconds per array, and a
model has up to 100k tensors): the packed records concatenated, with a JSON index in the array's
attributes mapping "tensor|stat key" to (offset, length). In memory the store keeps that index
only; a record is read back when asked for, through a cache of the last chunk read (records are
asked for in about the order they were written). Histograms come back as summaries that load
their bins only while they are being queried.
"""

from __future__ import annotations

import hashlib
import os
from itertools import chain

import numpy as np

from .errors import OutputError, printable
from .durable import fault_point, fsync_tree
from .statistics import Stat
from .summaries import size_batches


def _digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data, np.int64).data).hexdigest()  # hashed in place, not copied


def _damaged(path: str, e: Exception) -> OutputError:
    return OutputError(f"{path}: the statistics store is damaged ({printable(str(e) or type(e).__name__, 100)}); delete "
                       "this folder (the statistics are recomputed) or pass --overwrite to start over")


CHUNK = 1 << 20  # int64 values per zarr chunk (8 MiB): the unit of reading back
_OFF, _LEN = 1 << 44, 1 << 32  # a record's place as one int: (array * 2**44 + offset) * 2**32 + length


def _codec():
    """Blosc's LZ4 on byte-shuffled values: records of small integers shrink about as much as with
    zarr's default zstd (~8x), and a chunk is written 3x and read back 3x faster, which DPPA's plan
    (every linear's histogram read back twice) waits on."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _pack(array: int, offset: int, length: int) -> int:
    if not (0 <= offset < _OFF and 0 <= length < _LEN):
        raise ValueError("a batch has a bad index")
    return (array * _OFF + offset) * _LEN + length


def _unpack(where: int) -> tuple[int, int, int]:
    rest, length = divmod(where, _LEN)
    return (*divmod(rest, _OFF), length)


class StatsStore:
    """Statistics by (tensor, Stat), persisted in a zarr group, one array per saved batch.

    A batch is committed by its attributes (index and sha256 of the data), written after the data
    is synced; a batch without them is an interrupted write and ignored. A committed batch that
    does not verify, or a store that cannot be read or written, is an OutputError (exit 4) that
    says how to go on."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, int] | None = None  # opened on first use (`_open`)

    def _open(self) -> dict[str, int]:
        """Open (or create) the group and index its committed batches: on first use, so a run
        that stores nothing (a local method's tensors planned inside pass 2) never imports zarr
        nor creates it. A damaged store is an OutputError then (and again at each later use)."""
        try:
            self._load()
        except BaseException:
            self._where = None
            raise
        return self._where

    @property
    def group(self):
        """The zarr group (opened on first use)."""
        if self._where is None:
            self._open()
        return self._group

    def _load(self) -> None:
        import zarr  # imported here: it adds ~0.3 s to every start-up otherwise

        path = self.path
        self._where = {}  # record key -> where it is (`_pack`: one int, not a tuple of three)
        self._arrays: list = []
        self._chunk: tuple = (None, None, None)  # (array, chunk number, values) read last
        try:
            self._group = zarr.open_group(path, mode="a")
            names = sorted(self._group.array_keys())
        except Exception as e:  # noqa: BLE001 - any failure to open our own cache is damage
            raise _damaged(path, e) from None
        self._saved = len(names)
        for name in names:
            try:
                arr = self._group[name]
                attrs = dict(arr.attrs)
                if "index" not in attrs:
                    continue  # never committed: a run stopped while writing it
                self._verify(name, arr, attrs.get("sha256"))
                self._add(arr, attrs["index"])
            except Exception as e:  # noqa: BLE001
                raise _damaged(path, e) from None

    def _verify(self, name: str, arr, digest: str | None) -> None:
        """Check a batch against its checksum, reading it chunk by chunk."""
        h = hashlib.sha256()
        for start in range(0, arr.shape[0], CHUNK):
            h.update(np.ascontiguousarray(arr[start:start + CHUNK], np.int64).data)
        if digest is not None and h.hexdigest() != digest:
            raise ValueError(f"{name} does not match its checksum")

    def _add(self, arr, index: dict) -> None:
        a, size = len(self._arrays), arr.shape[0]
        self._arrays.append(arr)
        for key, (off, length) in index.items():
            if not (isinstance(key, str) and 0 <= off and off + length <= size):
                raise ValueError("a batch has a bad index")
            self._where[key] = _pack(a, off, length)
        # the array's in-memory metadata keeps its attributes, JSON-decoded: ~270 B per record
        # beside the ~120 B of `_where`; reads need neither (the file keeps the index)
        getattr(getattr(arr, "metadata", None), "attributes", {}).pop("index", None)

    def _read(self, where: int) -> np.ndarray:
        """One record, through the cache of the last chunk read."""
        return self._read_at(*_unpack(where))

    def _read_at(self, a: int, off: int, length: int) -> np.ndarray:
        parts = []
        while length > 0:
            c, at = divmod(off, CHUNK)
            if self._chunk[:2] != (a, c):
                try:
                    values = np.asarray(self._arrays[a][c * CHUNK:(c + 1) * CHUNK], np.int64)
                except Exception as e:  # noqa: BLE001 - damaged since it was opened
                    raise _damaged(self.path, e) from None
                self._chunk = (a, c, values)
            take = min(length, CHUNK - at)
            parts.append(self._chunk[2][at:at + take])
            off, length = off + take, length - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def has(self, tensor: str, stat: Stat) -> bool:
        return f"{tensor}|{stat.key()}" in (self._where if self._where is not None else self._open())

    def get(self, tensor: str, stat: Stat):
        where = (self._where if self._where is not None else self._open()).get(f"{tensor}|{stat.key()}")
        if where is None:
            return None
        return stat.unpack(self._read(where), (self._read, where))  # a tuple: a partial costs more per summary

    def batches(self, keys, limit: int):
        """The records stored under `keys` (every one there), `limit` values or so at a time, in
        the order they are stored (each chunk is read once, however the keys are ordered): (the
        records' positions in `keys`, their values concatenated, where each begins and the end).
        For a caller that reads many records as columns (`summaries.Histograms`)."""
        where = self._where if self._where is not None else self._open()
        places = np.fromiter(chain.from_iterable(_unpack(where[k]) for k in keys), np.int64).reshape(-1, 3)
        # (array, offset, length) per record
        order = np.lexsort((places[:, 1], places[:, 0]))
        places = places[order]
        # record k + 1 continues record k in the store (a round's records lie back to back): each run of
        # them is copied in one piece, not record by record
        follows = np.zeros(len(places), np.bool_)
        follows[1:] = (places[1:, 0] == places[:-1, 0]) & (places[1:, 1] == places[:-1, 1] + places[:-1, 2])
        for lo, hi in size_batches(places[:, 2].tolist(), limit):
            starts = np.zeros(hi - lo + 1, np.int64)
            np.cumsum(places[lo:hi, 2], out=starts[1:])
            values = np.empty(int(starts[-1]), np.int64)
            runs = [0, *(np.flatnonzero(~follows[lo + 1:hi]) + 1).tolist(), hi - lo]
            for i, j in zip(runs, runs[1:]):
                a, off = places[lo + i, :2].tolist()
                values[starts[i]:starts[j]] = self._read_at(a, off, int(starts[j] - starts[i]))
            yield order[lo:hi], values, starts

    def put(self, items: dict) -> None:
        """Save {(tensor, Stat): value} as one batch, each statistic's records back to back (a
        plan reads one statistic of many tensors at a time, e.g. one fine-tune's histograms:
        `batches` copies each run of them in one piece)."""
        if not items:
            return
        if self._where is None:
            self._open()
        by_stat: dict[str, list] = {}
        for (tensor, stat), value in items.items():
            by_stat.setdefault(stat.key(), []).append((tensor, stat, value))
        index, parts, off = {}, [], 0
        for key, group in by_stat.items():
            for tensor, stat, value in group:
                packed = stat.pack(value)
                packed = packed if isinstance(packed, list) else [packed]
                length = sum(map(len, packed))
                index[f"{tensor}|{key}"] = (off, length)
                parts += packed
                off += length
        data = np.concatenate(parts).astype(np.int64, copy=False)
        del parts
        name = f"round-{self._saved:04d}"
        import zarr

        try:
            # metadata JSON without indentation: a round's index names thousands of records, and
            # zarr's default indent made its write 3x slower
            with zarr.config.set({"json_indent": None}):
                arr = self._group.create_array(name=name, data=data, chunks=(CHUNK,), overwrite=True,
                                               compressors=_codec())
                fsync_tree(os.path.join(self.path, name))
                # the commit, in one metadata write (`attrs.update` rewrote the metadata once per key)
                arr.update_attributes({"index": index, "sha256": _digest(data)})
            fsync_tree(os.path.join(self.path, name))
        except Exception as e:  # noqa: BLE001 - disk full, quota, I/O error: all exit 4
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise OutputError(f"{self.path}: cannot save statistics ({reason}); free space, then rerun with "
                              "--resume (finished statistics are kept)") from None
        self._saved += 1
        self._add(arr, index)
        fault_point("stats", self._saved)
