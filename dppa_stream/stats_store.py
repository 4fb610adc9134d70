"""A zarr store of pass-1 results, kept in the output's work folder so a resumed run (and the
factor search) never recomputes statistics it already has.

One small int64 array per (kind, model, tensor): round-1 `Summary`s and the per-unit bin details
of later rounds. Values are packed flat; the arrays are tiny (kilobytes), so zarr's chunking and
compression matter less than having a documented, inspectable, cloud-friendly format.
"""

from __future__ import annotations

import numpy as np
import zarr

from .summaries import HIST_BINS, Summary


def _name(kind: str, model: int, tensor: str, tag: str = "") -> str:
    return f"{kind}|{model}|{tensor.replace('/', '%2F')}{'|' + tag if tag else ''}"


def pack_summary(s: Summary) -> np.ndarray:
    nz = np.nonzero(s.hist)[0]
    aux = s.aux_mant_sums
    return np.concatenate([[s.numel, len(nz)], nz, s.hist[nz], s.mant_sums, [0 if aux is None else 1],
                           aux if aux is not None else []]).astype(np.int64)


def unpack_summary(a: np.ndarray) -> Summary:
    numel, n = int(a[0]), int(a[1])
    hist = np.zeros(HIST_BINS, np.int64)
    hist[a[2:2 + n]] = a[2 + n:2 + 2 * n]
    pos = 2 + 2 * n
    mant = a[pos:pos + 256].copy()
    aux = a[pos + 257:pos + 513].copy() if a[pos + 256] else None
    return Summary(numel, hist, mant, aux)


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
    """Summaries and bin details by (model, tensor), persisted in a zarr group."""

    def __init__(self, path: str):
        self.group = zarr.open_group(path, mode="a")

    def get_summary(self, model: int, tensor: str) -> Summary | None:
        name = _name("summary", model, tensor)
        return unpack_summary(self.group[name][:]) if name in self.group else None

    def put_summary(self, model: int, tensor: str, s: Summary) -> None:
        self.group.create_array(name=_name("summary", model, tensor), data=pack_summary(s), overwrite=True)

    def get_details(self, model: int, tensor: str, bins: tuple) -> list | None:
        name = _name("details", model, tensor, ",".join(map(str, bins)))
        return unpack_details(self.group[name][:]) if name in self.group else None

    def put_details(self, model: int, tensor: str, bins: tuple, units: list) -> None:
        name = _name("details", model, tensor, ",".join(map(str, bins)))
        self.group.create_array(name=name, data=pack_details(units), overwrite=True)
