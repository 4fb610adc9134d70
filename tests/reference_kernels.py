"""Independent references for every fused kernel, written from the formulas of docs/mergekit.md
and mergekit 0.1.5's merge methods (`tensor * mask`, `torch.sign`, clamps, sorts), with whole
tensors: torch float32 elementwise arithmetic in the formula's written order, float64 where the
method computes in float64, exact rationals (`Fraction`) for exact sums, and stable sorts for
ranks. Nothing here imports dppa_stream: a mistake in the engine cannot hide behind the same
mistake in its check.

Sums over models are written as explicit loops from the first model on (or from 0.0 where the
method starts there), so the float32 order is the one the formula names, not torch's reduction order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# --- bits --------------------------------------------------------------------------------------------


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of x as non-negative int64."""
    return x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF


def sort_key(x: torch.Tensor) -> torch.Tensor:
    """An unsigned 32-bit key per float32 value that orders like the values (negatives below
    positives, -0 just below +0): flip every bit of a negative, set the sign bit of the rest."""
    b = f32_bits(x)
    return torch.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)


def top16_histogram(keys: torch.Tensor, bins: int) -> np.ndarray:
    return torch.bincount(keys >> 16, minlength=bins).numpy()


def low16_counts(keys: torch.Tensor, top: int) -> np.ndarray:
    """How many keys have top 16 bits `top`, by their low 16 bits."""
    return torch.bincount(keys[(keys >> 16) == top] & 0xFFFF, minlength=1 << 16).numpy()


# --- exact sums --------------------------------------------------------------------------------------


def exact_sum(values) -> Fraction:
    """Σ of finite floats, exactly."""
    return sum((Fraction(float(v)) for v in values), Fraction(0))


def exact_abs_sum(x: torch.Tensor) -> Fraction:
    return exact_sum(x.abs().double().reshape(-1).tolist())


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    """Σ a_i b_i exactly (a product of two float32 values is exact in float64)."""
    return exact_sum((a.double() * b.double()).reshape(-1).tolist())


# --- thresholds and the delta family's sparsifiers ---------------------------------------------------


def tie_window_keep(d: torch.Tensor, value: float, first: int, stop: int, seen: int = 0) -> torch.Tensor:
    """The threshold rule: keep |d| > value (NaN too: it is not <= value) and the elements with
    |d| == value whose running index among those ties, in flat order starting at `seen`, is in
    [first, stop)."""
    a = d.abs()
    keep = ~(a <= value)
    ties = (a == value).nonzero().flatten()
    index = torch.arange(seen, seen + ties.numel())
    keep[ties] = (index >= first) & (index < stop)
    return keep


def magnitude_prune(d: torch.Tensor, value: float) -> torch.Tensor:
    """DPPA's reference magnitude pruning: delta set to 0 wherever |delta| <= t (a +0.0, as
    `torch.where` writes it; NaN is not <= t and stays)."""
    return torch.where(d.abs() <= value, torch.tensor(0.0), d)


