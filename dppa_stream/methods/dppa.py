"""DPPA (Zhu, Xia & Zhang, arXiv 2403.02799): Dynamic Pruning + Dynamic Partition Amplification.

DP gives each block-linear weight its own density from two outlier-ratio signals of its delta
(block level: share of |delta| above `layer_outlier_multiple` x the block mean; linear level:
above `outlier_multiple` x the tensor mean), normalised across the model and scaled by `lamda`.
DPA prunes at several rates (default 0.9 and 0.8) from ONE statistics pass; the nested kept sets
form partitions, and an element first kept at level j is multiplied by max over k >= j of the
amplification factors. Tensors DP does not prune keep their dense delta (amplified by the largest
factor when `amplify_unpruned`, as the reference code does). Each fine-tune is handled on its own,
then the deltas are combined (`combine: sum | mean | ties`).

`semantics: reference` reproduces the authors' code: delta rounded to bf16, their bf16 rounding
of means and outlier tests, k = int(n*s), threshold = 0-based k-th smallest |delta|, prune <= it.
All of that is exact from one 16-bit histogram per tensor, so DPPA costs two reads of the inputs.
`semantics: exact` uses float32 deltas, exact outlier counts and keeps exactly n - int(n*s)
elements (ties by lowest index); it needs two more statistics passes.
See docs/dppa.md for every choice made where the paper and code are silent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import summaries
from ..checkpoint import FLOAT_DTYPES
from .base import Param
from .gta import TaskArithmetic
from .sparsify import Decision, Sparsifier

DEFAULT_LINEAR_FILTER = r"(?:^|\.)layers\.(\d+)\."


def _rates_check(v):
    if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in v):
        return "must be a non-empty list of pruning rates in [0, 1)"
    if any(a <= b for a, b in zip(v, v[1:])):
        return "must be strictly decreasing (e.g. [0.9, 0.8])"
    return None


def _factors_check(v):
    if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v):
        return "must be a non-empty list of non-negative factors"
    return None


def _choice(*options):
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _regex_check(v):
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


def bf16(x: float) -> float:
    """Round to bfloat16 (through float32, as a bf16 op computed in float32 would)."""
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


_BIN_VALUES = torch.arange(summaries.HIST_BINS, dtype=torch.int32).mul(1 << 16).view(torch.float32)


@dataclass
class TensorReport:
    """DP statistics and decisions for one linear weight of one model."""

    name: str
    block: int
    numel: int
    mean_abs: float
    outlier_ratio: float  # r_ij, percent
    linear_score: float = 0.0  # T_ij in [-1, 1]
    densities: list = field(default_factory=list)  # per pruning rate, after clamping
    clamped: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # realised kept counts (ties included)


@dataclass
class BlockReport:
    block: int
    numel: int
    mean_abs: float
    outlier_ratio: float  # D_i, percent
    layer_score: float = 0.0  # L_i in [-1, 1]


@dataclass
class ModelReport:
    model: int
    blocks: list
    tensors: list

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def normalise(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(v - mean) / max|v - mean|, numel-weighted mean if weights given; zero spread -> zeros."""
    centre = (values * weights).sum() / weights.sum() if weights is not None else values.mean()
    y = values - centre
    spread = np.abs(y).max() if len(y) else 0.0
    return y / spread if spread > 0 else np.zeros_like(y)


class Partition(Sparsifier):
    """Applies DPA factors to one (model, tensor): band factors from nested keep thresholds."""

    def __init__(self, thresholds: list, factors: list, dense_factor: float, decision: Decision | None = None):
        self.thresholds, self.factors, self.dense_factor = thresholds, factors, dense_factor
        self.decision = decision or Decision()

    def decide(self, numel, summary, details):
        return self.decision

    def start(self, d, unit):
        return {"levels": [{"ties": d.tie_starts[unit][j] if d.tie_starts else 0} for j in range(len(self.thresholds))]}

    def apply(self, delta, d, state, flat_start):
        if not self.thresholds:
            return delta * self.dense_factor if self.dense_factor != 1 else delta
        # Band factors F_j = max(alpha_j..alpha_K) never increase with j and kept sets are nested,
        # so an element's factor is max_j F_j * [kept at level j]: exact, and no slow masked writes.
        factor, magnitude = None, None
        for j, t in enumerate(self.thresholds):
            if t.ties_kept:
                kept = summaries.apply_threshold_tracked(delta, t, state["levels"][j]) != 0
            elif t.bits < 0:
                kept = torch.ones_like(delta, dtype=torch.bool)
            else:
                magnitude = delta.abs() if magnitude is None else magnitude
                kept = magnitude > t.value
            level = kept.to(torch.float32).mul_(self.factors[j])
            factor = level if factor is None else torch.maximum(factor, level, out=factor)
        return delta * factor


