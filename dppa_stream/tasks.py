"""The work a Dask task does on one work unit (a row range of one tensor, across all models).

A task reads its rows from every input with positional reads, then loops over ~1M-element
sub-chunks (small buffers stay in cache and keep peak memory low), and either returns small
statistics or writes its merged rows straight into the output shard. Module-level functions
with small picklable arguments, so any worker can run any task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import summaries
from .checkpoint import DTYPES, FLOAT_DTYPES, Placement, TensorEntry, read_rows, write_rows
from .executor import init_worker

SUB_CHUNK_ELEMS = 1 << 18


@dataclass(frozen=True)
class Unit:
    """Rows [row_start, row_stop) of one tensor; `index` is its position among the tensor's units."""

    tensor: str
    index: int
    row_start: int
    row_stop: int
    row_numel: int

    @property
    def flat_start(self) -> int:
        return self.row_start * self.row_numel

    @property
    def numel(self) -> int:
        return (self.row_stop - self.row_start) * self.row_numel


@dataclass(frozen=True)
class UnitInputs:
    """What a task needs to read a unit: the base entry (or None) and each model's entry."""

    unit: Unit
    base: TensorEntry | None
    models: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        ents = ([self.base] if self.base else []) + list(self.models)
        return sum(self.unit.numel * e.itemsize for e in ents)