def breadcrumbs_keep(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers: drop the int(gamma n) largest |d| and the smallest, keeping
    int(density n): ranks [n_bot, n_bot + target) of a stable ascending sort (ties by index)."""
    n = d.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    order = torch.sort(d.abs(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bot:n_bot + target]] = True
    return keep


def top_k_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of x, ties at the boundary lowest index first (a stable descending sort)."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.sort(x, descending=True, stable=True).indices[:k]] = True
    return keep


def della_ranks(d: torch.Tensor, shape: tuple) -> torch.Tensor:
    """0-based rank of |d| within each vector along dim 1 (ascending, ties by position)."""
    v = d.reshape(shape[0], shape[1], -1).abs()
    order = torch.argsort(v, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(shape[1]).view(1, -1, 1).expand_as(order))
    return rank.reshape(-1)


def della_keep_probability(rank: torch.Tensor, n: int, density: float, epsilon: float) -> list[float]:
    """DELLA's p = density - epsilon + 2 epsilon (rank - 1) / (n - 1) (1-based rank; 0.5 in the
    middle for a vector of one element), clamped to [0, 1]."""
    out = []
    for r in rank.tolist():
        q = r / (n - 1) if n > 1 else 0.5
        out.append(max(0.0, min(1.0, density - epsilon + 2.0 * epsilon * q)))
    return out


def dpa_factor(d: torch.Tensor, levels: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """DPA: max over levels of (kept at that level ? its factor : 0), levels = [(keep mask, factor)]."""
    f = torch.zeros_like(d)
    for i, (keep, factor) in enumerate(levels):
        got = torch.where(keep, torch.tensor(factor, dtype=torch.float32), torch.tensor(0.0))
        f = got if i == 0 else torch.maximum(f, got)
    return f


def gta_combine(base: torch.Tensor, thinned: list[torch.Tensor], weights: list[float], consensus: bool,
                normalize: bool, divisor: float, lam: float) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification: deltas times their weights;
    with consensus the majority sign of their sum (>= 0 counts as +) and the sum of those whose
    sign agrees, divided by the agreeing weights (1 where none agree); else the sum, divided by
    `divisor`; times lambda; plus the base."""
    w = [torch.tensor(x, dtype=torch.float32) for x in weights]
    wd = [d * wk for d, wk in zip(thinned, w)]
    total = wd[0]
    for x in wd[1:]:
        total = total + x
    if consensus:
        majority = torch.where(total >= 0, 1.0, -1.0)
        agree = [x.sign() == majority for x in wd]
        mixed = wd[0] * agree[0]
        den = w[0] * agree[0]
        for x, a, wk in zip(wd[1:], agree[1:], w[1:]):
            mixed = mixed + x * a
            den = den + wk * a
        den = torch.where(den == 0, torch.tensor(1.0), den)
        if normalize:
            mixed = mixed / den
    else:
        mixed = total / torch.tensor(divisor, dtype=torch.float32) if normalize else total
    if lam != 1:
        mixed = mixed * torch.tensor(lam, dtype=torch.float32)
    return base + mixed


def weighted_sum(xs: list[torch.Tensor], weights: list[float], normalize: bool, total: float) -> torch.Tensor:
    """linear: Σ w_i x_i accumulated from 0.0 in input order, divided by Σ w when normalising."""
    acc = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights):
        acc = acc + torch.tensor(w, dtype=torch.float32) * x
    return acc / torch.tensor(total, dtype=torch.float32) if normalize else acc


# --- row-wise methods ----------------------------------------------------------------------------------


def row_dots(vectors: list[torch.Tensor], row_len: int) -> np.ndarray:
    """Per row, the pairwise dot products (a <= b, row-major) summed in float64 in element order."""
    rows = [v.reshape(-1, row_len).double().numpy() for v in vectors]
    out = []
    with np.errstate(invalid="ignore"):  # Inf * 0 and Inf - Inf are NaN here as in the kernel
        for r in range(rows[0].shape[0]):
            out.append([np.cumsum(rows[a][r] * rows[b][r])[-1] for a in range(len(rows)) for b in range(a, len(rows))])
    return np.array(out)


def row_combine(inputs: list[torch.Tensor], coeffs: np.ndarray, row_len: int, deltas: bool) -> torch.Tensor:
    """Per row r: base + Σ_k c[r, k] (x_k - base) (deltas) or Σ_k c[r, k] x_k, from 0.0 in order."""
    c = torch.from_numpy(coeffs.astype(np.float32))
    xs = [x.reshape(-1, row_len) for x in inputs]
    base, vecs = (xs[0], [x - xs[0] for x in xs[1:]]) if deltas else (None, xs)
    acc = torch.zeros_like(vecs[0])
    for k, v in enumerate(vecs):
        acc = acc + c[:, k:k + 1] * v
    return (base + acc if deltas else acc).reshape(-1)


