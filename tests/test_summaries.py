"""Histogram-derived order statistics equal brute-force sorts, including ties, zeros and chunking."""

import numpy as np
import pytest
import torch

from dppa_stream import kernels, summaries
from dppa_stream.methods.ranks import Ranks
from dppa_stream.statistics import Abs


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[:5] = torch.tensor([-0.0, 1e-40, -1e-40, 3e38, 0.5])
    if kind == "bf16":
        x = x.to(torch.bfloat16).float()
    return x


def _src(x: torch.Tensor) -> np.ndarray:
    """Kernel input whose deltas are exactly x: a zero base and x as the fine-tune (float32 bits)."""
    return np.stack([np.zeros(x.numel(), np.uint32), x.numpy().view(np.uint32)])


def summarize(x: torch.Tensor) -> summaries.Summary:
    hist, mant = np.zeros((1, summaries.HIST_BINS), np.int64), np.zeros((1, 256), np.int64)
    kernels.abs_summaries(_src(x), kernels.F32, np.array([0]), 0, x.numel(), False, True, hist, mant, np.zeros(2, np.int64))
    return summaries.Summary(x.numel(), hist[0], mant[0])


def bucket_detail(x: torch.Tensor, bucket: int):
    counts = np.zeros((1, 1 << 16), np.int64)
    kernels.bin_counts(_src(x), kernels.F32, 0, 0, x.numel(), False, np.array([bucket]), counts, np.zeros(2, np.int64))
    nz = np.flatnonzero(counts[0])
    return nz, counts[0][nz]


def apply_threshold(x: torch.Tensor, t: summaries.Threshold, ties_before: int) -> torch.Tensor:
    """The TIES trimming kernel on x with threshold t, given the ties that precede this chunk."""
    from dppa_stream.methods.sparsify import Sparse, kernel_records, level

    sparse = Sparse(kernels.SP_SHRINK, (level(t, tracked=True),), ((0, (ties_before,)),))
    models, levels = kernel_records((sparse,), [1.0], 0)
    out = np.empty(x.numel(), np.uint32)
    kernels.gta(_src(x), kernels.F32, 0, x.numel(), 0, False, models, levels, np.zeros((1, 1), np.uint8),
                kernels.records(kernels.COMBINE_FIELDS, ())[()], out, kernels.F32, np.zeros(2, np.int64))
    return torch.from_numpy(out.view(np.float32))


@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("chunks", [1, 3, 17])
def test_kth_smallest_and_top_k(kind, chunks):
    x = _data(kind, 50_000, 1)
    parts = list(torch.tensor_split(x, chunks))
    s = summaries.Summary()
    for p in parts:
        s = s + summarize(p)
    assert s.numel == x.numel()
    srt = torch.sort(x.abs()).values
    for rank in (1, 2, 5000, 25_000, 45_000, 49_999, 50_000):
        b, _ = summaries.locate(s.hist, rank)
        details = [bucket_detail(p, b) for p in parts]
        t = summaries.smallest(rank, s.hist, details)
        assert t.value == srt[rank - 1].item()
        if kind == "bf16":  # the histogram alone is exact for bf16 values
            assert summaries.smallest(rank, s.hist, None).value == srt[rank - 1].item()
    hist = Abs(0)
    got = {hist: s}
    for k in (1, 7, 5000, 40_000, 49_999):  # through the one exact-rank helper, as every method does
        rank = x.numel() - k + 1
        (bins,) = Ranks(hist).needs(got, [rank])
        got[bins] = {u: [bucket_detail(p, b) for b in bins.args] for u, p in enumerate(parts)}
        (boundary,) = Ranks(hist).resolve(got, [rank])
        t, starts = boundary.threshold(x.numel(), k), [n for _, n in boundary.starts]
        kept = torch.cat([apply_threshold(p, t, st) for p, st in zip(parts, starts)])
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        want = torch.zeros_like(x)
        want[order[:k]] = x[order[:k]]
        assert torch.equal(kept, want), k


