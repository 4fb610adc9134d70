"""Every fused kernel, and every mode of the delta family's kernel, equals an independent reference
(tests/reference_kernels.py: torch float32 in the formula's order, float64 where the method uses
it, exact rationals, stable sorts) bit for bit, on every input dtype, on values with exact zeros of
both signs, denormals, ties at thresholds, huge and tiny magnitudes, and NaN/Inf: each kernel
counts the non-finite inputs it reads per model (the refusal policy), and with them merges to the
IEEE result of the formula (`--allow-nonfinite`)."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from dppa_stream import kernels as kn
from dppa_stream.methods.base import torch_order_sum
from dppa_stream.statistics import exact_products

from . import reference_kernels as ref
from .reference import keep_mask as reference_keep_mask

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
TORCH_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> np.ndarray:
    """The stored bit patterns of a torch tensor as the kernels' unsigned container."""
    view = t.contiguous().view(TORCH_BITS[t.dtype]).numpy()
    return view.view(np.uint16 if view.itemsize == 2 else np.uint32)


def from_bits(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16 if a.itemsize == 2 else np.int32).copy()).view(dtype)


def hostile(n: int, dtype, seed: int = 0, scale: float = 1e-2, nonfinite: bool = False) -> torch.Tensor:
    """Values with every corner a merge meets: zeros of both signs, denormals, repeated values
    (ties), tiny and large magnitudes; NaN and +-Inf when `nonfinite`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    x[torch.rand(n, generator=g) < 0.03] = -0.0
    tiny = torch.finfo(dtype).tiny
    x[torch.rand(n, generator=g) < 0.02] = tiny / 4
    x[torch.rand(n, generator=g) < 0.02] = -tiny / 8
    x[torch.rand(n, generator=g) < 0.05] = scale / 2  # ties
    x[torch.rand(n, generator=g) < 0.05] = -scale / 2
    x[:4] = torch.tensor([1e4, -3e3, 7.0, -0.0])
    if nonfinite:
        for v in (float("nan"), float("inf"), -float("inf")):
            x[torch.rand(n, generator=g) < 0.003] = v
    return x.to(dtype)


def nonfinite(xs) -> list[int]:
    return [int((~torch.isfinite(x.float())).sum()) for x in xs]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bit patterns (NaN payloads aside), signed zeros included."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and np.array_equal(bits(a)[~nan.numpy()], bits(b)[~nan.numpy()])


def exact_value(words: np.ndarray) -> Fraction:
    """The exact sum a (256,) array of per-exponent sums of float32 significands stands for:
    Σ_e words[e] * 2**(max(e, 1) - 150)."""
    return sum((Fraction(int(w)) * Fraction(2) ** (max(e, 1) - 150) for e, w in enumerate(words) if w), Fraction(0))


def inputs(n: int, dtype, seeds, nonfinite_from: int | None = None):
    """Tensors (base first) and their raw rows."""
    xs = [hostile(n, dtype, s, nonfinite=nonfinite_from is not None and i >= nonfinite_from) for i, s in enumerate(seeds)]
    return xs, np.stack([bits(x) for x in xs])


# --- widening, narrowing, rounding ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_widen_every_16_bit_pattern(name):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(raw.size, np.float32)
    bad = kn.widen_block(raw, kn.CODES[name], 0, raw.size, out)
    want = from_bits(raw, DTYPES[name]).float()
    assert same(torch.from_numpy(out), want)
    assert bad == int((~torch.isfinite(want)).sum()) == kn.count_nonfinite(raw, kn.CODES[name])


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
def test_narrow_matches_torch_casts(name):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200_000, generator=g) * 10 ** torch.randint(-12, 8, (200_000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 5.96e-8, 2.98e-8, 2.99e-8, -1e-7,
                                 3.4e38, float("inf"), -float("inf")])])
    x = torch.cat([x, torch.from_numpy(np.random.default_rng(2).integers(0, 2**32, 100_000, dtype=np.uint32)
                                       .view(np.float32)).nan_to_num(0.0)])
    out = np.empty(x.numel(), kn.CONTAINER[name])
    kn.narrow_block(x.numpy(), x.numel(), out, 0, kn.CODES[name])
    assert same(from_bits(out, DTYPES[name]), x.to(DTYPES[name]))


def test_bf16_delta_rounding_matches_bf16_subtraction():
    a, b = hostile(50_000, torch.bfloat16, 3), hostile(50_000, torch.bfloat16, 4)
    src = np.stack([bits(b), bits(a)])
    hist = np.zeros((1, kn.HIST_BINS), np.int64)
    kn.abs_summaries(src, kn.BF16, np.array([0]), 0, a.numel(), True, False, hist, np.zeros((1, 256), np.int64),
                     np.zeros(2, np.int64))
    d = (a - b).float().abs()  # torch computes a bf16 subtraction in float32 and rounds once
    assert np.array_equal(hist[0], ref.top16_histogram(ref.f32_bits(d), kn.HIST_BINS))


# --- statistics of the delta family -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_abs_summaries_and_bin_counts(name):
    (base, ft1, ft2), src = inputs(30_001, DTYPES[name], (5, 6, 7), nonfinite_from=1)
    n = base.numel()
    hists, mants = np.zeros((2, kn.HIST_BINS), np.int64), np.zeros((2, 256), np.int64)
    bad = np.zeros(3, np.int64)
    kn.abs_summaries(src, kn.CODES[name], np.array([0, 1]), 0, n, False, True, hists, mants, bad)
    assert list(bad) == nonfinite([base, ft1, ft2])
    for i, ft in enumerate((ft1, ft2)):
        d = ft.float() - base.float()
        keys = ref.f32_bits(d.abs())
        assert np.array_equal(hists[i], ref.top16_histogram(keys, kn.HIST_BINS))
        finite = torch.isfinite(d)
        mt = mants[i].copy()
        mt[255] = 0  # Inf and NaN land in the top exponent
        assert exact_value(mt) == ref.exact_abs_sum(d[finite])
        for top in (int(np.argmax(hists[i])), int(keys[0] >> 16)):
            counts = np.zeros((1, 1 << 16), np.int64)
            kn.bin_counts(src, kn.CODES[name], i, 0, n, False, np.array([top]), counts, np.zeros(3, np.int64))
            assert np.array_equal(counts[0], ref.low16_counts(keys, top))


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("bf16_delta,want_sums", [(True, False), (False, True), (False, False)])
def test_abs_batch_summaries_equal_one_tensor_at_a_time(name, bf16_delta, want_sums):
    """Many small tensors in one call, written sparse, against `abs_summaries` on each tensor's
    columns alone: the same bins in use, counts, NaN/Inf counts and exact Σ|delta| (its 64-bit
    words against the per-exponent sums; huge and denormal deltas carry across words), with the
    histograms left all zero for the next call. Sizes from 1 element to more than the bins."""
    sizes = [1, 7, 4096, 4097, 40_000, 300, 2]
    (base, ft1, ft2), src = inputs(sum(sizes), DTYPES[name], (8, 9, 10), nonfinite_from=1)
    src[1:, 10::97] = bits(torch.tensor([3e38 if name == "F32" else 6e4], dtype=DTYPES[name]))  # big deltas
    starts = np.cumsum([0, *sizes])
    models = np.array([1, 0])  # in either order
    room = sum(min(n, kn.HIST_BINS) for n in sizes) * len(models)
    hists, touched = np.zeros((2, kn.HIST_BINS), np.int64), np.zeros((2, kn.HIST_BINS), np.int64)
    bins, counts = np.empty(room, np.int32), np.empty(room, np.int32)
    at, words = np.empty((len(sizes), 3), np.int64), np.empty((len(sizes), 2, 6), np.uint64)
    bad = np.zeros((len(sizes), 3), np.int64)
    kn.abs_batch_summaries(src, kn.CODES[name], starts[:-1], starts[1:], models, bf16_delta, want_sums, hists, touched,
                           bins, counts, at, words, bad)
    assert not hists.any()
    for k, (lo, hi) in enumerate(zip(starts, starts[1:])):
        one = np.ascontiguousarray(src[:, lo:hi])
        hist, mant, want_bad = np.zeros((2, kn.HIST_BINS), np.int64), np.zeros((2, 256), np.int64), np.zeros(3, np.int64)
        kn.abs_summaries(one, kn.CODES[name], models, 0, hi - lo, bf16_delta, want_sums and not bf16_delta, hist, mant,
                         want_bad)
        assert list(bad[k]) == list(want_bad)
        for i in range(2):
            got_bins = bins[at[k, i]:at[k, i + 1]]
            assert np.array_equal(got_bins, np.flatnonzero(hist[i]))
            assert np.array_equal(counts[at[k, i]:at[k, i + 1]], hist[i][got_bins])
            if bf16_delta:  # every |delta| is its bin's value
                mant[i] = 0
                np.add.at(mant[i], got_bins >> 7, hist[i][got_bins] * (((got_bins & 0x7F) << 16) | np.where(
                    got_bins >= 128, 1 << 23, 0)))
            total = int.from_bytes(words[k, i].tobytes(), "little")
            assert Fraction(total, 1 << 150) == exact_value(mant[i])


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("bf16_delta", [False, True])
def test_exact_ranks_equal_a_sort(name, bf16_delta):
    """The one-unit shortcut of the two histogram rounds: key, keys below and ties at each rank,
    against a stable sort of the same keys (ties, zeros of both signs, NaN/Inf included)."""
    # (NaN payloads after bf16 rounding are the kernel's own: non-finite inputs only without it)
    (base, ft1, ft2), src = inputs(5_003, DTYPES[name], (8, 9, 10), nonfinite_from=None if bf16_delta else 1)
    n = base.numel()
    for i, ft in enumerate((ft1, ft2)):
        d = ft.float() - base.float()
        if bf16_delta:
            d = d.to(torch.bfloat16).float()
        for lo, hi in ((0, n), (7, 3001)):
            part = np.sort(ref.f32_bits(d[lo:hi].abs()).numpy())
            ranks = np.array(sorted({1, 2, hi - lo, (hi - lo) // 2, (hi - lo) * 9 // 10}), np.int64)
            out, bad = np.zeros((len(ranks), 3), np.int64), np.zeros(3, np.int64)
            keys, counts = np.full(2 * (hi - lo) + 3, -1, np.int64), np.full(1 << 11, 7, np.int64)  # stale scratch
            kn.exact_ranks(src, kn.CODES[name], i, lo, hi, bf16_delta, ranks, out, keys, counts, bad)
            for (key, below, equal), r in zip(out.tolist(), ranks.tolist()):
                assert key == part[r - 1]
                assert below == np.searchsorted(part, key) and equal == np.searchsorted(part, key, "right") - below


@pytest.mark.parametrize("name", list(DTYPES))
def test_dare_sums_are_exact(name):
    """Σ|delta| and Σ|delta * keep-mask| exactly, the mask from the reference RNG at flat indices
    flat0 + i; over a sub-range [lo, hi) of the unit."""
    (base, ft), src = inputs(20_000, DTYPES[name], (21, 22))
    lo, hi, flat0, key, density = 1_000, 19_500, 77_000, 0xDEADBEEF12345, 0.3
    full, kept = np.zeros(256, np.int64), np.zeros(256, np.int64)
    bad = np.zeros(2, np.int64)
    kn.dare_sums(src, kn.CODES[name], 0, lo, hi, flat0, np.uint64(key), np.uint64(int(density * (1 << 24))), full, kept,
                 bad)
    d = (ft.float() - base.float())[lo:hi]
    mask = torch.from_numpy(reference_keep_mask(key, flat0, hi - lo, density))
    assert exact_value(full) == ref.exact_abs_sum(d)
    assert exact_value(kept) == ref.exact_abs_sum(d * mask)
    assert list(bad) == [0, 0]


@pytest.mark.parametrize("name", list(DTYPES))
def test_masked_abs_sums_are_exact(name):
    (base, ft), src = inputs(20_000, DTYPES[name], (23, 24), nonfinite_from=0)
    mask = (torch.rand(20_000, generator=torch.Generator().manual_seed(1)) < 0.4)
    lo, hi = 3, 19_000
    full, kept = np.zeros(256, np.int64), np.zeros(256, np.int64)
    bad = np.zeros(2, np.int64)
    kn.masked_abs_sums(src, kn.CODES[name], 0, lo, hi, mask.numpy().astype(np.uint8), full, kept, bad)
    assert list(bad) == nonfinite([base[lo:hi], ft[lo:hi]])
    d = (ft.float() - base.float())[lo:hi]
    finite = torch.isfinite(d)
    full[255] = kept[255] = 0
    assert exact_value(full) == ref.exact_abs_sum(d[finite])
    assert exact_value(kept) == ref.exact_abs_sum((d * mask[lo:hi])[finite])


def test_keep_draw_matches_the_reference_rng():
    key, limit = 0x1234_5678_9ABC_DEF0, int(0.3 * (1 << 24))
    got = kn.keep_mask(key, 1_000_000, 50_000, limit)
    assert np.array_equal(got, reference_keep_mask(key, 1_000_000, 50_000, 0.3))
    assert abs(got.mean() - 0.3) < 0.01


# --- the delta family's kernel, mode by mode --------------------------------------------------------

def run_gta(src, name, models, levels=(), masks=None, combine=None, bf16_delta=False, out_name=None, flat0=0,
            units=None):
    """kernels.gta with records filled by field name; `units`: [(lo, hi, {(model, level): seen})]
    calls over consecutive ranges, each with its levels' running tie indices (default: one call)."""
    K = src.shape[0] - 1
    n = src.shape[1]
    recs = kn.records(kn.MODEL_FIELDS, K)
    for k, fields in enumerate(models):
        for f, v in fields.items():
            recs[f][k] = v
    L = max([len(lv) for lv in levels] + [1])
    out_name = out_name or name
    out = np.empty(n, kn.CONTAINER[out_name])
    bad = np.zeros(K + 1, np.int64)
    comb = kn.records(kn.COMBINE_FIELDS, (), **(combine or {}))[()]
    for lo, hi, seen in units or [(0, n, {})]:
        levs = kn.records(kn.LEVEL_FIELDS, (K, L))
        for k, lv in enumerate(levels):
            for i, fields in enumerate(lv):
                for f, v in {**fields, "seen": seen.get((k, i), 0)}.items():
                    levs[f][k, i] = v
        kn.gta(src, kn.CODES[name], lo, hi, flat0 + lo, bf16_delta, recs, levs,
               np.zeros((K, 1), np.uint8) if masks is None else masks, comb, out, kn.CODES[out_name], bad)
    return from_bits(out, DTYPES[out_name]), list(bad)