# --- SCE, RAM, nearswap, Arcee fusion --------------------------------------------------------------------


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models of each element, in float64 (torch.var(unbiased=False)
    of the float64 deltas), rounded to float32."""
    return torch.stack([d.double() for d in deltas]).var(dim=0, unbiased=False).float()


def sce_merge(base: torch.Tensor, deltas: list[torch.Tensor], keep: torch.Tensor, omega: list[float]) -> torch.Tensor:
    """mergekit's SCE after selection: masked deltas, majority sign of their sum (>= 0 counts as +),
    base + Σ d_i e_i / max(Σ e_i, 1e-6) with e_i = omega_i where sign(d_i) agrees, else 0."""
    tv = [d * keep for d in deltas]
    total = tv[0]
    for x in tv[1:]:
        total = total + x
    majority = torch.where(total >= 0, 1.0, -1.0)
    num = den = None
    for x, w in zip(tv, omega):
        e = torch.tensor(w, dtype=torch.float32) * (x.sign() == majority)
        num = x * e if num is None else num + x * e
        den = e if den is None else den + e
    return base + num / den.clamp(min=1e-6)


def ram_merge(base: torch.Tensor, deltas: list[torch.Tensor], eps: float, boost: list[float]) -> torch.Tensor:
    """mergekit's RAM / RAM+: an element changed (|d| > eps) by exactly one model takes that model's
    delta times its boost, one changed by several the sum of their deltas divided by how many;
    summed from 0.0 over the changing models in order, plus the base."""
    e = torch.tensor(eps, dtype=torch.float32)
    changed = [d.abs() > e for d in deltas]
    count = sum(c.int() for c in changed)
    total = torch.zeros_like(base)
    for d, c, b in zip(deltas, changed, boost):
        term = torch.where(count == 1, d * torch.tensor(b, dtype=torch.float32), d / count.clamp(min=1).float())
        total = torch.where(c, total + term, total)
    return base + total


def ram_counts(deltas: list[torch.Tensor], eps: float) -> tuple[list[int], list[int]]:
    """Per model: its changes (|d| > eps) that another model also makes, and those only it makes."""
    e = torch.tensor(eps, dtype=torch.float32)
    changed = [d.abs() > e for d in deltas]
    count = sum(c.int() for c in changed)
    return ([int((c & (count > 1)).sum()) for c in changed], [int((c & (count == 1)).sum()) for c in changed])


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's nearswap: w = clamp(t / clamp(|base - x|, min=1e-6), 0, 1); w x + (1 - w) base."""
    w = (torch.tensor(t, dtype=torch.float32) / (base - x).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * base


def row_kl(x: torch.Tensor, b: torch.Tensor) -> float:
    """KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) of one row, in float64 with Python's libm, the
    maxima subtracted and every sum taken in element order; rounded once to float32."""
    xs, bs = [float(v) for v in x.tolist()], [float(v) for v in b.tolist()]
    mx, mb = max(xs), max(bs)
    sx = sb = 0.0
    for u, v in zip(xs, bs):
        sx += math.exp(u - mx)
        sb += math.exp(v - mb)
    kl = 0.0
    for u, v in zip(xs, bs):
        p = math.exp(u - mx) / sx + 1e-8
        q = math.exp(v - mb) / sb + 1e-8
        kl += p * math.log(p / q)
    return float(np.float32(kl))


def arcee_importance(base: torch.Tensor, x: torch.Tensor, row_len: int) -> torch.Tensor:
    """|x - base| times the row's KL, float32."""
    xr, br = x.reshape(-1, row_len), base.reshape(-1, row_len)
    kl = torch.tensor([row_kl(xr[r], br[r]) for r in range(xr.shape[0])], dtype=torch.float32)
    return ((xr - br).abs() * kl.view(-1, 1)).reshape(-1)


def arcee_threshold(importance: torch.Tensor) -> float:
    """median + 1.5 (q3 - q1), the quantiles at index floor(q (n - 1)) (q as float32) of the sorted
    importance, in float32."""
    s = torch.sort(importance).values
    n = s.numel()
    q1, med, q3 = (s[int(np.float32(q) * np.float32(n - 1))] for q in (0.25, 0.5, 0.75))
    return float(med + 1.5 * (q3 - q1))


def arcee_merge(base: torch.Tensor, x: torch.Tensor, importance: torch.Tensor, threshold: float) -> torch.Tensor:
    """mergekit's Arcee fusion: base + (x - base) * (importance >= threshold)."""
    return base + (x - base) * (importance >= torch.tensor(threshold, dtype=torch.float32))