def test_exact_sum_is_chunking_invariant():
    x = _data("f32", 100_000, 2)
    whole = summarize(x).sum_abs
    parts = summaries.Summary()
    for p in torch.tensor_split(x, 13):
        parts = parts + summarize(p)
    assert parts.sum_abs == whole
    import math

    assert whole == math.fsum(x.abs().double().tolist())


def test_summary_pickles_compactly():
    import pickle

    s = summarize(_data("bf16", 10_000, 3))
    blob = pickle.dumps(s)
    assert len(blob) < 40_000
    back = pickle.loads(blob)
    assert np.array_equal(back.hist, s.hist) and back.sum_abs == s.sum_abs


def test_counter_rng_is_chunk_invariant_and_fair():
    from dppa_stream import rng

    key, limit = rng.stream_key(0, 1, "x"), int(0.3 * (1 << 24))
    key = np.uint64(key)
    whole = kernels.keep_mask(key, 0, 100_000, limit)
    pieces = np.concatenate([kernels.keep_mask(key, a, b - a, limit) for a, b in ((0, 123), (123, 60_000), (60_000, 100_000))])
    assert np.array_equal(whole, pieces)
    assert abs(whole.mean() - 0.3) < 0.01
    assert not np.array_equal(whole, kernels.keep_mask(np.uint64(rng.stream_key(0, 2, "x")), 0, 100_000, limit))


def test_stream_keys_of_a_batch_equal_the_reference_keys():
    """The batched keys (a batch of DARE/DELLA tensors) are the reference's blake2b keys, names
    with non-ASCII characters included."""
    from dppa_stream import rng

    from .reference import stream_key

    names = ["model.layers.0.mlp.experts.7.up_proj.weight", "w", "é.中.weight", ""]
    for seed, model in ((0, 0), (3, 1), (2**40, 5)):
        got = rng.stream_keys(seed, model, iter(names))
        assert got.dtype == np.uint64 and got.tolist() == [stream_key(seed, model, n) for n in names]


