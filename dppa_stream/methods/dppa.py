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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat

import numpy as np

from .. import kernels, summaries
from ..errors import InputError
from ..statistics import Abs, Bins, Stat
from .base import Param, ParamSets, Plan
from .gta import DeltaMethod, Segments, torch_order_sums
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


@dataclass
class DPModel:
    """DP's signals and decisions for one fine-tune, one row per linear (`DPReport.linears`), as
    arrays: an MoE model has ~45k linears per fine-tune, and a `TensorReport` each cost ~0.5 KiB.
    `bits`/`ties_kept` are each threshold as the plan uses it (`summaries.Threshold`), `starts` (exact
    semantics only) the ties before each unit per linear."""

    model: int
    blocks: list  # BlockReport per block (few)
    numel: np.ndarray
    mean_abs: np.ndarray
    outlier_ratio: np.ndarray
    linear_score: np.ndarray
    densities: np.ndarray  # (linears, rates), after clamping
    clamped: np.ndarray
    thresholds: np.ndarray | None = None  # (linears, rates), float32 values as float64
    kept: np.ndarray | None = None
    bits: np.ndarray | None = None
    ties_kept: np.ndarray | None = None
    starts: list | None = None


class DPReport(Sequence):
    """What DP found and decided, compactly: the linears (`blocks.Linear`, shared by every fine-tune)
    and one `DPModel` per fine-tune. As a sequence it gives each fine-tune's `ModelReport` (built on
    demand: the `stats` report and its plot want one record per linear)."""

    def __init__(self, linears: list, models: list):
        self.linears, self.models = linears, models

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> ModelReport:
        m = self.models[i]
        trs = [TensorReport(lin.tensor, lin.block, numel, mean, ratio, score, dens, clamped, ths, kept, lin.stack,
                            lin.label, lin.kind, lin.span)
               for lin, numel, mean, ratio, score, dens, clamped, ths, kept in
               zip(self.linears, m.numel.tolist(), m.mean_abs.tolist(), m.outlier_ratio.tolist(),
                   m.linear_score.tolist(), m.densities.tolist(), m.clamped.tolist(), m.thresholds.tolist(),
                   m.kept.tolist())]
        return ModelReport(m.model, m.blocks, trs)

    def named(self, j: int) -> str:
        """Linear j as the notes name it: the tensor, with its span when it is one expert of a fused tensor."""
        lin = self.linears[j]
        return f"{lin.tensor}[{lin.span[0]}:{lin.span[1]}]" if lin.label.endswith("]") else lin.tensor


def clamp_notes(report: DPReport, paths: list[str]) -> dict:
    """What DP did that a user must hear about: per fine-tune, the linears whose density fell
    outside [1/n, 1] and was clamped, and those emptied (every element of the delta pruned at the
    first pruning rate)."""
    models = []
    for path, m in zip(paths, report.models):
        clamped = np.flatnonzero(m.clamped.any(axis=1)).tolist() if len(m.clamped) else []
        emptied = np.flatnonzero(m.kept[:, 0] == 0).tolist() if len(m.kept) else []
        models.append({"path": path, "linears": len(m.numel),
                       "clamped": [{"tensor": report.named(j), "densities": m.densities[j].tolist(),
                                    "kept": m.kept[j].tolist()} for j in clamped],
                       "emptied": [report.named(j) for j in emptied]})
    return {"models": models, "clamped": sum(len(m["clamped"]) for m in models),
            "emptied": sum(len(m["emptied"]) for m in models)}