class DPPA(TaskArithmetic):
    name = "dppa"
    summary = "DPPA: dynamic pruning of each fine-tune's delta with partition amplification, then combined"
    global_params = {
        "pruning_rates": Param([0.9, 0.8], list, _rates_check, "DP pruning rates, one partition each (decreasing)"),
        "lamda": Param(0.08, (int, float), lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", "DP amplitude"),
        "outlier_multiple": Param(5.0, (int, float), lambda v: None if v > 0 else "must be > 0", "linear-level outlier multiple M"),
        "layer_outlier_multiple": Param(3.0, (int, float), lambda v: None if v > 0 else "must be > 0", "block-level multiple (reference: 3)"),
        "semantics": Param("reference", str, _choice("reference", "exact"), "reference (authors' code) or exact"),
        "amplify_unpruned": Param(True, bool, doc="amplify tensors DP does not prune (reference: true)"),
        "combine": Param("sum", str, _choice("sum", "mean", "ties"), "how the fine-tunes' deltas are combined"),
        "linear_filter": Param(DEFAULT_LINEAR_FILTER, str, _regex_check, "regex for DP tensors; group 1 = block id"),
    }
    model_params = {
        "weight": Param(1.0, (int, float), doc="scale of this model's delta in the combination"),
        "amplification": Param([1.8, 0.0], list, _factors_check, "DPA factor per pruning rate (reference start: [1.8, 0.0])"),
    }

    def __init__(self, params, model_params, seed):
        super().__init__(params, model_params, seed)
        self.params = {**params, "normalize": params["combine"] in ("mean", "ties"), "lambda": 1.0}
        self.consensus = params["combine"] == "ties"
        self.delta_dtype = "bfloat16" if params["semantics"] == "reference" else "float32"
        self._filter = re.compile(params["linear_filter"])
        self.rates = self.pruning_rates()
        self.reports: list[ModelReport] = []
        self._plans: dict[tuple[str, int], tuple[list, Decision]] = {}
        for m in self.mparams:
            if len(self.factors(m)) != len(self.rates):
                raise ValueError("amplification needs one factor per pruning rate")

    @classmethod
    def check_params(cls, globals: dict, models: list[dict]) -> str | None:
        """One amplification factor per pruning rate, for every model; a linear_filter with a
        capturing group (the block number)."""
        rates = globals.get("pruning_rates")
        for i, m in enumerate(models):
            amp = m.get("amplification")
            if isinstance(rates, list) and isinstance(amp, list) and len(amp) != len(rates):
                return (f"models[{i}]: amplification has {len(amp)} factor(s) but pruning_rates has {len(rates)}; "
                        "give one factor per pruning rate")
        filt = globals.get("linear_filter")
        try:
            groups = re.compile(filt).groups if isinstance(filt, str) else 1
        except re.error:
            groups = 1  # reported by the parameter's own check
        if groups < 1:
            return (f"parameters.linear_filter {filt!r} needs a capturing group for the block number, "
                    r"like (?:^|\.)layers\.(\d+)\.")
        return None

    def pruning_rates(self) -> list[float]:
        return list(self.params["pruning_rates"])

    def factors(self, m: dict) -> list[float]:
        return list(m["amplification"])

    def block_of(self, name: str, shape) -> int | None:
        """The block a DP tensor belongs to, or None if DP does not prune this tensor."""
        if len(shape) != 2:
            return None
        hit = self._filter.search(name)
        if not hit:
            return None
        if hit.groups() and hit.group(1) is not None:
            return int(hit.group(1))
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        return int(layer.group(1)) if layer else 0

    # -- planning -----------------------------------------------------------------------------
    def plan(self, engine):
        ref = engine.inputs.reference
        blocks = {}
        for t in engine.inputs.names:
            e = ref.tensors[t]
            if e.dtype in FLOAT_DTYPES:
                b = self.block_of(t, e.shape)
                if b is not None:
                    blocks[t] = b
        if not blocks:
            from ..errors import InputError

            raise InputError(f"{ref.path}: no tensor matches linear_filter {self.params['linear_filter']!r}; DP has nothing to prune")
        k = len(engine.inputs.models)
        sums = engine.summaries({t: list(range(k)) for t in blocks})
        exact = self.params["semantics"] == "exact"
        counts = self._exact_outlier_counts(engine, blocks, sums) if exact else None
        self.reports = []
        level_requests = {}
        for i in range(k):
            rep = self._plan_model(i, blocks, {t: sums[t][i] for t in blocks}, counts)
            self.reports.append(rep)
            for tr in rep.tensors:
                if exact:
                    level_requests[(tr.name, i)] = tr
        if exact:
            self._exact_thresholds(engine, sums, level_requests)
        return {}

    def _plan_model(self, model: int, blocks: dict, sums: dict, counts) -> ModelReport:
        lam = self.params["lamda"]
        M, LM = self.params["outlier_multiple"], self.params["layer_outlier_multiple"]
        reference = self.params["semantics"] == "reference"
        names = sorted(blocks, key=lambda t: (blocks[t], t))
        trs = []
        for t in names:
            s = sums[t]
            mean = s.mean_abs
            if reference:
                cnt = summaries.count_above(s.hist, bf16(bf16(mean) * M))
            else:
                cnt = counts[(t, model)][0]
            trs.append(TensorReport(t, blocks[t], s.numel, mean, 100.0 * cnt / s.numel if s.numel else 0.0))
        brs = []
        for b in sorted(set(blocks.values())):
            members = [t for t in names if blocks[t] == b]
            total = sums[members[0]]
            for t in members[1:]:
                total = total + sums[t]
            mean = total.mean_abs
            if reference:
                mu = bf16(mean)
                hits = (_BIN_VALUES / mu).to(torch.bfloat16).float() > LM if mu > 0 else torch.zeros(summaries.HIST_BINS, dtype=torch.bool)
                cnt = int(total.hist[hits.numpy()].sum())
            else:
                cnt = sum(counts[(t, model)][1] for t in members)
            brs.append(BlockReport(b, total.numel, mean, 100.0 * cnt / total.numel if total.numel else 0.0))
        L = normalise(np.array([br.outlier_ratio for br in brs]))
        for br, l in zip(brs, L):
            br.layer_score = float(l)
        layer_score = {br.block: br.layer_score for br in brs}
        r = np.array([tr.outlier_ratio for tr in trs])
        n = np.array([tr.numel for tr in trs], dtype=np.float64)
        x = r / r.mean() if r.mean() > 0 else np.zeros_like(r)
        T = normalise(x, n)
        factors = self._band_factors(self.factors(self.mparams[model]))
        for tr, tscore in zip(trs, T):
            tr.linear_score = float(tscore)
            thresholds = []
            for rate in self.rates:
                b_i = (1 - rate) + lam * layer_score[tr.block]
                d = b_i + lam * tr.linear_score
                clamped = not (1 / tr.numel <= d <= 1)
                d = min(1.0, max(1 / tr.numel, d))
                tr.densities.append(d)
                tr.clamped.append(clamped)
                if reference:
                    rank = summaries.rank_for_prune_le(tr.numel, 1 - d)
                    th = summaries.threshold_from_hist(sums[tr.name].hist, rank)
                    tr.thresholds.append(th.value)
                    tr.kept.append(tr.numel - summaries.count_le(sums[tr.name].hist, None, th))
                    thresholds.append(th)
            if reference:
                if any(a.bits < b.bits for a, b in zip(thresholds, thresholds[1:])):
                    raise AssertionError(f"{tr.name}: DPA partitions are not nested")
                self._plans[(tr.name, model)] = (thresholds, Decision(), factors)
        return ModelReport(model, brs, trs)

    @staticmethod
    def _band_factors(alphas: list[float]) -> list[float]:
        """An element first kept at level j gets max over k >= j of alpha_k."""
        return [max(alphas[j:]) for j in range(len(alphas))]

    def _exact_outlier_counts(self, engine, blocks, sums) -> dict:
        """(tensor, model) -> [count |d| > M*mean_ij, count |d| > LM*mean_block], exact for float32."""
        M, LM = self.params["outlier_multiple"], self.params["layer_outlier_multiple"]
        block_mean = {}
        for b in set(blocks.values()):
            members = [t for t in blocks if blocks[t] == b]
            for i in range(len(engine.inputs.models)):
                tot = sums[members[0]][i]
                for t in members[1:]:
                    tot = tot + sums[t][i]
                block_mean[(b, i)] = tot.mean_abs
        values, requests = {}, {}
        for t in blocks:
            for i, s in sums[t].items():
                v = [_f32_floor(M * s.mean_abs), _f32_floor(LM * block_mean[(blocks[t], i)])]
                values[(t, i)] = v
                requests[(t, i)] = tuple(bits >> 16 for bits in v)
        details = engine.details(requests, "outliers")
        out = {}
        for key, v in values.items():
            hist = sums[key[0]][key[1]].hist
            out[key] = [summaries.count_gt_bits(hist, [u[j] for u in details[key]], v[j]) for j in range(2)]
        return out

    def _exact_thresholds(self, engine, sums, trs: dict) -> None:
        requests = {}
        keeps = {}
        for (t, i), tr in trs.items():
            ks = [tr.numel - int(tr.numel * (1 - d)) for d in tr.densities]
            keeps[(t, i)] = ks
            requests[(t, i)] = tuple(summaries.locate(sums[t][i].hist, tr.numel - k + 1)[0] if 0 < k < tr.numel else 0 for k in ks)
        details = engine.details(requests, "refine")
        for (t, i), tr in trs.items():
            ths, starts = [], []
            for j, k in enumerate(keeps[(t, i)]):
                th, st = summaries.keep_top(tr.numel, k, sums[t][i].hist, [u[j] for u in details[(t, i)]])
                ths.append(th)
                starts.append(st)
                tr.thresholds.append(th.value)
                tr.kept.append(k)
            tie_starts = tuple(tuple(starts[j][u] for j in range(len(ths))) for u in range(len(starts[0])))
            factors = self._band_factors(self.factors(self.mparams[i]))
            self._plans[(t, i)] = (ths, Decision(tie_starts=tie_starts), factors)

    def set_amplification(self, alphas: list[float]) -> None:
        """Use these factors for every fine-tune (the factor search); thresholds are unchanged."""
        if len(alphas) != len(self.rates):
            raise ValueError("one factor per pruning rate")
        for m in self.mparams:
            m["amplification"] = list(alphas)
        bands = self._band_factors(list(alphas))
        self._plans = {key: (th, dec, bands) for key, (th, dec, _) in self._plans.items()}

    # -- pass 2 ---------------------------------------------------------------------------------
    def sparsifier(self, model, tensor) -> Sparsifier:
        plan = self._plans.get((tensor, model))
        if plan is None:
            alphas = self.factors(self.mparams[model])
            dense = max(alphas) if self.params["amplify_unpruned"] else 1.0
            return Partition([], [], dense)
        thresholds, decision, factors = plan
        return Partition(thresholds, factors, 1.0, decision)

    def describe(self) -> str:
        p = self.params
        return (f"{self.summary} (semantics {p['semantics']}, pruning rates {self.rates}, lamda {p['lamda']}, "
                f"M {p['outlier_multiple']}, combine {p['combine']})")


class DP(DPPA):
    name = "dp"
    summary = "DP: dynamic (layer- and linear-level) magnitude pruning of each fine-tune's delta, then combined"
    global_params = {
        "pruning_rate": Param(0.8, (int, float), lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "DP pruning rate"),
        **{k: v for k, v in DPPA.global_params.items() if k not in ("pruning_rates", "amplify_unpruned")},
    }
    model_params = {"weight": Param(1.0, (int, float), doc="scale of this model's delta in the combination")}

    def __init__(self, params, model_params, seed):
        super().__init__({**params, "pruning_rates": [params["pruning_rate"]], "amplify_unpruned": False},
                         model_params, seed)

    def factors(self, m):
        return [1.0]


def _f32_floor(v: float) -> int:
    """Bits of the largest float32 <= v (v >= 0), so that x > v <=> bits(x) > these bits for float32 x."""
    f = np.float32(v)
    if float(f) > v:
        f = np.nextafter(f, np.float32(0))
    return int(np.array(f, np.float32).view(np.int32))
