"""Histogram-derived order statistics equal brute-force sorts, including ties, zeros and chunking."""

import numpy as np
import pytest
import torch

from dppa_stream import summaries


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[:5] = torch.tensor([-0.0, 1e-40, -1e-40, 3e38, 0.5])
    if kind == "bf16":
        x = x.to(torch.bfloat16).float()
    return x


@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("chunks", [1, 3, 17])
def test_kth_smallest_and_top_k(kind, chunks):
    x = _data(kind, 50_000, 1)
    parts = list(torch.tensor_split(x, chunks))
    s = summaries.Summary()
    for p in parts:
        s = s + summaries.summarize(p)
    assert s.numel == x.numel()
    srt = torch.sort(x.abs()).values
    for rank in (1, 2, 5000, 25_000, 45_000, 49_999, 50_000):
        b, _ = summaries.locate(s.hist, rank)
        details = [summaries.bucket_detail(p, b) for p in parts]
        t = summaries.smallest(rank, s.hist, details)
        assert t.value == srt[rank - 1].item()
        if kind == "bf16":  # the histogram alone is exact for bf16 values
            assert summaries.smallest(rank, s.hist, None).value == srt[rank - 1].item()
    for k in (0, 1, 7, 5000, 40_000, 50_000):
        if 0 < k < x.numel():
            b, _ = summaries.locate(s.hist, x.numel() - k + 1)
        else:
            b = 0
        details = [summaries.bucket_detail(p, b) for p in parts]
        t, starts = summaries.keep_top(x.numel(), k, s.hist, details)
        kept = torch.cat([summaries.apply_threshold(p, t, st) for p, st in zip(parts, starts)])
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        want = torch.zeros_like(x)
        want[order[:k]] = x[order[:k]]
        assert torch.equal(kept, want), k


def test_exact_sum_is_chunking_invariant():
    x = _data("f32", 100_000, 2)
    whole = summaries.summarize(x).sum_abs
    parts = summaries.Summary()
    for p in torch.tensor_split(x, 13):
        parts = parts + summaries.summarize(p)
    assert parts.sum_abs == whole
    import math

    assert whole == math.fsum(x.abs().double().tolist())


def test_summary_pickles_compactly():
    import pickle

    s = summaries.summarize(_data("bf16", 10_000, 3))
    blob = pickle.dumps(s)
    assert len(blob) < 40_000
    back = pickle.loads(blob)
    assert np.array_equal(back.hist, s.hist) and back.sum_abs == s.sum_abs


def test_counter_rng_is_chunk_invariant_and_fair():
    from dppa_stream import rng

    key = rng.stream_key(0, 1, "x")
    whole = rng.keep_mask(key, 0, 100_000, 0.3)
    pieces = torch.cat([rng.keep_mask(key, a, b - a, 0.3) for a, b in ((0, 123), (123, 60_000), (60_000, 100_000))])
    assert torch.equal(whole, pieces)
    assert abs(whole.float().mean().item() - 0.3) < 0.01
    assert not torch.equal(whole, rng.keep_mask(rng.stream_key(0, 2, "x"), 0, 100_000, 0.3))
