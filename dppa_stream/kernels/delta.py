"""The delta family's merge kernel (mergekit's generalized task arithmetic) and its sparsifiers.

`gta` thins each fine-tune's delta on a span with that model's sparsifier, scales and weights it,
combines the deltas (a sum, or TIES sign election and disjoint sum), normalises, multiplies by
lambda, adds the base and narrows into the output: one fused sweep per block of elements.

What it does to model k is one record, `models[k]` (fields `MODEL_FIELDS`), plus that model's
threshold levels, `levels[k]` (`LEVEL_FIELDS`); the combination is one record (`COMBINE_FIELDS`).
The numpy structured dtypes are made from these declarations, the one place that lists each
field, its type and its default, so planners fill fields by name and nothing is passed by position. A sparsifier is one small inline
row function that thins `x[:m]` in place, one `SP_*` code (in `codes.py`, which needs no numba) and one line in
`sparsify_row`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .core import BLOCK, TH_ALL, TH_GT, TH_NONE, _deltas, keep_draw, narrow_block, tie_trim, widen_block

from .codes import SP_BANDS, SP_BERNOULLI, SP_MASK, SP_NONE, SP_RANGE, SP_SHRINK  # noqa: F401 (sparsifier codes)

# name, numpy type, default
MODEL_FIELDS = (
    ("mode", np.int64, SP_NONE),  # the sparsifier (SP_*)
    ("nlevels", np.int64, 0),  # how many of its `levels` it uses
    ("key", np.uint64, 0),  # SP_BERNOULLI: counter RNG stream
    ("limit", np.uint64, 0),  # SP_BERNOULLI: keep when the draw's top 24 bits are below it
    ("scale", np.float32, 1.0),  # times the thinned delta (L1 rescale; DPA's factor on tensors DP does not prune)
    ("weight", np.float32, 1.0),  # the model's weight in the combination
)
LEVEL_FIELDS = (  # a threshold on |delta| (SP_SHRINK: level 0; SP_BANDS: one per pruning rate; SP_RANGE: low, high)
    ("kind", np.int64, TH_ALL),  # TH_*
    ("value", np.float32, 0.0),
    ("factor", np.float32, 1.0),  # SP_BANDS: what an element first kept at this level is multiplied by
    ("first", np.int64, 0),  # elements with |delta| == value (ties, in flat order) are kept while their running
    ("stop", np.int64, 0),  # index is in [first, stop) ...
    ("seen", np.int64, 0),  # ... counted from `seen`: the ties before this unit; the kernel advances it
)
COMBINE_FIELDS = (
    ("consensus", np.bool_, False),  # TIES sign election and disjoint sum
    ("normalize", np.bool_, False),  # divide by `divisor` (consensus: by the agreeing weights)
    ("divisor", np.float32, 1.0),
    ("lam", np.float32, 1.0),
)


_RECORD_DTYPES: dict = {}  # one dtype per declaration: made once, not per small tensor


def records(fields, shape, **values) -> np.ndarray:
    """An array of records of the declared `fields` holding their defaults, then `values` by field
    name (numba compiles one kernel per dtype, so every array of a declaration has the same one)."""
    dtype = _RECORD_DTYPES.get(fields)
    if dtype is None:
        dtype = _RECORD_DTYPES[fields] = np.dtype([(name, kind) for name, kind, _ in fields])
    out = np.zeros(shape, dtype)
    for name, _, default in fields:
        out[name] = values.pop(name, default)
    if values:
        raise TypeError(f"no such field: {', '.join(values)}")
    return out


# --- sparsifiers: each thins x[:m] in place --------------------------------------------------------

@njit(inline="always")
def window_end(x, m, v, want):
    """(p, ties): p is just past the `want`-th element of x[:m] with |x| == v (m if there are
    fewer), `ties` how many there are in x[:p]. Ties counted 64 at a time (a vectorised sum), then
    the chunk holding the last one element by element: where the window of kept ties ends, without
    a dependent step per element (`tie_trim`'s running index)."""
    got = 0
    for s in range(0, m, 64):
        e = min(s + 64, m)
        c = np.int32(0)
        for j in range(s, e):
            c += np.int32(1) if abs(x[j]) == v else np.int32(0)
        if got + c >= want:
            for j in range(s, e):
                got += abs(x[j]) == v
                if got == want:
                    return j + 1, got
        got += c
    return m, got


@njit(inline="always")
def shrink_row(x, m, lev):
    """Trimming at one level. TIES (TH_VALUE, TH_NONE): x times its keep mask, as mergekit's
    `tensor * mask` (a pruned -x is -0.0); kept are |x| > value (NaN too) and the ties in the
    window. Magnitude pruning (TH_GT, DPPA's reference code): +0.0 where |x| <= value. Once no tie
    can be kept, a select (vectorised)."""
    kind = lev.kind
    v = lev.value
    zero = np.float32(0.0)
    if kind == TH_ALL:
        return
    if kind == TH_NONE:
        for j in range(m):
            x[j] = x[j] * zero
    elif lev.seen < lev.first:  # ties before the window (a later unit of a split tensor): one by one
        rel, span = lev.seen - lev.first, lev.stop - lev.first
        for j in range(m):
            x[j], rel = tie_trim(x[j], v, rel, span, True)
        lev.seen = lev.first + rel
    elif lev.seen < lev.stop:
        p, got = window_end(x, m, v, lev.stop - lev.seen)
        for j in range(m):  # every tie before p is in the window
            a = abs(x[j])
            x[j] = x[j] * zero if a < v or (a == v and j >= p) else x[j]
        lev.seen += got
    elif kind == TH_GT:
        for j in range(m):
            x[j] = zero if abs(x[j]) <= v else x[j]
    else:
        for j in range(m):
            x[j] = x[j] * zero if abs(x[j]) <= v else x[j]


@njit(inline="always")
def bernoulli_row(x, m, first, key, limit):
    """DARE: x * keep-mask, the mask drawn from the counter RNG at flat indices first, first+1, ..."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(m):
        x[j] = x[j] * (one if keep_draw(key, first + j, limit) else zero)


@njit(inline="always")
def bands_row(x, m, lev, nlev, f):
    """DPA: x *= max over levels i of (kept at level i ? factor_i : 0); f is scratch."""
    zero = np.float32(0.0)
    fac = f[:m]
    for i in range(nlev):
        level = lev[i]
        kind = level.kind
        v = level.value
        fl = level.factor
        if kind == TH_ALL:
            for j in range(m):
                fac[j] = fl if i == 0 or fl > fac[j] else fac[j]
        elif kind == TH_GT or kind == TH_NONE:
            if kind == TH_NONE:
                v = np.float32(np.inf)
            for j in range(m):
                got = fl if abs(x[j]) > v else zero
                fac[j] = got if i == 0 or got > fac[j] else fac[j]
        elif level.seen < level.stop:
            rel, span = level.seen - level.first, level.stop - level.first
            for j in range(m):
                kept, rel = tie_trim(x[j], v, rel, span, False)
                got = fl if kept != zero else zero
                fac[j] = got if i == 0 or got > fac[j] else fac[j]
            level.seen = level.first + rel
        else:  # the kept test of a tracked threshold once no tie is left to keep: |x| > v, or NaN
            for j in range(m):
                got = zero if abs(x[j]) <= v or x[j] == zero else fl
                fac[j] = got if i == 0 or got > fac[j] else fac[j]
    for j in range(m):
        x[j] = x[j] * fac[j]


@njit(inline="always")
def range_row(x, m, low, high):
    """Breadcrumbs: keep low.value < |x| < high.value, and the ties at either boundary whose running
    index is in that level's window (ascending ranks, ties by flat index); x * 0 elsewhere."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    lv, lfirst, lstop, lseen = low.value, low.first, low.stop, low.seen
    hv, hfirst, hstop, hseen = high.value, high.first, high.stop, high.seen
    for j in range(m):
        a = abs(x[j])
        if a == lv:
            keep = lfirst <= lseen < lstop
            lseen += 1
        elif a == hv:
            keep = hfirst <= hseen < hstop
            hseen += 1
        else:
            keep = lv < a < hv
        x[j] = x[j] * (one if keep else zero)
    low.seen = lseen
    high.seen = hseen


@njit(inline="always")
def mask_row(x, m, mask):
    """DELLA: x * mask (made per unit before merging: its ranks need whole vectors)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(m):
        x[j] = x[j] * (one if mask[j] else zero)


@njit(inline="always")
def sparsify_row(x, m, s, first, model, lev, mask, scratch):
    """Model `model`'s sparsifier on x[:m], unit-local elements [s, s+m), flat index `first` on."""
    mode = model.mode
    if mode == SP_SHRINK:
        shrink_row(x, m, lev[0])
    elif mode == SP_BERNOULLI:
        bernoulli_row(x, m, first, model.key, model.limit)
    elif mode == SP_BANDS:
        bands_row(x, m, lev, model.nlevels, scratch)
    elif mode == SP_RANGE:
        range_row(x, m, lev[0], lev[1])
    elif mode == SP_MASK:
        mask_row(x, m, mask[s:s + m])


@njit(inline="always")
def _scale(x, m, f):
    """x[:m] *= f, skipped when f is 1 (deltas are results of arithmetic, never signalling NaNs, so
    x * 1 is x)."""
    if f != np.float32(1.0):
        for j in range(m):
            x[j] = x[j] * f


# --- the fused loop ----------------------------------------------------------------------------------

@njit(nogil=True, cache=True, error_model="numpy")
def gta(src, code, lo, hi, flat0, bf16_delta, models, levels, masks, combine, out, out_code, bad):
    """Generalized task arithmetic over unit-local elements [lo, hi) (flat0: the tensor-wide index
    of element lo): per fine-tune k (row k + 1 of src), delta -> sparsify (models[k].mode, its
    levels[k]) -> scale -> weight; then the sum, or with `combine.consensus` the TIES sign election
    (majority sign of the weighted sum, 0 counting as +) and disjoint sum of the agreeing deltas;
    divided by the divisor (consensus: the agreeing weights) when `normalize`; times lambda; plus the
    base; narrowed into `out` at the same unit-local index. The float32 operation order is
    mergekit's (docs/mergekit.md). `masks[k]` is model k's DELLA mask over the unit (SP_MASK).
    `levels[k, i].seen` is advanced past the ties this call saw."""
    K = src.shape[0] - 1
    _gta(src, code, lo, hi, flat0, bf16_delta, models, levels, masks, combine, out, out_code, bad,
         np.empty(BLOCK, np.float32), np.empty((K, BLOCK), np.float32), np.empty(BLOCK, np.float32),
         np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32))


