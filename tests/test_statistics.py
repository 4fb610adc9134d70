"""A statistic is one class: one defined here, outside the package, goes through the driver's Dask
passes, spans, the statistics store and a resumed run with nothing else added, and its values match
torch's on the same tensors."""

from __future__ import annotations

import numpy as np
import pytest

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, session
from dppa_stream.statistics import Stat, drive
from dppa_stream.stats_store import StatsStore

from .reference import load_model


class Changed(Stat):
    """Per model: how many elements of its delta are not zero (an exact count)."""

    __slots__ = ()
    name = "test_changed"

    def compute(self, rows, code, lo, hi, bad):
        assert rows.dtype in ("BF16", "F32")
        vals = (rows.src.astype(np.uint32) << 16).view(np.float32) if rows.dtype == "BF16" else rows.src.view(np.float32)
        return int(np.count_nonzero(vals[self.model + 1, lo:hi] != vals[0, lo:hi]))

    def empty(self):
        return 0

    def combine(self, a, b):
        return a + b

    def pack(self, value):
        return np.array([value], np.int64)

    def unpack(self, record, reread=None):
        return int(record[0])


class CountChanged:
    """A method in the driver's terms: asks for `Changed` of each model on the first `part` of
    every tensor, and plans the counts."""

    local = False

    def __init__(self, part: float):
        self.part = part

    def _stats(self, catalogue, t):
        numel = int(np.prod(catalogue.tensors[t].shape))
        span = None if self.part == 1 else (0, int(numel * self.part))
        return [Changed(m, span) for m in range(len(catalogue.tensors[t].models))]

    def statistics(self, catalogue, tensors, got):
        return {t: self._stats(catalogue, t) for t in tensors}

    def plan(self, catalogue, tensors, got):
        return {t: [got.get(t, st) for st in self._stats(catalogue, t)] for t in tensors}


@pytest.mark.parametrize("part", [1, 0.5])
def test_a_statistic_defined_outside_the_package(tmp_path, ckpts, part):
    base, ft1, ft2 = ckpts()
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       f"  - model: {ft1}\n    parameters: {{weight: 1}}\n"
                       f"  - model: {ft2}\n    parameters: {{weight: 1}}\n", "<test>")
    store = str(tmp_path / "stats.zarr")
    with session(cfg, MergeOptions(quiet=True, unit_bytes=20_000)) as s:
        assert any(len(u) > 1 for u in s.units.values())  # tensors split over units: partial results combine
        engine = s.engine(StatsStore(store))
        got = drive(CountChanged(part), s.catalogue, s.float_tensors, engine)
        assert engine.bytes_read > 0
        again = s.engine(StatsStore(store))  # a resumed run: everything from the store
        assert drive(CountChanged(part), s.catalogue, s.float_tensors, again) == got and again.bytes_read == 0
    models = [load_model(p) for p in (base, ft1, ft2)]
    assert got.keys() == {t for t, v in models[0].items() if v.is_floating_point()}
    for t, counts in got.items():
        n = int(models[0][t].numel() * part)
        want = [int((m[t].reshape(-1)[:n].float() != models[0][t].reshape(-1)[:n].float()).sum()) for m in models[1:]]
        assert counts == want, t


@pytest.mark.parametrize("bf16", [True, False])
def test_sparse_summaries_in_any_room_equal_the_dense_path(monkeypatch, bf16):
    """Small ranges (an MoE model's experts, whole or as spans of a fused tensor) are summarised
    sparse, as many per kernel call as its room allows: the same summaries as the dense path
    (a 32k-bin histogram per range), however the ranges are split between calls."""
    import torch
    from types import SimpleNamespace

    from dppa_stream import kernels, statistics
    from dppa_stream.statistics import Abs

    rng = np.random.default_rng(0)
    sizes = [1, 30, 700, 5000, 3, 40_000]
    starts = np.cumsum([0, *sizes])
    base = rng.standard_normal(starts[-1]).astype(np.float32)
    fts = base + rng.standard_normal((2, starts[-1])).astype(np.float32) * 10.0 ** rng.integers(-20, 2, (2, starts[-1]))
    src = torch.from_numpy(np.stack([base, *fts])).to(torch.bfloat16).view(torch.uint16).numpy()
    ranges = np.stack([starts[:-1], starts[1:]], 1)
    stats = [[Abs(m, (0, n), bf16, ("sums",)) for m in (1, 0)] for n in sizes]
    monkeypatch.setattr(statistics, "SPARSE_MAX", 0)  # every range the dense way
    want = [Abs.compute_all(SimpleNamespace(src=np.ascontiguousarray(src[:, a:b])), kernels.BF16,
                            [(st, (0, b - a)) for st in sts], np.zeros(3, np.int64))
            for (a, b), sts in zip(ranges.tolist(), stats)]
    monkeypatch.undo()
    assert all(s.total > 0 for w in want[1:] for s in w.values())  # (sums of many exponents: words carry)
    for room in (1, 3000, 1 << 18):
        monkeypatch.setattr(statistics, "SPARSE_ROOM", room)
        got, bad = Abs._sparse(src, kernels.BF16, ranges, stats, bf16, True)
        assert not bad.any() and len(got) == len(want)
        for g, w in zip(got, want):
            for st, s in w.items():
                assert g[st].numel == s.numel and g[st].total == s.total
                assert all(np.array_equal(a, b) for a, b in zip(g[st].sparse, s.sparse))
