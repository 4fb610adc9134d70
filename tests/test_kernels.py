"""Each fused kernel equals a plain torch expression of the same formula, bit for bit, on every
input dtype: exact zeros, ±0, denormals, ties at thresholds, huge and tiny values included."""

import numpy as np
import pytest
import torch

from dppa_stream import kernels as kn
from dppa_stream.methods.base import torch_order_sum

from .reference import keep_mask as reference_keep_mask

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
TORCH_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> np.ndarray:
    """The stored bit patterns of a torch tensor as the kernels' unsigned container."""
    view = t.contiguous().view(TORCH_BITS[t.dtype]).numpy()
    return view.view(np.uint16 if view.itemsize == 2 else np.uint32)


def from_bits(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16 if a.itemsize == 2 else np.int32).copy()).view(dtype)


def hostile(n: int, dtype, seed: int = 0, scale: float = 1e-2) -> torch.Tensor:
    """Values with every corner a merge meets: zeros of both signs, denormals, repeated values
    (ties), tiny and large magnitudes."""
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
    return x.to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bit patterns (NaN payloads aside)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and np.array_equal(bits(a)[~nan.numpy()], bits(b)[~nan.numpy()])


# --- widening, narrowing, rounding ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_widen_every_16_bit_pattern(name):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(raw.size, np.float32)
    bad = kn.widen_block(raw, kn.CODES[name], 0, raw.size, out)
    want = from_bits(raw, DTYPES[name]).float()
    assert same(torch.from_numpy(out), want)
    assert bad == int((~torch.isfinite(want)).sum())


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
    d = (a - b).float().abs().view(torch.int32) >> 16  # torch computes a bf16 subtraction in float32 and rounds once
    assert np.array_equal(hist[0], np.bincount(d.numpy(), minlength=kn.HIST_BINS))


# --- statistics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_abs_summaries_and_bin_counts(name):
    dt = DTYPES[name]
    base, ft1, ft2 = (hostile(30_001, dt, s) for s in (5, 6, 7))
    src = np.stack([bits(base), bits(ft1), bits(ft2)])
    n = base.numel()
    hists, mants = np.zeros((2, kn.HIST_BINS), np.int64), np.zeros((2, 256), np.int64)
    kn.abs_summaries(src, kn.CODES[name], np.array([0, 1]), 0, n, False, True, hists, mants, np.zeros(3, np.int64))
    for i, ft in enumerate((ft1, ft2)):
        ab = (ft.float() - base.float()).abs().view(torch.int32).long()
        assert np.array_equal(hists[i], torch.bincount(ab >> 16, minlength=kn.HIST_BINS).numpy())
        exp = ab >> 23
        sig = (ab & 0x7FFFFF) | ((exp > 0).long() << 23)
        assert np.array_equal(mants[i], torch.bincount(exp, weights=sig.double(), minlength=256).long().numpy())
        busiest = int(np.argmax(hists[i]))
        counts = np.zeros((1, 1 << 16), np.int64)
        kn.bin_counts(src, kn.CODES[name], i, 0, n, False, np.array([busiest]), counts, np.zeros(3, np.int64))
        inside = ab[(ab >> 16) == busiest] & 0xFFFF
        assert np.array_equal(counts[0], torch.bincount(inside, minlength=1 << 16).numpy())


def test_keep_draw_matches_the_reference_rng():
    key, limit = 0x1234_5678_9ABC_DEF0, int(0.3 * (1 << 24))
    got = kn.keep_mask(key, 1_000_000, 50_000, limit)
    assert np.array_equal(got, reference_keep_mask(key, 1_000_000, 50_000, 0.3))
    assert abs(got.mean() - 0.3) < 0.01


# --- the generalized task arithmetic kernel -------------------------------------------------------

def _torch_merge(base, deltas, weights, consensus, normalize, lam):
    """mergekit's formula as plain torch (the previous implementation's expression)."""
    weighted = [d * w if w != 1 else d.clone() for d, w in zip(deltas, weights)]
    if consensus:
        total = weighted[0].clone()
        for t in weighted[1:]:
            total += t
        majority = (total >= 0).to(torch.float32).mul_(2).sub_(1)
        masks = [wd.sign().mul_(majority).clamp_(min=0) for wd in weighted]
        mixed = weighted[0].mul_(masks[0]).clone()
        for wd, m in zip(weighted[1:], masks[1:]):
            mixed += wd.mul_(m)
        divisor = masks[0].mul_(weights[0]).clone()
        for m, w in zip(masks[1:], weights[1:]):
            divisor += m.mul_(w)
        divisor.add_(divisor == 0)
    else:
        mixed = weighted[0].clone()
        for t in weighted[1:]:
            mixed += t
        divisor = torch.tensor(weights, dtype=torch.float32).sum()
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