@njit(inline="always")
def _gta(src, code, lo, hi, flat0, bf16_delta, models, levels, masks, combine, out, out_code, bad, base, d, acc, den,
         maj):
    """`gta` with its scratch given (a batch's segments share one set: fresh pages per call cost more
    than merging a small tensor)."""
    K = src.shape[0] - 1
    zero = np.float32(0.0)
    one = np.float32(1.0)
    consensus, normalize, divisor, lam = combine.consensus, combine.normalize, combine.divisor, combine.lam
    for s in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - s)
        bad[0] += widen_block(src[0], code, s, m, base)
        for k in range(K):
            row = d[k]
            bad[k + 1] += _deltas(src, code, k + 1, s, m, base, row, bf16_delta)
            model = models[k]
            sparsify_row(row, m, s, flat0 + s - lo, model, levels[k], masks[k], acc)
            _scale(row, m, model.scale)
            _scale(row, m, model.weight)
        a = acc[:m]
        a[:] = d[0, :m]
        for k in range(1, K):
            x = d[k, :m]
            for j in range(m):
                a[j] = a[j] + x[j]
        if consensus:
            g = maj[:m]
            dn = den[:m]
            for j in range(m):
                g[j] = one if a[j] >= zero else -one
            for k in range(K):
                x = d[k, :m]
                w = models[k].weight
                for j in range(m):
                    sgn = one if x[j] > zero else (-one if x[j] < zero else zero)  # torch.sign
                    mask = sgn * g[j]
                    mask = zero if mask < zero else mask  # clamp(min=0): -0.0 stays -0.0
                    if k == 0:
                        a[j] = x[j] * mask
                        dn[j] = mask * w
                    else:
                        a[j] = a[j] + x[j] * mask
                        dn[j] = dn[j] + mask * w
            for j in range(m):
                dn[j] = one if dn[j] == zero else dn[j]
            if normalize:
                for j in range(m):
                    a[j] = a[j] / dn[j]
        elif normalize:
            for j in range(m):
                a[j] = a[j] / divisor
        _scale(a, m, lam)
        b = base[:m]
        for j in range(m):
            a[j] = b[j] + a[j]
        narrow_block(acc, m, out, s, out_code)


@njit(nogil=True, cache=True, error_model="numpy")
def gta_segments(src, code, starts, bf16_delta, models, levels, masks, combine, out, out_code, bad):
    """`gta` over a batch of whole tensors (`units.BatchRows`): tensor k is columns
    starts[k]:starts[k+1] of src and out, with its own records models[k], levels[k] and
    combine[k] (one call per batch instead of one per tensor)."""
    K = src.shape[0] - 1
    base, d = np.empty(BLOCK, np.float32), np.empty((K, BLOCK), np.float32)
    acc, den, maj = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for k in range(starts.shape[0] - 1):
        _gta(src, code, starts[k], starts[k + 1], 0, bf16_delta, models[k], levels[k], masks, combine[k], out,
             out_code, bad, base, d, acc, den, maj)
