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
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import kernels, summaries
from ..errors import InputError
from ..statistics import Abs, Bins, Stat
from .base import Param, Plan
from .gta import DeltaMethod, Segments
from .ranks import Ranks
from .sparsify import Sparse, level


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
    """Round to bfloat16 through float32 (round to nearest even), as a bf16 op computed in float32 would."""
    u = int(np.array(x, np.float32).view(np.uint32))
    return float(np.array(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16, np.uint32).view(np.float32))


# the value of every histogram bin of bf16 magnitudes (bin b holds exactly the float32 with bits b << 16)
_BIN_VALUES = (np.arange(summaries.HIST_BINS, dtype=np.uint32) << 16).view(np.float32)


def _bf16_array(x: np.ndarray) -> np.ndarray:
    """float32 array rounded to bfloat16 values (round to nearest even; inputs here are finite)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@dataclass(slots=True)
class TensorReport:
    """DP statistics and decisions for one linear (a weight, or one expert of a fused tensor) of one model."""

    name: str  # the tensor
    block: int
    numel: int
    mean_abs: float
    outlier_ratio: float  # r_ij, percent
    linear_score: float = 0.0  # T_ij in [-1, 1]
    densities: list = field(default_factory=list)  # per pruning rate, after clamping
    clamped: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # realised kept counts (ties included)
    stack: str = ""  # e.g. "model.layers", "encoder.block"
    label: str = ""  # e.g. "self_attn.q_proj", "mlp.experts.gate_up_proj[3]"
    kind: str = ""  # q, k, v, o, gate, up, down, expert_*, ... (blocks.KINDS)
    span: tuple = ()  # flat element range inside the tensor

    @property
    def emptied(self) -> bool:
        """Every element of this delta was pruned at the first (highest) pruning rate."""
        return bool(self.kept) and self.kept[0] == 0


@dataclass(slots=True)
class BlockReport:
    block: int
    numel: int
    mean_abs: float
    outlier_ratio: float  # D_i, percent
    layer_score: float = 0.0  # L_i in [-1, 1]
    stack: str = ""


@dataclass
class ModelReport:
    model: int
    blocks: list
    tensors: list

    def to_json(self) -> dict:
        return asdict(self)


def clamp_notes(reports: list, paths: list[str]) -> dict:
    """What DP did that a user must hear about: per fine-tune, the linears whose density fell
    outside [1/n, 1] and was clamped, and those emptied (every element of the delta pruned)."""
    models = []
    for path, rep in zip(paths, reports):
        def named(tr):
            return f"{tr.name}[{tr.span[0]}:{tr.span[1]}]" if tr.label.endswith("]") else tr.name

        models.append({"path": path, "linears": len(rep.tensors),
                       "clamped": [{"tensor": named(tr), "densities": tr.densities, "kept": tr.kept}
                                   for tr in rep.tensors if any(tr.clamped)],
                       "emptied": [named(tr) for tr in rep.tensors if tr.emptied]})
    return {"models": models, "clamped": sum(len(m["clamped"]) for m in models),
            "emptied": sum(len(m["emptied"]) for m in models)}


def effective_factors(alphas: list[float]) -> list[float]:
    """The factor each partition really gets: an element first kept at level j is multiplied by
    max over k >= j of alpha_k, so [0.9, 1.5] amplifies exactly like [1.5, 1.5] (non-increasing
    from the top partition down; the factor search works in this space)."""
    return [max(alphas[j:]) for j in range(len(alphas))]


def normalise(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(v - mean) / max|v - mean|, numel-weighted mean if weights given; zero spread -> zeros."""
    if not len(values):
        return values
    centre = (values * weights).sum() / weights.sum() if weights is not None else values.mean()
    y = values - centre
    spread = np.abs(y).max() if len(y) else 0.0
    return y / spread if spread > 0 else np.zeros_like(y)


