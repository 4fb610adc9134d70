"""Per-(model, tensor) delta sparsifiers whose decisions need statistics over the whole tensor.

A sparsifier states what it needs in up to two statistics rounds over the tensor's chunks:
round 1 returns a mergeable `Summary`; round 2 (optional) returns one small result per work unit.
`decide` turns them into a `Decision` that `apply` uses on any chunk. The pipeline runs the
rounds as Dask passes for tensors split over several work units, or inline, on data already in
memory, for a tensor that is one work unit: same functions, same answer, fewer reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rng
from .. import summaries
from ..summaries import Summary, Threshold


@dataclass
class Decision:
    """What `apply` needs for one (model, tensor)."""

    threshold: Threshold | None = None
    tie_starts: tuple[int, ...] = ()  # per work unit, ties preceding it (for index tie-break)
    scale: float = 1.0  # multiplier on the kept deltas (DARE rescale)
    key: int = 0  # RNG stream (DARE)


class Sparsifier:
    """No sparsification (task arithmetic, linear)."""

    needs_summary = False
    sums = "exact"  # what `summarize` must compute of Σ|delta|: "exact" or "none"

    def bucket(self, numel: int, summary: Summary) -> tuple[int, ...] | None:
        """Round 2 request: the histogram bins whose exact contents are needed, or None.
        `decide` then gets, per unit, one (values, counts) detail per requested bin."""
        return None

    def decide(self, numel: int, summary: Summary | None, details) -> Decision:
        return Decision()

    def summarize(self, delta: torch.Tensor, flat_start: int, bf16_values: bool = False) -> Summary:
        """Round-1 summary of one chunk; `bf16_values` when every delta is a bf16 value."""
        return summaries.summarize(delta, "hist" if bf16_values and self.sums == "exact" else self.sums)

    def start(self, d: Decision, unit: int) -> dict:
        """Fresh per-unit state for `apply` (running tie counts), given the unit's index."""
        return {}

    def apply(self, delta: torch.Tensor, d: Decision, state: dict, flat_start: int) -> torch.Tensor:
        """The sparsified delta of one chunk; chunks of a unit arrive in order."""
        return delta


class TopK(Sparsifier):
    """TIES trimming (mergekit `magnitude`): keep exactly k = max(1, int(density*n)) largest |delta|.

    mergekit breaks ties at the threshold arbitrarily (an unstable parallel argsort); we keep the
    lowest flat indices, so the result is deterministic.
    """

    needs_summary = True
    sums = "none"

    def __init__(self, density: float):
        self.density = density

    def bucket(self, numel, summary):
        k = summaries.top_k_count(numel, self.density)
        if k >= numel:
            return None
        return (summaries.locate(summary.hist, numel - k + 1)[0],)

    def decide(self, numel, summary, details):
        k = summaries.top_k_count(numel, self.density)
        if k >= numel:
            return Decision(summaries.Threshold(summaries.KEEP_ALL))
        t, starts = summaries.keep_top(numel, k, summary.hist, [u[0] for u in details])
        return Decision(t, tuple(starts))

    def start(self, d, unit):
        return {"ties": d.tie_starts[unit] if d.tie_starts else 0}

    def apply(self, delta, d, state, flat_start):
        return summaries.apply_threshold_tracked(delta, d.threshold, state)


class PruneLE(Sparsifier):
    """Reference magnitude pruning (DPPA code): t = |delta| at 0-based index int(n*s) of the
    ascending order; every element <= t is pruned (ties pruned too); survivors keep their value."""

    needs_summary = True
    sums = "none"

    def __init__(self, sparsity: float, bf16_exact: bool = False):
        self.sparsity = sparsity
        self.bf16_exact = bf16_exact  # deltas are bf16 values: the histogram alone is exact

    def bucket(self, numel, summary):
        if self.bf16_exact or numel == 0:
            return None
        return (summaries.locate(summary.hist, summaries.rank_for_prune_le(numel, self.sparsity))[0],)

    def decide(self, numel, summary, details):
        if numel == 0:
            return Decision(summaries.Threshold(summaries.KEEP_ALL))
        dets = None if self.bf16_exact else [u[0] for u in details]
        t = summaries.smallest(summaries.rank_for_prune_le(numel, self.sparsity), summary.hist, dets)
        return Decision(t)

    def apply(self, delta, d, state, flat_start):
        return summaries.apply_threshold(delta, d.threshold)


class Bernoulli(Sparsifier):
    """DARE: keep each element with probability `density`, drawn from a counter-based stream keyed
    by (seed, model, tensor, index). `rescale` follows mergekit 0.1.5: multiply the survivors by
    ||delta||_1 / ||kept delta||_1 (skipped when either is below 1e-7)."""

    def __init__(self, density: float, rescale: bool, key: int):
        self.density, self.rescale, self.key = density, rescale, key
        self.needs_summary = rescale and density < 1

    def _mask(self, delta, flat_start):
        return rng.keep_mask(self.key, flat_start, delta.numel(), self.density).reshape(delta.shape)

    def summarize(self, delta, flat_start, bf16_values=False):
        # Two exact sums packed in one Summary: histogram of |delta|, and mant_sums of the kept part.
        mode = "hist" if bf16_values else "exact"
        full = summaries.summarize(delta, mode)
        kept = summaries.summarize(delta * self._mask(delta, flat_start), mode)
        return Summary(full.numel, full.hist, full.mant_sums, kept.mant_sums)

    def decide(self, numel, summary, details):
        if self.density >= 1:
            return Decision(key=self.key)
        scale = 1.0
        if self.rescale:
            before, after = summary.sum_abs, summary.aux_sum_abs
            if before >= 1e-7 and after >= 1e-7:
                scale = before / after
        return Decision(scale=scale, key=self.key)

    def apply(self, delta, d, state, flat_start):
        if self.density >= 1:
            return delta
        out = delta * self._mask(delta, flat_start)
        if d.scale != 1.0:
            out.mul_(d.scale)
        return out