class UnitData:
    """The rows of one unit from every input, and float32 views of them in sub-chunks.

    Deltas are recomputed per sub-chunk (cheap, cache-resident), except after `materialize()`,
    which keeps the whole unit's float32 deltas so that several statistics sweeps and the merge
    do not recompute them; the unit size accounts for that memory when a method needs it.
    """

    def __init__(self, inp: UnitInputs, delta_dtype: str, check_finite: bool):
        u = inp.unit
        self.inp, self.delta_dtype, self.check_finite = inp, delta_dtype, check_finite
        self.base = read_rows(inp.base, u.row_start, u.row_stop) if inp.base else None
        self.models = [read_rows(e, u.row_start, u.row_stop) for e in inp.models]
        self.full: list[torch.Tensor] | None = None

    def materialize(self) -> None:
        if self.full is None and self.base is not None:
            full = [torch.empty(m.shape, dtype=torch.float32) for m in self.models]
            for _, a, b, _, deltas, _ in self.chunks(False):
                for f, d in zip(full, deltas):
                    f[a:b] = d
            self.full = full

    def chunks(self, want_inputs: bool):
        """Yield (flat_start, local_row_start, local_row_stop, base_f32, deltas_f32, inputs_f32)."""
        u = self.inp.unit
        rows = u.row_stop - u.row_start
        step = max(1, SUB_CHUNK_ELEMS // max(1, u.row_numel))
        for a in range(0, rows, step):
            b = min(rows, a + step)
            base = self.base[a:b].float() if self.base is not None else None
            if self.full is not None:
                inputs = [m[a:b].float() for m in self.models] if want_inputs else None
                yield u.flat_start + a * u.row_numel, a, b, base, [f[a:b] for f in self.full], inputs
                continue
            inputs = [m[a:b].float() for m in self.models]
            if self.check_finite:
                self._check_finite(base, inputs)
            deltas = []
            if base is not None:
                for m, x in zip(self.models, inputs):
                    if self.delta_dtype == "bfloat16" and m.dtype == torch.bfloat16:
                        # bf16 - bf16 computes in float32 and rounds once: bf16(fp32(ft) - fp32(base))
                        d = (m[a:b] - self.base[a:b]).float()
                    elif self.delta_dtype == "bfloat16":
                        d = (x - base).to(torch.bfloat16).float()
                    else:
                        d = x - base
                    deltas.append(d)
            yield u.flat_start + a * u.row_numel, a, b, base, deltas, (inputs if want_inputs else None)

    def _check_finite(self, base, inputs) -> None:
        """Refuse NaN/Inf inputs: they would silently poison statistics and merges."""
        inp = self.inp
        pairs = ([(inp.base, base, self.base)] if base is not None else []) + list(zip(inp.models, inputs, self.models))
        for entry, x, raw in pairs:
            # a sum is NaN/Inf if any element is (a finite overflow is re-checked exactly): 10x cheaper
            if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
                from .errors import InputError

                bad = int((~torch.isfinite(raw.float())).sum())
                raise InputError(f"{entry.file}: tensor {entry.name!r} has {bad} NaN/Inf values in rows "
                                 f"{inp.unit.row_start}..{inp.unit.row_stop - 1}; pass --allow-nonfinite to merge anyway")


def _gather_stats(method, data: UnitData, requests: dict[int, tuple | None]) -> dict:
    """Round-1 summaries (request None) or round-2 details of the requested bins, per model."""
    tensor = data.inp.unit.tensor
    sps = {i: method.sparsifier(i, tensor) for i in requests}
    bf16_values = method.delta_dtype == "bfloat16"
    acc: dict = {}
    for flat, _, _, _, deltas, _ in data.chunks(False):
        for i, buckets in requests.items():
            if buckets is None:
                s = sps[i].summarize(deltas[i], flat, bf16_values)
                acc[i] = acc[i] + s if i in acc else s
            else:
                per_bin = acc.setdefault(i, [{} for _ in buckets])
                for b, d in zip(buckets, per_bin):
                    vals, counts = summaries.bucket_detail(deltas[i], b)
                    for v, c in zip(vals.tolist(), counts.tolist()):
                        d[v] = d.get(v, 0) + c
    out = {}
    for i, buckets in requests.items():
        if buckets is None:  # compact: results wait in worker memory until the whole pass is gathered
            out[i] = (acc.get(i) or summaries.Summary()).compact()
        else:
            out[i] = [(np.array(sorted(d), np.int64), np.array([d[k] for k in sorted(d)], np.int64))
                      for d in acc.get(i, [{} for _ in buckets])]
    return out


def stats_task(method, inp: UnitInputs, requests: dict[int, tuple | None], check_finite: bool = True) -> dict:
    """A statistics task for one unit: {model index: Summary, or [(values, counts) per bin]}."""
    init_worker()
    return _gather_stats(method, UnitData(inp, method.delta_dtype, check_finite), requests)


def combine_summaries(*parts: dict) -> dict:
    """Tree-reduction step: add per-model Summaries."""
    out = dict(parts[0])
    for p in parts[1:]:
        for i, s in p.items():
            out[i] = out[i] + s if i in out else s
    return {i: s.compact() for i, s in out.items()}


def decide_inline(method, data: UnitData, decisions: list) -> list:
    """Fill in the decisions of a tensor held in one unit from the data already in memory."""
    missing = [i for i, d in enumerate(decisions) if d is None]
    if not missing:
        return decisions
    data.materialize()
    out = list(decisions)
    numel = data.inp.unit.numel
    sums = _gather_stats(method, data, {i: None for i in missing})
    buckets = {}
    for i in missing:
        b = method.sparsifier(i, data.inp.unit.tensor).bucket(numel, sums[i])
        if b is not None:
            buckets[i] = b
    details = _gather_stats(method, data, buckets) if buckets else {}
    for i in missing:
        sp = method.sparsifier(i, data.inp.unit.tensor)
        out[i] = sp.decide(numel, sums[i], [details[i]] if i in details else None)
    return out


def merge_task(method, inp: UnitInputs, decisions: list, extra, folder: str, place: Placement, out_dtype: str,
               check_finite: bool = True) -> int:
    """Merge one unit and write it at its final place; returns bytes written."""
    init_worker()
    u = inp.unit
    data = UnitData(inp, method.delta_dtype, check_finite)
    src = inp.base or inp.models[0]
    if src.dtype not in FLOAT_DTYPES:  # integer buffers: copied from the base unchanged
        return write_rows(folder, place, u.row_start, data.base if data.base is not None else data.models[0])
    decisions = decide_inline(method, data, decisions)
    sps = [method.sparsifier(i, u.tensor) for i in range(len(inp.models))]
    states = [sp.start(d, u.index) for sp, d in zip(sps, decisions)]
    tdtype = DTYPES[out_dtype][0]
    written = 0
    for flat, a, b, base, deltas, inputs in data.chunks(not method.needs_base):
        pruned = [sp.apply(d, dec, st, flat) for sp, d, dec, st in zip(sps, deltas, decisions, states)]
        out = method.merge(base, pruned, inputs, u.tensor, extra)
        written += write_rows(folder, place, u.row_start + a, out.to(tdtype))
    return written