class DPPlans(Mapping):
    """Tensor -> its pass-2 plan (`Segments`), made when asked for from the compact report. Pass 2
    asks for a work unit's plans at once, just before the unit is submitted (`unit`: arrays cut
    from the report, not a `Segments` per tensor), so a run never holds every tensor's plan: at
    MoE scale they outgrow the statistics they come from."""

    def __init__(self, method: "DPPA", catalogue, tensors: list[str], report: DPReport):
        self.catalogue, self.report = catalogue, report
        first: dict[str, int] = dict.fromkeys(tensors, -1)  # tensor -> its first linear, -1: not pruned by DP
        count: dict[str, int] = dict.fromkeys(tensors, 0)  # tensor -> how many linears it holds
        prev = None
        for j, lin in enumerate(report.linears):  # a tensor's linears are consecutive (sorted by stack, block, tensor)
            if lin.tensor != prev:
                if first[lin.tensor] >= 0:
                    raise AssertionError(f"{lin.tensor}: its DP linears are not consecutive")
                first[lin.tensor] = j
                prev = lin.tensor
            count[lin.tensor] += 1
        self.first, self.count = first, count
        self.normalize = method.params["combine"] in ("mean", "ties")
        self.bands = [tuple(effective_factors(method.factors(m))) for m in method.mparams]
        self.dense = tuple(max(method.factors(m)) if method.params["amplify_unpruned"] else 1.0 for m in method.mparams)

    def __len__(self) -> int:
        return len(self.first)

    def __iter__(self):
        return iter(self.first)

    def __getitem__(self, t: str) -> Segments:
        if t not in self.first:
            raise KeyError(t)
        return self.unit([t], [self.catalogue.tensors[t]]).segments(0)

    def unit(self, names: list[str], infos) -> "DPUnitPlans":
        """The plans of a work unit's tensors `names` (`infos`: their TensorInfos, or `Infos`
        columns), cut from the report; a tensor DP has no plan for (an integer buffer) gets its info."""
        first = np.fromiter(map(self.first.get, names, repeat(-1)), np.int64, len(names))
        count = np.fromiter(map(self.count.get, names, repeat(0)), np.int64, len(names))
        planned = np.fromiter(map(self.first.__contains__, names), np.bool_, len(names))
        at = np.zeros(len(names) + 1, np.int64)
        np.cumsum(count, out=at[1:])
        rows = np.repeat(first - at[:-1], count) + np.arange(int(at[-1]))  # the unit's linears, in order
        lins = self.report.linears
        models = self.report.models
        weights = ParamSets(infos).of(_weights, np.float64)
        return DPUnitPlans(infos, planned, at, [lins[j].span for j in rows.tolist()],
                           [m.bits[rows] for m in models], [m.ties_kept[rows] for m in models],
                           [None if m.starts is None else [m.starts[j] for j in rows.tolist()] for m in models],
                           self.bands, self.dense, self.normalize, weights)


def _weights(info) -> list[float]:
    return [float(m["weight"]) for m in info.models]