_LEVEL_KEYS = {"kinds": "kind", "values": "value", "factors": "factor"}


def _gta(src, name, sparse, weights, consensus=False, normalize=False, lam=1.0, bf16_delta=False, out_name=None,
         flat0=0, budget=None):
    """kernels.gta with its records filled by field name: `sparse` per model, MODEL fields and the
    per-level lists kinds/values/factors; `budget`: per model and level, ties kept."""
    K = src.shape[0] - 1
    models = kn.records(kn.MODEL_FIELDS, K, weight=np.array(weights, np.float32))
    L = max([len(np.atleast_1d(s.get("kinds", 0))) for s in sparse] + [1])
    levels = kn.records(kn.LEVEL_FIELDS, (K, L))
    for k, s in enumerate(sparse):
        for key, v in s.items():
            if key in _LEVEL_KEYS:
                v = np.atleast_1d(v)
                levels[_LEVEL_KEYS[key]][k, :v.size] = v
                models["nlevels"][k] = max(models["nlevels"][k], v.size)
            else:
                models[key][k] = v
    if budget is not None:
        levels["stop"][:, :budget.shape[1]] = budget
    n = src.shape[1]
    out_name = out_name or name
    out = np.empty(n, kn.CONTAINER[out_name])
    divisor = torch_order_sum(weights)
    combine = kn.records(kn.COMBINE_FIELDS, (), consensus=consensus, normalize=normalize, divisor=divisor, lam=lam)[()]
    kn.gta(src, kn.CODES[name], 0, n, flat0, bf16_delta, models, levels, np.zeros((K, 1), np.uint8), combine, out,
           kn.CODES[out_name], np.zeros(K + 1, np.int64))
    return from_bits(out, DTYPES[out_name])


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("consensus,normalize,lam,weights", [(False, False, 1.0, [0.7, -0.4]), (False, True, 1.3, [0.5, 1.0]),
                                                             (True, True, 1.0, [0.6, 0.9]), (True, False, 0.9, [1.0, -0.5])])
def test_gta_sum_and_consensus(name, consensus, normalize, lam, weights):
    dt = DTYPES[name]
    base, ft1, ft2 = (hostile(20_003, dt, s) for s in (11, 12, 13))
    src = np.stack([bits(base), bits(ft1), bits(ft2)])
    deltas = [f.float() - base.float() for f in (ft1, ft2)]
    want = _torch_merge(base.float(), deltas, weights, consensus, normalize, lam).to(dt)
    assert same(_gta(src, name, [{}, {}], weights, consensus, normalize, lam), want)


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_shrink_with_ties_at_the_threshold(name):
    """TIES trimming: keep |d| > t, and the first `ties` elements with |d| == t (lowest index)."""
    dt = DTYPES[name]
    base, ft = torch.zeros(9_001, dtype=dt), hostile(9_001, dt, 22)
    d = ft.float() - base.float()
    t = float(torch.tensor(1e-2 / 2, dtype=dt))  # `hostile` repeats ±scale/2: ~10 % of the elements
    tied = int((d.abs() == t).sum())
    assert tied > 500
    for kind, value, ties in ((kn.TH_VALUE, t, tied // 2), (kn.TH_VALUE, t, 0), (kn.TH_VALUE, 0.0, 10),
                              (kn.TH_ALL, 0.0, 0), (kn.TH_NONE, 0.0, 0)):
        src = np.stack([bits(base), bits(ft)])
        got = _gta(src, name, [dict(mode=kn.SP_SHRINK, kinds=kind, values=value)], [1.0], out_name="F32",
                   budget=np.array([[ties]]))
        if kind == kn.TH_ALL:
            kept = d.clone()
        elif kind == kn.TH_NONE:
            kept = torch.zeros_like(d)
        else:
            kept = torch.nn.functional.hardshrink(d, value)
            eq = (d.abs() == value).nonzero().flatten()[:ties]
            kept[eq] = d[eq]
        assert same(got, base.float() + kept), (kind, value, ties)


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_bernoulli_and_rescale(name):
    dt = DTYPES[name]
    base, ft = hostile(20_000, dt, 31), hostile(20_000, dt, 32)
    src = np.stack([bits(base), bits(ft)])
    key, density, scale, start = 987654321, 0.4, 1.7, 12_345
    got = _gta(src, name, [dict(mode=kn.SP_BERNOULLI, key=key, limit=int(density * (1 << 24)), scale=scale)], [0.5], flat0=start)
    mask = torch.from_numpy(reference_keep_mask(key, start, 20_000, density))
    d = (ft.float() - base.float()) * mask
    d.mul_(scale)
    assert same(got, (base.float() + d * 0.5).to(dt))


@pytest.mark.parametrize("name", list(DTYPES))
def test_gta_dpa_bands(name):
    """DPA: delta times the largest band factor among the levels that keep it; bf16 deltas."""
    dt = DTYPES[name]
    base, ft = hostile(20_000, dt, 41), hostile(20_000, dt, 42)
    src = np.stack([bits(base), bits(ft)])
    d = (ft.float() - base.float()).to(torch.bfloat16).float()
    t0, t1 = float(d.abs().kthvalue(18_000).values), float(d.abs().kthvalue(16_000).values)
    factors = [2.0, 1.2]
    got = _gta(src, name, [dict(mode=kn.SP_BANDS, kinds=[kn.TH_GT, kn.TH_GT], values=[t0, t1], factors=factors)], [1.0], bf16_delta=True)
    factor = torch.maximum((d.abs() > t0).float() * factors[0], (d.abs() > t1).float() * factors[1])
    assert same(got, (base.float() + d * factor).to(dt))


@pytest.mark.parametrize("name", list(DTYPES))
def test_weighted_sum_matches_torch_sum_over_models(name):
    dt = DTYPES[name]
    xs = [hostile(10_000, dt, s) for s in (51, 52, 53)]
    w = torch.tensor([0.25, 0.5, -0.625])
    src = np.stack([bits(x) for x in xs])
    out = np.empty(10_000, kn.CONTAINER[name])
    total = torch_order_sum(w.numpy())
    kn.weighted_sum(src, kn.CODES[name], 0, 10_000, w.numpy(), True, total, out, kn.CODES[name], np.zeros(3, np.int64))
    stacked = torch.stack([x.float() for x in xs])
    want = ((w.reshape(-1, 1) * stacked).sum(dim=0) / w.sum()).to(dt)
    assert same(from_bits(out, dt), want)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(6, 300), (3, 50, 4), (5, 1)])