def test_exact_sum_equals_rational_arithmetic():
    """Per-exponent significand sums (of |x|, and signed ones) rounded once, exactly as a rational sum."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for trial in range(300):
        sums = np.zeros(256, np.int64)
        picks = rng.integers(0, 256, rng.integers(1, 12))
        sums[picks] = rng.integers(-(1 << 40) if trial % 3 == 0 else 0, 1 << 40, picks.size)
        want = float(sum((Fraction(int(sums[e])) * Fraction(2) ** (max(e, 1) - 150) for e in range(256)), Fraction(0)))
        assert summaries.exact_sum(sums) == want, trial
    assert summaries.exact_sum(np.zeros(256, np.int64)) == 0.0


_PACKED_PARTS = summaries.record_parts


def _record_parts_apart(value):
    """A record in the form before packing: the bins in use, then their counts."""
    parts = _PACKED_PARTS(value)
    bins, counts = value.sparse
    parts[0][1] = len(bins)
    return [parts[0], bins, counts]


def test_records_with_counts_packed_or_apart_read_back_alike():
    """A record packs each bin with its count (half the values); one written apart, by an
    earlier version or for a summary of 2**31 elements or more, reads back the same."""
    for kind, n, seed in (("bf16", 5000, 1), ("f32", 40, 2), ("bf16", 5, 3)):
        s = summarize(_data(kind, n, seed))
        packed, apart = summaries.to_record(s), np.concatenate(_record_parts_apart(s)).astype(np.int64)
        assert len(packed) < len(apart) or len(s.sparse[0]) == 0
        for rec in (packed, apart):
            back = summaries.from_record(rec)
            lazy = summaries.from_record(rec, (lambda r: r, rec))
            for got in (back, lazy):
                assert got.numel == s.numel and got.total == s.total
                assert all(np.array_equal(a, b) for a, b in zip(got.sparse, s.sparse))
    huge = summaries.Summary(1 << 31, sparse=(np.array([3, 9], np.int32), np.array([1 << 31, 5], np.int64)), total=7)
    rec = summaries.to_record(huge)
    assert rec[1] == 2 and summaries.from_record(rec).sparse[1].tolist() == [1 << 31, 5]


def test_histograms_answer_as_each_summary_does(tmp_path, monkeypatch):
    """`Histograms` (many records as columns) gives every summary's count, counts below a bin and
    thresholds as the per-summary queries do, read back from the store in any batch size and in
    store order, or from summaries held in memory; a store holding records of both forms (one
    resumed from an earlier version's run) included."""
    from dppa_stream.statistics import IN_STORE, Results
    from dppa_stream.stats_store import StatsStore

    sums = [summarize(_data(kind, n, seed)) for seed, (kind, n) in
            enumerate([("bf16", 5), ("f32", 7), ("bf16", 300), ("f32", 2000), ("bf16", 5000), ("f32", 40)] * 3)]
    rng = np.random.default_rng(3)
    ranks = [sorted(rng.integers(1, s.numel + 2, 3).tolist(), reverse=True) for s in sums]
    below = [int(rng.integers(0, summaries.HIST_BINS + 1)) for _ in sums]
    below[0], below[1] = 0, summaries.HIST_BINS
    store = StatsStore(str(tmp_path / "stats.zarr"))
    pairs = [(f"t{i}", Abs(i % 2, None, True)) for i in range(len(sums))]
    order = list(range(len(sums)))
    rng.shuffle(order)
    store.put({pairs[i]: sums[i] for i in order[:9]})  # two batches, stored in another order than asked
    with monkeypatch.context() as m:
        m.setattr(summaries, "record_parts", _record_parts_apart)
        store.put({pairs[i]: sums[i] for i in order[9:]})
    stored, held = Results(store=store), Results()
    stored.update({p: IN_STORE for p in pairs})
    held.update(dict(zip(pairs, sums)))
    for results, limit in ((stored, 1), (stored, 3000), (stored, 1 << 20), (held, 1), (held, 5000)):
        seen = []
        for at, h in results.histograms(pairs, limit):
            seen += at.tolist()
            assert h.count().tolist() == [summaries.total(sums[i]) for i in at]
            assert h.numel.tolist() == [sums[i].numel for i in at] and h.totals == [sums[i].total for i in at]
            assert h.count_below(np.array([below[i] for i in at])).tolist() == \
                [summaries.count_below(sums[i], below[i]) for i in at]
            bits, at_or_below, in_bin = h.thresholds_le(np.array([ranks[i] for i in at]))
            want = [summaries.thresholds_le(sums[i], ranks[i]) for i in at]
            assert bits.tolist() == [[t.bits for t, _ in w] for w in want]
            assert at_or_below.tolist() == [[n for _, n in w] for w in want]
            assert in_bin.tolist() == [[t.ties_total for t, _ in w] for w in want]
        assert sorted(seen) == list(range(len(sums)))


def test_store_batches_equal_records_read_one_by_one(tmp_path, monkeypatch):
    """`StatsStore.batches` copies each run of records stored back to back in one piece: what it
    gives equals each record read on its own, for keys in any order, a key asked twice, records
    crossing chunk boundaries and runs cut by the batch limit."""
    from dppa_stream import stats_store

    monkeypatch.setattr(stats_store, "CHUNK", 50)  # chunks of 50 values: most runs cross several
    store = stats_store.StatsStore(str(tmp_path / "stats.zarr"))
    sums = [summarize(_data(kind, n, seed)) for seed, (kind, n) in
            enumerate([("bf16", 5), ("f32", 70), ("bf16", 300), ("f32", 9)] * 4)]
    pairs = [(f"t{i}", Abs(0, None, True)) for i in range(len(sums))]
    store.put(dict(zip(pairs[:7], sums[:7])))
    store.put(dict(zip(pairs[7:], sums[7:])))
    keys = [f"{t}|{st.key()}" for t, st in pairs]
    rng = np.random.default_rng(5)
    asked = [keys[i] for i in rng.permutation(len(keys))] + [keys[3]]
    one_by_one = [store._read(store._where[k]) for k in asked]
    for limit in (1, 70, 1 << 20):
        seen = []
        for at, values, starts in store.batches(asked, limit):
            for k, i in enumerate(at.tolist()):
                assert values[starts[k]:starts[k + 1]].tolist() == one_by_one[i].tolist(), (limit, i)
                seen.append(i)
        assert sorted(seen) == list(range(len(asked)))