class DPPA(DeltaMethod):
    name = "dppa"
    summary = "DPPA: dynamic pruning of each fine-tune's delta with partition amplification, then combined"
    local = False  # densities are normalised across the whole model
    global_params = {
        "pruning_rates": Param([0.9, 0.8], list, _rates_check, "DP pruning rates, one partition each (decreasing)", False),
        "lamda": Param(0.08, (int, float), lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", "DP amplitude", False),
        "outlier_multiple": Param(5.0, (int, float), lambda v: None if v > 0 else "must be > 0",
                                  "linear-level outlier multiple M", False),
        "layer_outlier_multiple": Param(3.0, (int, float), lambda v: None if v > 0 else "must be > 0",
                                        "block-level multiple (reference: 3)", False),
        "semantics": Param("reference", str, _choice("reference", "exact"), "reference (authors' code) or exact", False),
        "amplify_unpruned": Param(True, bool, doc="amplify tensors DP does not prune (reference: true)", per_tensor=False),
        "combine": Param("sum", str, _choice("sum", "mean", "ties"), "how the fine-tunes' deltas are combined", False),
        "linear_filter": Param(None, str, _regex_check, "regex for DP tensors (default: found from the names of "
                               "any architecture's block stacks); group 1 = block id", False),
    }
    model_params = {
        "weight": Param(1.0, (int, float), doc="scale of this model's delta in the combination"),
        "amplification": Param([1.8, 0.0], list, _factors_check, "DPA factor per pruning rate (reference start: [1.8, 0.0])",
                               False),
    }

    def __init__(self, params, model_params, seed, has_base=True):
        super().__init__(params, model_params, seed, has_base)
        self.consensus = params["combine"] == "ties"
        self.bf16_deltas = params["semantics"] == "reference"
        self.exact = not self.bf16_deltas
        self.rates = self.pruning_rates()

    @classmethod
    def check_params(cls, params, models):
        if "amplification" not in cls.model_params:
            return None
        rates = params.get("pruning_rates", cls.global_params["pruning_rates"].default)
        given = [("parameters", params)] + [(f"models[{i}].parameters", m) for i, m in enumerate(models)]
        for where, p in given:
            amp = p.get("amplification")
            if isinstance(amp, list) and len(amp) != len(rates):
                return (f"{where}.amplification has {len(amp)} factor(s) but pruning_rates has {len(rates)} "
                        f"({rates}); give one factor per pruning rate")
        return None

    def pruning_rates(self) -> list[float]:
        return list(self.params["pruning_rates"])

    def factors(self, m: dict) -> list[float]:
        return list(m["amplification"])

    def linears(self, catalogue, tensors) -> list:
        """DP's linears (`blocks.Linear`), in the order DP normalises them: stack, block, tensor name,
        expert. Found from the names of the architecture's block stacks, or by `linear_filter`;
        kept for the catalogue and tensors asked last (every statistics round asks again)."""
        from ..blocks import find_blocks

        cached = self.__dict__.get("_linears")
        if cached is not None and cached[0] is catalogue and cached[1] == tensors:
            return cached[2]
        shapes = {t: catalogue.tensors[t].shape for t in tensors}
        try:
            found = find_blocks(shapes, catalogue.config, self.params["linear_filter"]).linears
        except ValueError as e:
            raise InputError(str(e)) from None
        stacks = {s: i for i, s in enumerate(dict.fromkeys(lin.stack for lin in found))}
        found = [lin for lin in found if lin.numel]  # an empty weight has nothing to prune
        found.sort(key=lambda lin: (stacks[lin.stack], lin.block, lin.tensor, lin.span))
        self._linears = (catalogue, list(tensors), found)
        return found

    def __getstate__(self):  # workers get the method without the client's catalogue of linears
        return {k: v for k, v in self.__dict__.items() if k != "_linears"}

    # -- statistics: what DP needs, round by round -------------------------------------------------
    def _hist(self, model: int, span) -> Stat:
        return Abs(model, span, self.bf16_deltas, () if self.bf16_deltas else ("sums",))

    def statistics(self, catalogue, tensors, got):
        lins = self.linears(catalogue, tensors)
        k = len(self.mparams)
        wanted: dict[str, list] = {}
        for lin in lins:
            wanted.setdefault(lin.tensor, []).extend(self._hist(i, lin.span) for i in range(k))
        if not self.exact or any((t, st) not in got for t, ss in wanted.items() for st in ss):
            return wanted
        outliers = self._outlier_bins(lins, catalogue, got, k)
        if any((key[0].tensor, st) not in got for key, (st, _) in outliers.items()):
            wanted = {}
            for (lin, _), (st, _) in outliers.items():
                wanted.setdefault(lin.tensor, []).append(st)
            return wanted
        counts = self._outlier_counts(outliers, catalogue, got)
        wanted = {}
        for i in range(k):
            for tr in self._report(i, lins, catalogue, got, counts).tensors:
                wanted.setdefault(tr.name, []).extend(self._ranks(tr, i).needs(got.of(tr.name), _inner_ranks(tr)))
        return wanted

    def _outlier_bins(self, lins, catalogue, got, k) -> dict:
        """Exact semantics: per (linear, model), the statistic of the bins holding M x its mean and
        LM x its block's mean, and those two values' float32 bits."""
        M, LM = self.params["outlier_multiple"], self.params["layer_outlier_multiple"]
        out = {}
        for i in range(k):
            sums = [got.get(lin.tensor, self._hist(i, lin.span)) for lin in lins]
            block: dict[tuple, tuple[int, int]] = {}  # (numel, exact total) per block
            for lin, s in zip(lins, sums):
                numel, total = block.get((lin.stack, lin.block), (0, 0))
                block[(lin.stack, lin.block)] = (numel + s.numel, total + s.total)
            for lin, s in zip(lins, sums):
                numel, total = block[(lin.stack, lin.block)]
                values = (_f32_floor(M * s.mean_abs), _f32_floor(LM * summaries.mean_abs(total, numel)))
                stat = Bins(i, lin.span, False, tuple(v >> 16 for v in values))
                out[(lin, i)] = (stat, values)
        return out

    def _outlier_counts(self, outliers: dict, catalogue, got) -> dict:
        """(linear, model) -> [count |d| > M x mean, count |d| > LM x block mean], exact for float32."""
        counts = {}
        for (lin, i), (stat, values) in outliers.items():
            hist = got.get(lin.tensor, self._hist(i, lin.span))
            per_unit = got.get(lin.tensor, stat)
            details = [per_unit[u] for u in sorted(per_unit)]
            counts[(lin, i)] = [summaries.count_gt_bits(hist, [d[j] for d in details], v) for j, v in enumerate(values)]
        return counts

    def _ranks(self, tr: TensorReport, model: int) -> Ranks:
        """Exact semantics: the ranks of |delta| DPA's thresholds sit at (`_inner_ranks`)."""
        return Ranks(self._hist(model, tr.span))

    # -- the plan ----------------------------------------------------------------------------------
    def plan(self, catalogue, tensors, got):
        lins = self.linears(catalogue, tensors)
        k = len(self.mparams)
        counts = self._outlier_counts(self._outlier_bins(lins, catalogue, got, k), catalogue, got) if self.exact else None
        reports = [self._report(i, lins, catalogue, got, counts) for i in range(k)]
        parts: dict[str, dict] = {}  # tensor -> span -> one Sparse per model
        same: dict = {}  # one copy of each equal tuple: a plan per tensor of an MoE model adds up
        for i, rep in enumerate(reports):
            bands = tuple(effective_factors(self.factors(self.mparams[i])))
            for tr in rep.tensors:
                parts.setdefault(tr.name, {}).setdefault(tr.span, [None] * k)[i] = self._partition(tr, i, bands, got, same)
        plans = {}
        normalize = self.params["combine"] in ("mean", "ties")
        for t in tensors:
            weights = tuple(float(m["weight"]) for m in catalogue.tensors[t].models)
            weights = same.setdefault(weights, weights)
            if t in parts:
                plans[t] = Segments(tuple((span, tuple(sp)) for span, sp in parts[t].items()), weights, normalize)
            else:  # not pruned by DP: its dense delta, amplified by max(alpha) like the reference
                dense = [max(self.factors(m)) if self.params["amplify_unpruned"] else 1.0 for m in self.mparams]
                plans[t] = Segments(((None, tuple(Sparse(scale=f) for f in dense)),), weights, normalize)
        return Plan(plans, reports)

    def _partition(self, tr: TensorReport, model: int, bands: tuple, got, same: dict) -> Sparse:
        """DPA on one DP linear: nested thresholds, one per pruning rate, and their band factors
        (`same` holds one copy of each tuple the plans share)."""
        hist = got.get(tr.name, self._hist(model, tr.span))
        if not self.exact:
            found = summaries.thresholds_le(hist, [summaries.rank_for_prune_le(tr.numel, 1 - d) for d in tr.densities])
            ths = [th for th, _ in found]
            if any(a.bits < b.bits for a, b in zip(ths, ths[1:])):
                raise AssertionError(f"{tr.name}: DPA partitions are not nested")
            for th, at_or_below in found:
                tr.thresholds.append(th.value)
                tr.kept.append(tr.numel - at_or_below)
            levels = tuple(level(th, tracked=False, factor=f) for th, f in zip(ths, bands))
            return Sparse(kernels.SP_BANDS, same.setdefault(levels, levels))
        ranks = _inner_ranks(tr)
        found = dict(zip(ranks, self._ranks(tr, model).resolve(got.of(tr.name), ranks)))
        units = [u for u, _ in next(iter(found.values())).starts] if found else []
        ths, prefixes = [], []
        for keep in _keeps(tr):
            if tr.numel - keep + 1 in found:  # keep the `keep` largest; ties at the threshold, lowest index first
                b = found[tr.numel - keep + 1]
                ths.append(b.threshold(tr.numel, keep))
                prefixes.append(tuple(n for _, n in b.starts))
            else:
                ths.append(summaries.Threshold(summaries.KEEP_ALL if keep >= tr.numel else summaries.KEEP_NONE))
                prefixes.append((0,) * len(units))
            tr.thresholds.append(ths[-1].value)
            tr.kept.append(keep)
        levels = tuple(level(th, tracked=th.ties_kept > 0, factor=f) for th, f in zip(ths, bands))
        starts = tuple((u, tuple(p[i] for p in prefixes)) for i, u in enumerate(units))
        return Sparse(kernels.SP_BANDS, same.setdefault(levels, levels), starts)

    def _report(self, model: int, lins: list, catalogue, got, counts) -> ModelReport:
        """DP's signals and densities for one fine-tune (thresholds are filled in by `_partition`).

        The block signal is normalised across the blocks of each stack (an encoder's blocks among
        themselves, a decoder's among themselves: the reference has one stack); the linear signal
        across every DP linear of the model, as the reference does."""
        lam = self.params["lamda"]
        M, LM = self.params["outlier_multiple"], self.params["layer_outlier_multiple"]
        trs = []
        blocks: dict[tuple, list] = {}  # per block: numel, exact total, histogram (reference) or outlier count (exact)
        for lin in lins:
            s = got.get(lin.tensor, self._hist(model, lin.span))
            if self.exact:
                cnt = counts[(lin, model)][0]
            else:
                cnt = summaries.count_above(s, bf16(bf16(s.mean_abs) * M))
            trs.append(TensorReport(lin.tensor, lin.block, s.numel, s.mean_abs, 100.0 * cnt / s.numel if s.numel else 0.0,
                                    stack=lin.stack, label=lin.label, kind=lin.kind, span=lin.span))
            block = blocks.get((lin.stack, lin.block))
            if block is None:
                block = blocks[(lin.stack, lin.block)] = [0, 0, 0 if self.exact else np.zeros(summaries.HIST_BINS, np.int64)]
            block[0] += s.numel
            block[1] += s.total
            if self.exact:
                block[2] += counts[(lin, model)][1]
            else:
                bins, n = s.sparse
                block[2][bins] += n
        brs = []
        for (stack, b), (numel, total, outliers) in blocks.items():
            mean = summaries.mean_abs(total, numel)
            if self.exact:
                cnt = outliers
            else:
                mu = bf16(mean)
                with np.errstate(over="ignore", invalid="ignore"):  # the bins of inf/NaN magnitudes
                    hits = _bf16_array(_BIN_VALUES / np.float32(mu)) > LM if mu > 0 else np.zeros(summaries.HIST_BINS, bool)
                cnt = int(outliers[hits].sum())
            brs.append(BlockReport(b, numel, mean, 100.0 * cnt / numel if numel else 0.0, stack=stack))
        layer_score = {}
        for stack in dict.fromkeys(br.stack for br in brs):
            in_stack = [br for br in brs if br.stack == stack]
            for br, score in zip(in_stack, normalise(np.array([br.outlier_ratio for br in in_stack]))):
                br.layer_score = float(score)
                layer_score[(stack, br.block)] = br.layer_score
        r = np.array([tr.outlier_ratio for tr in trs])
        n = np.array([tr.numel for tr in trs], dtype=np.float64)
        x = r / r.mean() if len(r) and r.mean() > 0 else np.zeros_like(r)
        T = normalise(x, n)
        for tr, tscore in zip(trs, T):
            tr.linear_score = float(tscore)
            for rate in self.rates:
                d = (1 - rate) + lam * layer_score[(tr.stack, tr.block)] + lam * tr.linear_score
                tr.clamped.append(not (1 / tr.numel <= d <= 1))
                tr.densities.append(min(1.0, max(1 / tr.numel, d)))
        return ModelReport(model, brs, trs)

    def describe(self) -> str:
        p = self.params
        return (f"{self.summary} (semantics {p['semantics']}, pruning rates {self.rates}, lamda {p['lamda']}, "
                f"M {p['outlier_multiple']}, combine {p['combine']})")


class DP(DPPA):
    name = "dp"
    summary = "DP: dynamic (layer- and linear-level) magnitude pruning of each fine-tune's delta, then combined"
    global_params = {
        "pruning_rate": Param(0.8, (int, float), lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "DP pruning rate", False),
        **{k: v for k, v in DPPA.global_params.items() if k not in ("pruning_rates", "amplify_unpruned")},
    }
    model_params = {"weight": Param(1.0, (int, float), doc="scale of this model's delta in the combination")}

    def __init__(self, params, model_params, seed, has_base=True):
        super().__init__({**params, "pruning_rates": [params["pruning_rate"]], "amplify_unpruned": False},
                         model_params, seed, has_base)

    def factors(self, m):
        return [1.0]


def _keeps(tr: TensorReport) -> list[int]:
    """Exact semantics: elements kept at each pruning rate, n - int(n * (1 - d))."""
    return [tr.numel - int(tr.numel * (1 - d)) for d in tr.densities]


def _inner_ranks(tr: TensorReport) -> list[int]:
    """Exact semantics: the 1-based ascending ranks of the thresholds that keep some but not all."""
    return [tr.numel - k + 1 for k in _keeps(tr) if 0 < k < tr.numel]


def _f32_floor(v: float) -> int:
    """Bits of the largest float32 <= v (v >= 0), so that x > v <=> bits(x) > these bits for float32 x."""
    f = np.float32(v)
    if float(f) > v:
        f = np.nextafter(f, np.float32(0))
    return int(np.array(f, np.float32).view(np.int32))
