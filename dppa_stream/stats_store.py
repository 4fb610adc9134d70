"""A zarr store of pass-1 results, kept in the output's work folder so a resumed run (and the
factor search) never recomputes statistics it already has.

Each statistics round is saved as ONE int64 array (zarr costs milliseconds per array, and a model
has hundreds of tensors): the packed records concatenated, with a JSON index in the array's
attributes mapping "tensor|stat key" to (offset, length).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from .errors import OutputError, printable
from .output import fault_point
from .statistics import DareSums, Stat
from .summaries import Summary


def _digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data, np.int64).tobytes()).hexdigest()


def _damaged(path: str, e: Exception) -> OutputError:
    return OutputError(f"{path}: the statistics store is damaged ({printable(str(e) or type(e).__name__, 100)}); delete "
                       "this folder (the statistics are recomputed) or pass --overwrite to start over")


def _fsync_tree(folder: str) -> None:
    """Make a written round durable: its files, then its folders."""
    for root, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pack_summary(value: Summary) -> np.ndarray:
    nz = np.nonzero(value.hist)[0]
    return np.concatenate([[value.numel, len(nz)], nz, value.hist[nz], value.mant_sums]).astype(np.int64)


def _unpack_summary(a: np.ndarray) -> Summary:
    numel, n = int(a[0]), int(a[1])
    sparse = (a[2:2 + n].astype(np.int32), a[2 + n:2 + 2 * n].copy())
    return Summary(numel, None, a[2 + 2 * n:2 + 2 * n + 256].copy(), sparse=sparse)


def pack(stat: Stat, value) -> np.ndarray:
    """One statistic's result as an int64 array (float64 values stored by their bits)."""
    if stat.kind == "abs":
        return _pack_summary(value)
    if stat.kind == "arcee":
        nz = np.flatnonzero(value)
        return np.concatenate([[len(value)], nz, value[nz]]).astype(np.int64)
    if stat.kind == "var":
        return np.concatenate([[value[1]], _pack_summary(value[0])]).astype(np.int64)
    if stat.kind in ("gram", "sce_sq"):
        return np.array(value, np.float64).view(np.int64)
    if stat.kind == "ram":
        return np.array([*value[0], *value[1]], np.int64)
    if stat.kind in ("bins", "var_bins", "arcee_bins"):
        out = [len(value)]
        for unit in sorted(value):
            out += [unit, len(value[unit])]
            for vals, counts in value[unit]:
                out += [len(vals), *vals.tolist(), *counts.tolist()]
        return np.array(out, np.int64)
    return np.array([value.full, value.kept], np.float64).view(np.int64)


def unpack(stat: Stat, a: np.ndarray):
    if stat.kind == "abs":
        return _unpack_summary(a)
    if stat.kind == "arcee":
        hist = np.zeros(int(a[0]), np.int64)
        n = (len(a) - 1) // 2
        hist[a[1:1 + n]] = a[1 + n:]
        return hist
    if stat.kind == "var":
        return _unpack_summary(a[1:]), int(a[0])
    if stat.kind in ("gram", "sce_sq"):
        return a.view(np.float64).tolist()
    if stat.kind == "ram":
        half = len(a) // 2
        return [int(x) for x in a[:half]], [int(x) for x in a[half:]]
    if stat.kind in ("bins", "var_bins", "arcee_bins"):
        pos, out = 1, {}
        for _ in range(int(a[0])):
            unit, nb = int(a[pos]), int(a[pos + 1])
            pos += 2
            bins = []
            for _ in range(nb):
                n = int(a[pos])
                bins.append((a[pos + 1:pos + 1 + n].copy(), a[pos + 1 + n:pos + 1 + 2 * n].copy()))
                pos += 1 + 2 * n
            out[unit] = bins
        return out
    full, kept = a.view(np.float64)
    return DareSums(float(full), float(kept))


class StatsStore:
    """Statistics by (tensor, Stat), persisted in a zarr group, one array per round.

    A round is committed by its attributes (index and sha256 of the data), written after the data
    is synced; a round without them is an interrupted write and ignored. A committed round that
    does not verify, or a store that cannot be read or written, is an OutputError (exit 4) that
    says how to go on."""

    def __init__(self, path: str):
        import zarr  # imported here: it adds ~0.3 s to every start-up otherwise

        self.path = path
        self._records: dict[str, np.ndarray] = {}
        try:
            self.group = zarr.open_group(path, mode="a")
            names = sorted(self.group.array_keys())
        except Exception as e:  # noqa: BLE001 - any failure to open our own cache is damage
            raise _damaged(path, e) from None
        for name in names:
            try:
                arr = self.group[name]
                attrs = dict(arr.attrs)
                if "index" not in attrs:
                    continue  # never committed: a run stopped while writing it
                data = arr[:]
                if "sha256" in attrs and _digest(data) != attrs["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
                for key, (off, length) in attrs["index"].items():
                    if not (isinstance(key, str) and 0 <= off and off + length <= len(data)):
                        raise ValueError(f"{name} has a bad index")
                    self._records[key] = data[off:off + length]
            except Exception as e:  # noqa: BLE001
                raise _damaged(path, e) from None

    def _save(self, records: dict[str, np.ndarray]) -> None:
        if not records:
            return
        index, parts, off = {}, [], 0
        for key, packed in records.items():
            index[key] = (off, len(packed))
            parts.append(packed)
            off += len(packed)
        data = np.concatenate(parts)
        name = f"round-{len(list(self.group.array_keys())):04d}"
        try:
            arr = self.group.create_array(name=name, data=data, overwrite=True)
            _fsync_tree(os.path.join(self.path, name))
            arr.attrs.update({"index": index, "sha256": _digest(data)})  # the commit
            _fsync_tree(os.path.join(self.path, name))
        except Exception as e:  # noqa: BLE001 - disk full, quota, I/O error: all exit 4
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise OutputError(f"{self.path}: cannot save statistics ({reason}); free space, then rerun with "
                              "--resume (finished statistics are kept)") from None
        self._records.update(records)
        self._rounds = getattr(self, "_rounds", 0) + 1
        fault_point("stats", self._rounds)

    def get(self, tensor: str, stat: Stat):
        rec = self._records.get(f"{tensor}|{stat.key()}")
        return unpack(stat, rec) if rec is not None else None

    def put(self, items: dict) -> None:
        """Save {(tensor, Stat): value} as one round."""
        self._save({f"{tensor}|{stat.key()}": pack(stat, value) for (tensor, stat), value in items.items()})
