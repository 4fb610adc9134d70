"""A zarr store of pass-1 results, kept in the output's work folder so a resumed run (and the
factor search) never recomputes statistics it already has.

Each statistics round is saved as ONE int64 array (zarr costs milliseconds per array, and a model
has hundreds of tensors): the packed records concatenated, with a JSON index in the array's
attributes mapping "kind|model|tensor[|bins]" to (offset, length). Records: round-1 `Summary`s and
the per-unit bin details of later rounds.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from .errors import OutputError, printable
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


def _key(kind: str, model: int, tensor: str, bins: tuple = ()) -> str:
    return f"{kind}|{model}|{tensor}" + ("|" + ",".join(map(str, bins)) if bins else "")


def pack_summary(s: Summary) -> np.ndarray:
    nz = np.nonzero(s.hist)[0]
    aux = s.aux_mant_sums
    return np.concatenate([[s.numel, len(nz)], nz, s.hist[nz], s.mant_sums, [0 if aux is None else 1],
                           aux if aux is not None else []]).astype(np.int64)


def unpack_summary(a: np.ndarray) -> Summary:
    numel, n = int(a[0]), int(a[1])
    sparse = (a[2:2 + n].astype(np.int32), a[2 + n:2 + 2 * n].copy())
    pos = 2 + 2 * n
    mant = a[pos:pos + 256].copy()
    aux = a[pos + 257:pos + 513].copy() if a[pos + 256] else None
    return Summary(numel, None, mant, aux, sparse=sparse)


def pack_details(units: list[list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
    out = [len(units)]
    for bins in units:
        out.append(len(bins))
        for vals, counts in bins:
            out.append(len(vals))
            out.extend(vals.tolist())
            out.extend(counts.tolist())
    return np.array(out, np.int64)


def unpack_details(a: np.ndarray) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    pos, units = 1, []
    for _ in range(int(a[0])):
        nb = int(a[pos])
        pos += 1
        bins = []
        for _ in range(nb):
            n = int(a[pos])
            bins.append((a[pos + 1:pos + 1 + n].copy(), a[pos + 1 + n:pos + 1 + 2 * n].copy()))
            pos += 1 + 2 * n
        units.append(bins)
    return units


class StatsStore:
    """Summaries and bin details by (model, tensor), persisted in a zarr group, one array per round.

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

    def get_summary(self, model: int, tensor: str) -> Summary | None:
        rec = self._records.get(_key("summary", model, tensor))
        return unpack_summary(rec) if rec is not None else None

    def put_summaries(self, items: dict[tuple[int, str], Summary]) -> None:
        self._save({_key("summary", m, t): pack_summary(s) for (m, t), s in items.items()})

    def get_details(self, model: int, tensor: str, bins: tuple) -> list | None:
        rec = self._records.get(_key("details", model, tensor, bins))
        return unpack_details(rec) if rec is not None else None

    def put_details(self, items: dict[tuple[int, str, tuple], list]) -> None:
        self._save({_key("details", m, t, b): pack_details(units) for (m, t, b), units in items.items()})