def combine_fields(weights, consensus=False, normalize=False, lam=1.0) -> dict:
    divisor = torch_order_sum(weights)
    return dict(consensus=consensus, normalize=normalize, lam=lam,
                divisor=divisor if abs(divisor) >= 1e-8 else np.float32(1.0))


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("consensus,normalize,lam,weights", [(False, False, 1.0, [0.7, -0.4]), (False, True, 1.3, [0.5, 1.0]),
                                                             (True, True, 1.0, [0.6, 0.9]), (True, False, 0.9, [1.0, -0.5]),
                                                             (False, True, 1.0, [0.5, -0.5])])
def test_gta_combinations(name, consensus, normalize, lam, weights):
    """No sparsifier: the weighted sum or TIES sign election, normalised, times lambda, plus the
    base (a divisor below 1e-8 counts as 1); NaN and Inf inputs counted and merged as IEEE."""
    (base, ft1, ft2), src = inputs(20_003, DTYPES[name], (11, 12, 13), nonfinite_from=1)
    deltas = [f.float() - base.float() for f in (ft1, ft2)]
    c = combine_fields(weights, consensus, normalize, lam)
    got, bad = run_gta(src, name, [dict(weight=w) for w in weights], combine=c)
    want = ref.gta_combine(base.float(), deltas, weights, consensus, normalize, float(c["divisor"]), lam).to(DTYPES[name])
    assert same(got, want)
    assert bad == nonfinite([base, ft1, ft2])


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_none_scaled(name):
    """SP_NONE with a scale (DPA's factor on the tensors DP does not prune), then the weight."""
    (base, ft1, ft2), src = inputs(10_000, DTYPES[name], (14, 15, 16))
    got, _ = run_gta(src, name, [dict(scale=1.8, weight=0.5), dict(scale=1.0, weight=0.7)], out_name="F32")
    d = [(f.float() - base.float()) for f in (ft1, ft2)]
    want = ref.gta_combine(base.float(), [d[0] * torch.tensor(1.8), d[1]], [0.5, 0.7], False, False, 1.0, 1.0)
    assert same(got, want)


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_shrink_with_ties_at_the_threshold(name):
    """TIES trimming: keep |d| > t, and the ties |d| == t whose running index is in the window;
    tracked over three calls (units) that carry their ties-before counts. Magnitude pruning: +0.0
    where |d| <= t."""
    dt = DTYPES[name]
    base, ft = torch.zeros(9_001, dtype=dt), hostile(9_001, dt, 21)
    base[::7] = -0.0  # the delta is the fine-tune, the base's zeros signed both ways
    src = np.stack([bits(base), bits(ft)])
    d = ft.float() - base.float()
    t = float(torch.tensor(1e-2 / 2, dtype=dt))  # `hostile` repeats +-scale/2: ~10 % of the elements
    tied = int((d.abs() == t).sum())
    assert tied > 500
    cuts = [0, 2_000, 6_500, 9_001]
    before = [int((d[:c].abs() == t).sum()) for c in cuts]
    units = [(a, b, {(0, 0): before[i]}) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    for kind, value, first, stop in ((kn.TH_VALUE, t, 0, tied // 2), (kn.TH_VALUE, t, 0, 0), (kn.TH_VALUE, 0.0, 0, 10),
                                     (kn.TH_VALUE, t, tied // 4, tied // 2), (kn.TH_VALUE, t, 0, tied),
                                     (kn.TH_GT, t, 0, 0), (kn.TH_ALL, 0.0, 0, 0), (kn.TH_NONE, 0.0, 0, 0)):
        got, _ = run_gta(src, name, [dict(mode=kn.SP_SHRINK, nlevels=1)],
                         [[dict(kind=kind, value=value, first=first, stop=stop)]], out_name="F32", units=units)
        if kind == kn.TH_GT:  # magnitude pruning (DPPA's reference): pruned elements are +0.0
            thinned = ref.magnitude_prune(d, value)
        else:  # TIES (mergekit's tensor * mask)
            thinned = d * {kn.TH_ALL: torch.ones_like(d, dtype=torch.bool), kn.TH_NONE: torch.zeros_like(d, dtype=torch.bool)
                           }.get(kind, ref.tie_window_keep(d, value, first, stop))
        assert same(got, ref.gta_combine(base.float(), [thinned], [1.0], False, False, 1.0, 1.0)), (kind, value, first, stop)


def test_gta_shrink_window_edges_inside_runs_of_ties():
    """Ties in runs of 1 to 5 (signs mixed, NaN and a signed zero between them): every window
    edge, in and across three units, lands beside another tie, where keeping one tie too many or
    too few shows."""
    g = torch.Generator().manual_seed(5)
    t = 0.25
    parts = []
    for i in range(400):
        run = int(torch.randint(1, 6, (1,), generator=g))
        parts += [t if torch.rand(1, generator=g) < 0.5 else -t for _ in range(run)]
        parts += [[0.5, 0.125, -0.0, float("nan"), -1.0][i % 5]]
    ft = torch.tensor(parts, dtype=torch.float32)
    n = ft.numel()
    src = np.stack([bits(torch.zeros(n)), bits(ft)])
    tied = int((ft.abs() == t).sum())
    cuts = [0, n // 3 + 1, 2 * n // 3 - 2, n]
    units = [(a, b, {(0, 0): int((ft[:a].abs() == t).sum())}) for a, b in zip(cuts, cuts[1:])]
    for first, stop in [(0, 1), (0, 2), (0, 37), (0, tied // 2), (0, tied - 1), (3, 4), (tied // 3, tied // 3 + 9),
                        (tied // 2, tied)]:
        got, _ = run_gta(src, "F32", [dict(mode=kn.SP_SHRINK, nlevels=1)],
                         [[dict(kind=kn.TH_VALUE, value=t, first=first, stop=stop)]], out_name="F32", units=units)
        want = ref.gta_combine(torch.zeros(n), [ft * ref.tie_window_keep(ft, t, first, stop)], [1.0], False, False, 1.0,
                               1.0)
        assert same(got, want), (first, stop)


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_bernoulli_and_rescale(name):
    (base, ft), src = inputs(20_000, DTYPES[name], (31, 32), nonfinite_from=1)
    key, density, scale, start = 987654321, 0.4, 1.7, 12_345
    got, bad = run_gta(src, name, [dict(mode=kn.SP_BERNOULLI, key=key, limit=int(density * (1 << 24)), scale=scale,
                                        weight=0.5)], flat0=start)
    mask = torch.from_numpy(reference_keep_mask(key, start, 20_000, density))
    d = (ft.float() - base.float()) * mask * torch.tensor(scale)
    assert same(got, ref.gta_combine(base.float(), [d], [0.5], False, False, 1.0, 1.0).to(DTYPES[name]))
    assert bad == nonfinite([base, ft])


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_dpa_bands(name):
    """DPA on bf16-rounded deltas: delta times the largest factor among the levels that keep it;
    levels compared strictly (TH_GT), tracked with ties kept in a window (TH_VALUE), all, none."""
    dt = DTYPES[name]
    (base, ft), src = inputs(20_000, dt, (41, 42))
    d = (ft.float() - base.float()).to(torch.bfloat16).float()
    a = d.abs()
    t0, t1 = float(a.kthvalue(18_000).values), float(a.kthvalue(16_000).values)
    ties1 = int((a == t1).sum())
    cases = [
        ([dict(kind=kn.TH_GT, value=t0, factor=2.0), dict(kind=kn.TH_GT, value=t1, factor=1.2)],
         [(a > t0, 2.0), (a > t1, 1.2)]),
        ([dict(kind=kn.TH_VALUE, value=t0, factor=1.5, stop=3), dict(kind=kn.TH_VALUE, value=t1, factor=0.5,
                                                                      stop=ties1 // 2)],
         [(ref.tie_window_keep(d, t0, 0, 3), 1.5), (ref.tie_window_keep(d, t1, 0, ties1 // 2), 0.5)]),
        ([dict(kind=kn.TH_NONE, factor=3.0), dict(kind=kn.TH_ALL, factor=0.25), dict(kind=kn.TH_GT, value=t1, factor=1.0)],
         [(torch.zeros_like(a, dtype=torch.bool), 3.0), (torch.ones_like(a, dtype=torch.bool), 0.25), (a > t1, 1.0)]),
    ]
    for levels, keeps in cases:
        got, _ = run_gta(src, name, [dict(mode=kn.SP_BANDS, nlevels=len(levels))], [levels], bf16_delta=True)
        want = ref.gta_combine(base.float(), [d * ref.dpa_factor(d, keeps)], [1.0], False, False, 1.0, 1.0).to(dt)
        assert same(got, want), levels


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("density,gamma", [(0.7, 0.05), (0.3, 0.01), (0.9, 0.0), (0.02, 0.3)])
def test_gta_range_is_breadcrumbs(name, density, gamma):
    """SP_RANGE keeps ranks [n_bot, n_bot + target) of |delta| (a stable sort: ties by index) given
    the two boundary values and each boundary's tie window, over three units carrying their
    running tie indices; then the L1 rescale and the weight."""
    (base, ft), src = inputs(12_000, DTYPES[name], (51, 52))
    d = ft.float() - base.float()
    a = d.abs()
    n = d.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    s = torch.sort(a).values
    lo, hi = float(s[n_bot]), float(s[n_bot + target - 1])
    below_lo, below_hi = int((a < lo).sum()), int((a < hi).sum())
    if lo == hi:
        levels = [dict(value=lo, first=n_bot - below_lo, stop=n_bot + target - below_lo), dict(value=hi)]
    else:
        levels = [dict(value=lo, first=n_bot - below_lo, stop=int((a == lo).sum())),
                  dict(value=hi, stop=n_bot + target - below_hi)]
    cuts = [0, 4_001, 4_002, n]
    units = [(c0, c1, {(0, 0): int((a[:c0] == lo).sum()), (0, 1): int((a[:c0] == hi).sum())})
             for c0, c1 in zip(cuts, cuts[1:])]
    got, _ = run_gta(src, name, [dict(mode=kn.SP_RANGE, nlevels=2, scale=1.25, weight=0.8)],
                     [[dict(kind=kn.TH_VALUE, **lv) for lv in levels]], out_name="F32", units=units)
    keep = ref.breadcrumbs_keep(d, density, gamma)
    assert int(keep.sum()) == target
    want = ref.gta_combine(base.float(), [d * keep * torch.tensor(1.25)], [0.8], False, False, 1.0, 1.0)
    assert same(got, want)


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_mask_is_della(name):
    """SP_MASK: delta times model k's mask over the unit (indexed at the unit-local element, also
    in a sub-range), times the L1 rescale, with TIES sign election over two models."""
    (base, ft1, ft2), src = inputs(10_000, DTYPES[name], (61, 62, 63))
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(2, 10_000, generator=g) < 0.5)
    lo = 1_234
    got, _ = run_gta(src[:, :], name, [dict(mode=kn.SP_MASK, scale=2.0, weight=0.6), dict(mode=kn.SP_MASK, weight=0.9)],
                     masks=masks.numpy().astype(np.uint8), combine=combine_fields([0.6, 0.9], True, True),
                     units=[(lo, 10_000, {})], out_name="F32")
    d = [(f.float() - base.float()) for f in (ft1, ft2)]
    want = ref.gta_combine(base.float(), [d[0] * masks[0] * torch.tensor(2.0), d[1] * masks[1]], [0.6, 0.9], True, True,
                           1.0, 1.0)
    assert same(got[lo:], want[lo:])


@pytest.mark.parametrize("name", list(DTYPES))
def test_weighted_sum_matches_the_linear_formula(name):
    xs, src = inputs(10_000, DTYPES[name], (51, 52, 53), nonfinite_from=2)
    w = [0.25, 0.5, -0.625]
    out = np.empty(10_000, kn.CONTAINER[name])
    total = torch_order_sum(w)
    bad = np.zeros(3, np.int64)
    kn.weighted_sum(src, kn.CODES[name], 0, 10_000, np.array(w, np.float32), True, total, out, kn.CODES[name], bad)
    want = ref.weighted_sum([x.float() for x in xs], w, True, float(total)).to(DTYPES[name])
    assert same(from_bits(out, DTYPES[name]), want)
    assert list(bad) == nonfinite(xs)


# --- DELLA, exact products, row-wise methods ---------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(6, 300), (3, 50, 4), (5, 1)])
def test_della_mask_ranks_like_a_stable_argsort(name, shape):
    """DELLA: within each vector along dim 1, |delta| ranked ascending with ties by position (the
    hostile values are full of ties), keep probability density - eps + 2 eps q, drawn from the
    counter RNG at the element's tensor-wide index."""
    n = int(np.prod(shape))
    (base, ft), src = inputs(n, DTYPES[name], (3, 4))
    key, density, eps, flat0 = 0x1234_5678_9ABC, 0.5, 0.2, 1000
    mask = np.zeros(n, np.uint8)
    kn.della_mask(src, kn.CODES[name], 0, 0, shape[0], shape[1], int(np.prod(shape[2:])), flat0, np.uint64(key),
                  density, eps, mask, np.zeros(2, np.int64))
    rank = ref.della_ranks(ft.float() - base.float(), shape)
    probs = ref.della_keep_probability(rank, shape[1], density, eps)
    expected = np.array([reference_keep_mask(key, flat0 + i, 1, p)[0] for i, p in enumerate(probs)], np.uint8)
    assert n < 10 or 0.3 < expected.mean() < 0.7  # the draw really keeps about `density`
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("deltas", [True, False])
def test_gram_sums_are_the_exact_dot_products(name, deltas):
    """Pairwise dot products (of the inputs, or of each model minus the base) summed exactly:
    compared with rational arithmetic on the float32 values, over several kernel blocks."""
    n = 3 * kn.BLOCK + 123
    xs, src = inputs(n, DTYPES[name], (5, 6, 7))
    vecs = [x.float() for x in xs]
    if deltas:
        vecs = [(v - vecs[0]) for v in vecs[1:]]
    pairs = len(vecs) * (len(vecs) + 1) // 2
    high = np.zeros((pairs, kn.GRAM_BUCKETS), np.int64)
    low = np.zeros_like(high)
    kn.gram_sums(src, kn.CODES[name], 0, n, deltas, high, low, np.zeros(3, np.int64))
    got = exact_products(np.stack([high, low]))
    assert got == [float(ref.exact_dot(vecs[a], vecs[b])) for a in range(len(vecs)) for b in range(a, len(vecs))]


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("deltas", [True, False])
def test_row_gram_and_row_combine(name, deltas):
    """Row-wise methods: per row the dot products in float64 in element order, then a combination
    with per-row coefficients; rows [2, 9) of the unit."""
    row_len, rows = 257, 10
    xs, src = inputs(row_len * rows, DTYPES[name], (71, 72, 73), nonfinite_from=2)
    vecs = [x.float() for x in xs]
    if deltas:
        vecs = [v - vecs[0] for v in vecs[1:]]
    nv, lo, hi = len(vecs), 2, 9
    grams = np.zeros((hi - lo, nv * (nv + 1) // 2))
    bad = np.zeros(3, np.int64)
    kn.row_gram(src, kn.CODES[name], lo, hi, row_len, deltas, grams, bad)
    want = ref.row_dots([v[lo * row_len:hi * row_len] for v in vecs], row_len)
    np.testing.assert_array_equal(grams, want)
    assert list(bad) == nonfinite([x[lo * row_len:hi * row_len] for x in xs])
    coeffs = np.random.default_rng(0).standard_normal((hi - lo, nv)).astype(np.float32)
    out = np.zeros(row_len * rows, kn.CONTAINER[name])
    kn.row_combine(src, kn.CODES[name], lo, hi, row_len, coeffs, deltas, out, kn.CODES[name], np.zeros(3, np.int64))
    span = slice(lo * row_len, hi * row_len)
    want = ref.row_combine([x.float()[span] for x in xs], coeffs, row_len, deltas).to(DTYPES[name])
    assert same(from_bits(out, DTYPES[name])[span], want)


# --- SCE -------------------------------------------------------------------------------------------------

def _sce_inputs(name, n=15_000, nonfinite_from=None):
    xs, src = inputs(n, DTYPES[name], (81, 82, 83, 84), nonfinite_from)
    return xs, src, [x.float() - xs[0].float() for x in xs[1:]]


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("nonfinite_from", [None, 2])
def test_variance_histogram_and_bins(name, nonfinite_from):
    """SCE ranks |variance| (mergekit's var.abs()): its top-16-bit histogram, how many are non-zero
    (NaN counts, as in torch.count_nonzero) and the low-16-bit counts in boundary bins; a NaN
    variance (Inf - Inf) sorts above every number."""
    xs, src, deltas = _sce_inputs(name, nonfinite_from=nonfinite_from)
    n = xs[0].numel()
    var = ref.variance(deltas)
    keys = ref.f32_bits(var.abs())
    hist = np.zeros(kn.HIST_BINS, np.int64)
    bad = np.zeros(4, np.int64)
    nnz = kn.variance_hist(src, kn.CODES[name], 0, n, hist, bad)
    assert np.array_equal(hist, ref.top16_histogram(keys, kn.HIST_BINS))
    assert nnz == int(torch.count_nonzero(var))
    assert list(bad) == nonfinite(xs)
    tops = np.array(sorted({int(np.argmax(hist)), int(keys[7] >> 16), int(keys.max() >> 16)}), np.int64)
    counts = np.zeros((len(tops), 1 << 16), np.int64)
    kn.variance_bins(src, kn.CODES[name], 0, n, tops, counts, bad)
    for i, top in enumerate(tops):
        assert np.array_equal(counts[i], ref.low16_counts(keys, int(top)))


def _sce_selection(var: torch.Tensor, k: int):
    """The kernel's threshold for 'the k largest |variances|, ties lowest index first' (a NaN
    above every number, as torch's sort puts it) and the reference's own selection."""
    keep = ref.top_k_keep(var.abs(), k)
    keys = ref.f32_bits(var.abs())
    t = int(torch.sort(keys, descending=True).values[k - 1])
    value = float(np.array(t, np.uint32).view(np.float32))
    return value, k - int((keys > t).sum()), keep


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("fraction,nonfinite_from", [(0.3, None), (1.0, None), (0.0, None), (0.3, 2)])
def test_sce_squares_and_merge(name, fraction, nonfinite_from):
    """SCE: select the top variances (ties lowest index first), per model the exact Σ (kept delta)^2,
    and the merge with sign election and omega-weighted disjoint mean, over two units."""
    xs, src, deltas = _sce_inputs(name, nonfinite_from=nonfinite_from)
    n = xs[0].numel()
    var = ref.variance(deltas)
    k = int(fraction * n)
    if 0 < k < n:
        kind = kn.TH_VALUE
        value, ties, keep = _sce_selection(var, k)
    else:
        kind, value, ties = (kn.TH_ALL if k >= n else kn.TH_NONE), 0.0, 0
        keep = torch.full((n,), k >= n)
    cut = 6_000
    before = int((ref.f32_bits(var[:cut].abs()) == ref.f32_bits(torch.tensor(value))).sum()) if kind == kn.TH_VALUE else 0
    words = np.zeros((2, 3, kn.GRAM_BUCKETS), np.int64)
    for lo, hi, start in ((0, cut, 0), (cut, n, before)):
        budget = np.array([max(0, ties - start)], np.int64)
        kn.sce_squares(src, kn.CODES[name], lo, hi, kind, np.float32(value), budget, words[0], words[1], np.zeros(4, np.int64))
    if nonfinite_from is None:
        assert exact_products(words) == [float(ref.exact_dot(d * keep, d * keep)) for d in deltas]
    omega = [0.5, 0.2, 0.3]
    out = np.empty(n, np.uint32)
    for lo, hi, start in ((0, cut, 0), (cut, n, before)):
        budget = np.array([max(0, ties - start)], np.int64)
        kn.sce_merge(src, kn.CODES[name], lo, hi, kind, np.float32(value), budget, np.array(omega, np.float32), out,
                     kn.F32, np.zeros(4, np.int64))
    assert same(from_bits(out, torch.float32), ref.sce_merge(xs[0].float(), deltas, keep, omega))


# --- RAM, nearswap, Arcee fusion -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("eps", [1e-5, 0.0, 5e-3])
def test_ram_counts_and_merge(name, eps):
    xs, src = inputs(20_000, DTYPES[name], (91, 92, 93, 94), nonfinite_from=3)
    deltas = [x.float() - xs[0].float() for x in xs[1:]]
    shared, unique = np.zeros(3, np.int64), np.zeros(3, np.int64)
    bad = np.zeros(4, np.int64)
    kn.ram_counts(src, kn.CODES[name], 0, 20_000, np.float32(eps), shared, unique, bad)
    assert (list(shared), list(unique)) == ref.ram_counts(deltas, eps)
    assert list(bad) == nonfinite(xs)
    boost = [1.0, 1.02, 1.2]
    out = np.empty(20_000, kn.CONTAINER[name])
    kn.ram_merge(src, kn.CODES[name], 0, 20_000, np.float32(eps), np.array(boost, np.float32), out, kn.CODES[name],
                 np.zeros(4, np.int64))
    assert same(from_bits(out, DTYPES[name]), ref.ram_merge(xs[0].float(), deltas, eps, boost).to(DTYPES[name]))


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("t", [0.003, 0.0, 1e-9])
def test_nearswap(name, t):
    (base, x), src = inputs(20_000, DTYPES[name], (95, 96), nonfinite_from=1)
    out = np.empty(20_000, kn.CONTAINER[name])
    bad = np.zeros(2, np.int64)
    kn.nearswap(src, kn.CODES[name], 0, 20_000, np.float32(t), out, kn.CODES[name], bad)
    assert same(from_bits(out, DTYPES[name]), ref.nearswap(base.float(), x.float(), t).to(DTYPES[name]))
    assert list(bad) == nonfinite([base, x])


@pytest.mark.parametrize("name", list(DTYPES))
def test_arcee_importance_and_merge(name):
    """Arcee fusion: importance |x - base| x KL(row) (float64 KL, rounded once), its sort-key
    histogram and boundary counts, the exact quartile threshold, and the merge."""
    row_len, rows = 64, 40
    g = torch.Generator().manual_seed(7)
    base = torch.randn(rows * row_len, generator=g) * 0.05
    base[::11] = -0.0
    base = base.to(DTYPES[name])
    x = (base.float() + hostile(rows * row_len, torch.float32, 8, scale=2e-2)).to(DTYPES[name])
    src = np.stack([bits(base), bits(x)])
    importance = ref.arcee_importance(base.float(), x.float(), row_len)
    keys = ref.sort_key(importance)
    tops = np.array(sorted({int(keys[3] >> 16), int(torch.sort(keys).values[1000] >> 16)}), np.int64)
    hist = np.zeros(2 * kn.HIST_BINS, np.int64)
    counts = np.zeros((len(tops), 1 << 16), np.int64)
    kn.arcee_importance(src, kn.CODES[name], 0, rows, row_len, tops, hist, counts, np.zeros(2, np.int64))
    assert np.array_equal(hist, ref.top16_histogram(keys, 2 * kn.HIST_BINS))
    for i, top in enumerate(tops):
        assert np.array_equal(counts[i], ref.low16_counts(keys, int(top)))
    threshold = ref.arcee_threshold(importance)
    out = np.empty(rows * row_len, kn.CONTAINER[name])
    kn.arcee_merge(src, kn.CODES[name], 0, rows, row_len, np.float32(threshold), out, kn.CODES[name], np.zeros(2, np.int64))
    want = ref.arcee_merge(base.float(), x.float(), importance, threshold).to(DTYPES[name])
    assert 0 < int((importance >= threshold).sum()) < rows * row_len
    assert same(from_bits(out, DTYPES[name]), want)


@pytest.mark.parametrize("name", list(DTYPES))
def test_sce_and_arcee_count_nonfinite_inputs(name):
    """The NaN/Inf policy of the kernels whose results with such inputs are not compared above
    (their NaN payloads come from different operations): every non-finite input is counted."""
    xs, src = inputs(4 * 256, DTYPES[name], (1, 2, 3), nonfinite_from=1)
    for run in (lambda bad: kn.variance_hist(src, kn.CODES[name], 0, 1024, np.zeros(kn.HIST_BINS, np.int64), bad),
                lambda bad: kn.sce_merge(src, kn.CODES[name], 0, 1024, kn.TH_ALL, np.float32(0), np.zeros(1, np.int64),
                                         np.ones(2, np.float32), np.empty(1024, np.uint32), kn.F32, bad)):
        bad = np.zeros(3, np.int64)
        run(bad)
        assert list(bad) == nonfinite(xs)
    bad = np.zeros(2, np.int64)
    kn.arcee_merge(src[:2], kn.CODES[name], 0, 4, 256, np.float32(0.1), np.empty(1024, np.uint32), kn.F32, bad)
    assert list(bad) == nonfinite(xs[:2])


def test_sparsify_fills_level_records_in_the_kernels_field_order():
    from dppa_stream import kernels
    from dppa_stream.methods import sparsify

    assert tuple(f[0] for f in kernels.LEVEL_FIELDS) == sparsify.LEVEL_ORDER


def test_exact_sums_round_like_python_integers():
    """The batched exact sum of per-exponent significand sums equals `summaries.exact_sum` (one
    Python integer rounded once), on random rows, carries, halfway cases and zeros."""
    from dppa_stream import summaries

    g = np.random.default_rng(5)
    rows = [np.zeros(256, np.int64)]
    for width in (1, 3, 20, 256):
        for bits in (8, 24, 40, 62):
            r = np.zeros(256, np.int64)
            at = g.choice(256, width, replace=False)
            r[at] = g.integers(0, 1 << bits, width)
            rows.append(r)
    for e in (1, 2, 100, 200):  # exactly halfway between two doubles (ties to even), and just above
        for low in (1, 3):
            for scale in (0, 9):  # 54 bits, or 63 (beyond 64 bits once shifted by the exponent)
                r = np.zeros(256, np.int64)
                r[e] = ((1 << 53) + low) << scale
                rows.append(r.copy())
                if e > 1:
                    r[e - 2] += 1
                    rows.append(r)
    r = np.zeros(256, np.int64)
    r[:] = (1 << 62) + 12345  # carries through every limb
    rows.append(r)
    mants = np.stack(rows)
    out = np.zeros(len(rows))
    kn.exact_sums(mants, out)
    assert out.tolist() == [summaries.exact_sum(m) for m in mants]