class DPUnitPlans(Sequence):
    """The pass-2 plans of one work unit's tensors as arrays cut from the report: what its task is
    sent, a few numbers per linear. Item k is tensor k's `Segments` (made when asked for: a unit
    merged on its own, a tensor of several linears), or its TensorInfo where DP has no plan for it;
    a batch of whole tensors takes its kernel records from the arrays at once (`batch_records`), the
    records `kernel_records` makes from those `Segments`, field for field.

    Linear r of the unit (rows r of `bits`, `ties_kept` and `starts` per fine-tune, `spans[r]`)
    belongs to the tensor k with at[k] <= r < at[k + 1]; a tensor without any is merged dense."""

    def __init__(self, infos, planned, at, spans, bits, ties_kept, starts, bands, dense, normalize, weights):
        self.infos, self.planned, self.at, self.spans = infos, planned, at, spans
        self.bits, self.ties_kept, self.starts = bits, ties_kept, starts
        self.bands, self.dense, self.normalize, self.weights = bands, dense, normalize, weights

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, k):
        """Tensor k's plan: its `Segments` (or its info), or for a tensor of several linears (a fused
        expert tensor) this unit's one-tensor slice, which `DPPA.merge_unit` merges from the arrays."""
        if isinstance(k, slice):
            lo, hi, _ = k.indices(len(self))
            return DPUnitPlans(self.infos[lo:hi], self.planned[lo:hi], self.at[lo:hi + 1], self.spans, self.bits,
                               self.ties_kept, self.starts, self.bands, self.dense, self.normalize,
                               self.weights[lo:hi])
        if self.planned[k] and self.at[k + 1] - self.at[k] > 1:
            return self[k:k + 1]
        return self.segments(k)

    def segments(self, k: int):
        """Tensor k's `Segments`, or its TensorInfo where DP has no plan for it."""
        if not self.planned[k]:
            return self.infos[k]
        weights = tuple(self.weights[k].tolist())
        a, b = int(self.at[k]), int(self.at[k + 1])
        if a == b:  # not pruned by DP: its dense delta, amplified by max(alpha) like the reference
            return Segments(((None, tuple(Sparse(scale=f) for f in self.dense)),), weights, self.normalize)
        parts = tuple((self.spans[r], tuple(self._sparse(r, m) for m in range(len(self.bands)))) for r in range(a, b))
        return Segments(parts, weights, self.normalize)

    def _sparse(self, r: int, model: int) -> Sparse:
        starts = self.starts[model]
        exact = starts is not None
        levels = tuple(level(summaries.Threshold(bits, tied), tracked=exact and tied > 0, factor=f)
                       for bits, tied, f in zip(self.bits[model][r].tolist(), self.ties_kept[model][r].tolist(),
                                                self.bands[model]))
        return Sparse(kernels.SP_BANDS, levels, starts[r] if exact else ())

    def whole(self, numels) -> np.ndarray:
        """Which items a batch takes (`merge_planned_batch`): planned as one part, the whole tensor
        (dense, or one linear spanning all `numels[k]` elements)."""
        count = np.diff(self.at)
        whole = self.planned & (count <= 1)
        for k in np.flatnonzero(whole & (count == 1)).tolist():
            whole[k] = self.spans[int(self.at[k])] == (0, numels[k])
        return whole

    def batch_records(self, consensus: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`kernels.gta_segments`' models, levels and combine records of every item, each a whole
        tensor (`whole`) merged from offset 0: one row per item, as `kernel_records` fills them."""
        n = len(self)
        pruned = np.flatnonzero(np.diff(self.at) > 0)
        models, levels = self._records(n, pruned, self.at[pruned], self.weights.reshape(n, -1), 0)
        return models, levels, self._combine(consensus, self.weights.reshape(n, -1))

    def part_records(self, unit, consensus: bool) -> tuple | None:
        """For this one-tensor slice, a tensor of several linears: the records of its linears
        inside `unit`, one segment each, and where each begins in the unit and the end (the
        `starts` of `kernels.gta_segments`, whose segments are `DeltaMethod.merge_unit`'s `gta`
        calls, one per linear); None when those linears do not tile the unit."""
        a, b = int(self.at[0]), int(self.at[1])
        lo0, n = unit.flat_start, unit.numel
        rows = [r for r in range(a, b) if self.spans[r][0] - lo0 < n and self.spans[r][1] - lo0 > 0]
        bounds = [min(max(self.spans[r][0] - lo0, 0), n) for r in rows] + [n]
        if not rows or bounds[0] != 0 or any(min(self.spans[r][1] - lo0, n) != e for r, e in zip(rows, bounds[1:])):
            return None
        P = len(rows)
        weights = np.repeat(self.weights[:1], P, axis=0)
        models, levels = self._records(P, np.arange(P), np.array(rows, np.int64), weights, unit.index)
        return np.array(bounds, np.int64), models, levels, self._combine(consensus, weights)

    def _records(self, n: int, pruned: np.ndarray, rows: np.ndarray, weights: np.ndarray, unit: int):
        """Models and levels records of n segments: segment pruned[i] merges linear rows[i] (the
        ties before `unit` counted as seen), the others their tensor's dense delta (amplified).
        `kernel_records`' fields, filled a column at a time."""
        K = len(self.bands)
        used = [min(b.shape[1], len(f)) for b, f in zip(self.bits, self.bands)]  # levels per fine-tune (a zip's)
        models = kernels.records(kernels.MODEL_FIELDS, (n, K), weight=weights.astype(np.float32))
        levels = kernels.records(kernels.LEVEL_FIELDS, (n, K, max(used + [1]) if len(pruned) else 1))
        for m, L in enumerate(used):
            models["scale"][:, m] = self.dense[m]
            models["scale"][pruned, m] = 1.0
            models["mode"][pruned, m] = kernels.SP_BANDS
            models["nlevels"][pruned, m] = L
            if not L or not len(pruned):
                continue
            bits, tied = self.bits[m][rows, :L], self.ties_kept[m][rows, :L]
            exact = self.starts[m] is not None
            kind = np.where(bits == summaries.KEEP_ALL, kernels.TH_ALL,
                            np.where(bits == summaries.KEEP_NONE, kernels.TH_NONE,
                                     np.where(exact & (tied > 0), kernels.TH_VALUE, kernels.TH_GT)))
            compared = (kind == kernels.TH_VALUE) | (kind == kernels.TH_GT)
            value = np.where(bits >= 0, bits.astype(np.int32).view(np.float32), np.float32(-1.0))
            where = (pruned[:, None], m, np.arange(L))
            levels["kind"][where] = kind
            levels["value"][where] = np.where(compared, value, np.float32(0.0))
            levels["factor"][where] = np.array(self.bands[m][:L], np.float32)
            levels["stop"][where] = np.where(kind == kernels.TH_VALUE, tied, 0)
            if exact:  # the ties before this unit, per level
                levels["seen"][where] = [(tuple(dict(self.starts[m][r]).get(unit, ())) + (0,) * L)[:L]
                                         for r in rows.tolist()]
        return models, levels

    def _combine(self, consensus: bool, weights: np.ndarray) -> np.ndarray:
        return kernels.records(kernels.COMBINE_FIELDS, len(weights), consensus=consensus, normalize=self.normalize,
                               divisor=torch_order_sums(weights.astype(np.float32)))


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

    def merge_unit(self, rows, plan, out, out_code):
        """A tensor of many linears (a fused expert tensor, `DPUnitPlans` of it) merged with one
        kernel call over its linears in this unit, its records made from the report's arrays;
        any other plan as `DeltaMethod.merge_unit` merges it, a `gta` call per linear."""
        if isinstance(plan, DPUnitPlans):
            got = plan.part_records(rows.inp.unit, self.consensus)
            if got is None:
                return super().merge_unit(rows, plan.segments(0), out, out_code)
            starts, models, levels, combine = got
            bad = np.zeros(rows.src.shape[0], np.int64)
            kernels.gta_segments(rows.src, kernels.CODES[rows.dtype], starts, self.bf16_deltas, models, levels,
                                 np.zeros((models.shape[1], 1), np.uint8), combine, out, out_code, bad)
            return bad
        return super().merge_unit(rows, plan, out, out_code)

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
        return {k: v for k, v in self.__dict__.items() if k not in ("_linears", "_hists")}

    # -- statistics: what DP needs, round by round -------------------------------------------------
    def _hist(self, model: int, span) -> Stat:
        return Abs(model, span, self.bf16_deltas, () if self.bf16_deltas else ("sums",))

    def statistics(self, catalogue, tensors, got):
        lins = self.linears(catalogue, tensors)
        k = len(self.mparams)
        cached = self.__dict__.get("_hists")  # the same Stat objects every round (the driver's keys): not 2 copies
        if cached is None or cached[0] is not lins:
            hists: dict[str, list] = {}
            for lin in lins:
                hists.setdefault(lin.tensor, []).extend(self._hist(i, lin.span) for i in range(k))
            cached = self._hists = (lins, hists)
        wanted = cached[1]
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
            m = self._report(i, lins, self._summaries(i, lins), got, counts)
            for lin, numel, dens in zip(lins, m.numel.tolist(), m.densities.tolist()):
                wanted.setdefault(lin.tensor, []).extend(
                    self._ranks(lin.span, i).needs(got.of(lin.tensor), _inner_ranks(numel, dens)))
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

    def _summaries(self, model: int, lins: list) -> list[tuple[str, Stat]]:
        """(tensor, statistic) of each linear's histogram for one fine-tune: made for each use, not
        kept (two per linear and fine-tune of an MoE model)."""
        return [(lin.tensor, self._hist(model, lin.span)) for lin in lins]

    def _ranks(self, span, model: int) -> Ranks:
        """Exact semantics: the ranks of |delta| DPA's thresholds sit at (`_inner_ranks`)."""
        return Ranks(self._hist(model, span))

    # -- the plan ------------------------------------------------------------------------------------
    def plan(self, catalogue, tensors, got):
        """DP's report (signals, densities, thresholds: a few numbers per linear, read from the
        histograms a batch at a time, `Results.histograms`) and the plans made from it on demand
        (`DPPlans`)."""
        lins = self.linears(catalogue, tensors)
        k = len(self.mparams)
        self.__dict__.pop("_hists", None)
        counts = self._outlier_counts(self._outlier_bins(lins, catalogue, got, k), catalogue, got) if self.exact else None
        report = DPReport(lins, [self._report(i, lins, self._summaries(i, lins), got, counts) for i in range(k)])
        same: dict = {}  # one copy of each equal tuple of tie starts
        for i, m in enumerate(report.models):
            self._thresholds(lins, m, i, self._summaries(i, lins), got, same)
        return Plan(DPPlans(self, catalogue, tensors, report), report)

    def _thresholds(self, lins: list, m: DPModel, model: int, pairs: list, got, same: dict) -> None:
        """DPA on every DP linear of one fine-tune: nested thresholds, one per pruning rate, and
        the elements each keeps, into `m` (arrays). Reference semantics read the histograms back
        as columns, a batch of linears at a time (`Results.histograms`)."""
        n, R = m.densities.shape
        m.thresholds, m.kept = np.zeros((n, R)), np.zeros((n, R), np.int64)
        m.bits, m.ties_kept = np.zeros((n, R), np.int64), np.zeros((n, R), np.int64)
        m.starts = [] if self.exact else None
        if not self.exact:
            # `rank_for_prune_le(numel, 1 - d)` of every linear and rate: the float64 product, truncated
            numels = m.numel[:, None]
            ranks = np.minimum(np.floor(numels.astype(np.float64) * (1 - m.densities)).astype(np.int64), numels - 1) + 1
            for at, h in got.histograms(pairs):
                bits, at_or_below, _ = h.thresholds_le(ranks[at])
                bad = np.flatnonzero((bits[:, :-1] < bits[:, 1:]).any(axis=1))
                if len(bad):
                    raise AssertionError(f"{lins[int(at[bad].min())].tensor}: DPA partitions are not nested")
                m.bits[at], m.kept[at] = bits, numels[at] - at_or_below
                m.thresholds[at] = bits.astype(np.uint32).view(np.float32)
            return
        for j, (lin, numel, dens) in enumerate(zip(lins, m.numel.tolist(), m.densities.tolist())):
            ths, kept, starts = self._exact_thresholds(lin, numel, dens, model, got)
            m.starts.append(same.setdefault(starts, starts))
            m.thresholds[j] = [th.value for th in ths]
            m.kept[j] = kept
            m.bits[j] = [th.bits for th in ths]
            m.ties_kept[j] = [th.ties_kept for th in ths]

    def _exact_thresholds(self, lin, numel: int, densities: list, model: int, got) -> tuple:
        """Exact semantics, one linear: the thresholds keeping n - int(n * (1 - d)) elements (ties
        lowest flat index first), those counts, and the ties before each unit per threshold."""
        ranks = _inner_ranks(numel, densities)
        found = dict(zip(ranks, self._ranks(lin.span, model).resolve(got.of(lin.tensor), ranks)))
        units = [u for u, _ in next(iter(found.values())).starts] if found else []
        ths, prefixes, keeps = [], [], _keeps(numel, densities)
        for keep in keeps:
            if numel - keep + 1 in found:  # keep the `keep` largest; ties at the threshold, lowest index first
                b = found[numel - keep + 1]
                ths.append(b.threshold(numel, keep))
                prefixes.append(tuple(n for _, n in b.starts))
            else:
                ths.append(summaries.Threshold(summaries.KEEP_ALL if keep >= numel else summaries.KEEP_NONE))
                prefixes.append((0,) * len(units))
        return ths, keeps, tuple((u, tuple(p[i] for p in prefixes)) for i, u in enumerate(units))

    def _report(self, model: int, lins: list, pairs: list, got, counts) -> DPModel:
        """DP's signals and densities for one fine-tune (thresholds are filled in by `_thresholds`).

        The block signal is normalised across the blocks of each stack (an encoder's blocks among
        themselves, a decoder's among themselves: the reference has one stack); the linear signal
        across every DP linear of the model, as the reference does."""
        lam = self.params["lamda"]
        M, LM = self.params["outlier_multiple"], self.params["layer_outlier_multiple"]
        n = len(lins)
        numels, means, ratios = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
        totals: list[int] = [0] * n
        blocks: dict[tuple, list] = {}  # per block (in the order of its first linear): numel, exact total, outliers
        for lin in lins:
            blocks.setdefault((lin.stack, lin.block), [0, 0, 0])
        at = {k: i for i, k in enumerate(blocks)}
        block_of = np.array([at[(lin.stack, lin.block)] for lin in lins], np.int64)
        # reference semantics: each block's histogram, whose bins are counted against its bf16 mean below
        hists = None if self.exact else np.zeros((len(blocks), summaries.HIST_BINS), np.int64)
        for at, h in got.histograms(pairs):
            numels[at], got_totals = h.numel, h.totals
            for j, total in zip(at.tolist(), got_totals):
                totals[j] = total
            means[at] = [summaries.mean_abs(t, k) for t, k in zip(got_totals, h.numel.tolist())]
            if self.exact:
                cnt = np.array([counts[(lins[j], model)][0] for j in at.tolist()], np.int64)
            else:  # |d| > bf16(bf16(mean) x M) for bf16 deltas: the elements in the bins above that value's
                with np.errstate(over="ignore"):
                    limit = _bf16_array(_bf16_array(means[at]).astype(np.float64) * M)
                cnt = h.count() - h.count_below((limit.view(np.uint32).astype(np.int64) >> 16) + 1)
                np.add.at(hists.reshape(-1), block_of[at][h.of] * summaries.HIST_BINS + h.bins, h.counts)
            ratios[at] = 100.0 * cnt / np.maximum(h.numel, 1)  # (DP linears hold elements)
        for lin, b, numel, total in zip(lins, block_of.tolist(), numels.tolist(), totals):
            block = blocks[(lin.stack, lin.block)]
            block[0] += numel
            block[1] += total
            block[2] = counts[(lin, model)][1] + block[2] if self.exact else hists[b]
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
        x = ratios / ratios.mean() if n and ratios.mean() > 0 else np.zeros_like(ratios)
        T = normalise(x, numels.astype(np.float64))
        L = np.array([layer_score[(lin.stack, lin.block)] for lin in lins], np.float64)
        # the reference's arithmetic, elementwise in float64 in the same order
        d = np.stack([(1 - rate) + lam * L + lam * T for rate in self.rates], axis=1).reshape(n, len(self.rates))
        low = (1 / numels)[:, None] if n else np.zeros((0, 1))
        return DPModel(model, brs, numels, means, ratios, T.astype(np.float64), np.minimum(1.0, np.maximum(low, d)),
                       ~((low <= d) & (d <= 1)))

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


def _keeps(numel: int, densities: list) -> list[int]:
    """Exact semantics: elements kept at each pruning rate, n - int(n * (1 - d))."""
    return [numel - int(numel * (1 - d)) for d in densities]


def _inner_ranks(numel: int, densities: list) -> list[int]:
    """Exact semantics: the 1-based ascending ranks of the thresholds that keep some but not all."""
    return [numel - k + 1 for k in _keeps(numel, densities) if 0 < k < numel]


def _f32_floor(v: float) -> int:
    """Bits of the largest float32 <= v (v >= 0), so that x > v <=> bits(x) > these bits for float32 x."""
    f = np.float32(v)
    if float(f) > v:
        f = np.nextafter(f, np.float32(0))
    return int(np.array(f, np.float32).view(np.int32))