def test_della_mask_ranks_like_a_stable_argsort(name, shape):
    """DELLA: within each vector along dim 1, |delta| ranked ascending with ties by position (the
    hostile values are full of ties), keep probability density - eps + 2 eps q, drawn from the
    counter RNG at the element's tensor-wide index."""
    dtype = DTYPES[name]
    n = int(np.prod(shape))
    base, ft = hostile(n, dtype, seed=3), hostile(n, dtype, seed=4)
    src = np.stack([bits(base), bits(ft)])
    key, density, eps, flat0 = 0x1234_5678_9ABC, 0.5, 0.2, 1000
    mask = np.zeros(n, np.uint8)
    bad = np.zeros(2, np.int64)
    d1, rest = shape[1], int(np.prod(shape[2:]))
    kn.della_mask(src, kn.CODES[name], 0, 0, shape[0], d1, rest, flat0, np.uint64(key), density, eps, mask, bad)

    delta = (ft.float() - base.float()).reshape(shape[0], d1, rest)
    order = torch.argsort(delta.abs(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d1).view(1, d1, 1).expand_as(order))
    expected = np.zeros(n, np.uint8)
    for flat, r in enumerate(rank.reshape(-1).tolist()):
        q = r / (d1 - 1) if d1 > 1 else 0.5
        p = max(0.0, min(1.0, density - eps + 2.0 * eps * q))
        expected[flat] = reference_keep_mask(key, flat0 + flat, 1, p)[0]
    assert n < 10 or 0.3 < expected.mean() < 0.7  # the draw really keeps about `density`
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("deltas", [True, False])
def test_gram_sums_are_the_exact_dot_products(name, deltas):
    """Pairwise dot products (of the inputs, or of each model minus the base) summed exactly:
    compared with rational arithmetic on the float32 values, over several kernel blocks."""
    from fractions import Fraction

    from dppa_stream.statistics import exact_products

    dtype = DTYPES[name]
    n = 3 * kn.BLOCK + 123
    xs = [hostile(n, dtype, seed=s) for s in (5, 6, 7)]
    src = np.stack([bits(x) for x in xs])
    vecs = [x.float() for x in xs]
    if deltas:
        vecs = [(v - vecs[0]) for v in vecs[1:]]
    nv = len(vecs)
    pairs = nv * (nv + 1) // 2
    high = np.zeros((pairs, kn.GRAM_BUCKETS), np.int64)
    low = np.zeros_like(high)
    kn.gram_sums(src, kn.CODES[name], 0, n, deltas, high, low, np.zeros(3, np.int64))
    got = exact_products(np.stack([high, low]))
    expected = []
    for a in range(nv):
        for b in range(a, nv):
            total = sum((Fraction(float(p)) for p in (vecs[a].double() * vecs[b].double()).tolist()), Fraction(0))
            expected.append(float(total))
    assert got == expected
