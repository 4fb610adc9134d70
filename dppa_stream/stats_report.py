"""`dppa-stream stats`: pass 1 only, and what a user looks at when tuning DP (lamda, M).

Reports per block and per linear: mean |delta|, outlier ratios, the scores they normalise to,
chosen densities, thresholds, realised kept counts (ties pruned) and clamps; as JSON, a table
and a plot of densities and outlier ratios across layers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .config import MergeConfig
from .errors import UsageError
from .memory import PeakSampler
from .pipeline import MergeOptions, session


@dataclass
class StatsResult:
    method: str
    models: list  # ModelReport per fine-tune
    model_paths: list
    wall_seconds: float = 0.0
    bytes_read: int = 0
    peak_anon_bytes: int = 0
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "method": self.method, "params": self.params, "wall_seconds": self.wall_seconds,
            "bytes_read": self.bytes_read, "peak_anon_bytes": self.peak_anon_bytes,
            "models": [{"path": p, **m.to_json()} for p, m in zip(self.model_paths, self.models)],
        }


def collect_stats(cfg: MergeConfig, opts: MergeOptions | None = None) -> StatsResult:
    """Run pass 1 and the DP plan for a dp/dppa config; no output is written."""
    opts = opts or MergeOptions()
    if cfg.merge_method not in ("dp", "dppa"):
        raise UsageError(f"{cfg.source}: 'stats' reports DP statistics; use merge_method dp or dppa, not {cfg.merge_method!r}")
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        with session(cfg, opts) as s:
            engine = s.engine()
            plan = s.plan(engine)
    return StatsResult(cfg.merge_method, plan.report, [m.path for m in cfg.models], time.perf_counter() - t0,
                       engine.bytes_read, sampler.peak, dict(s.method.params))


def table(result: StatsResult) -> str:
    """A per-linear text table (first fine-tune per block, all fine-tunes)."""
    lines = []
    for path, rep in zip(result.model_paths, result.models):
        lines.append(f"# {path}")
        lines.append(f"{'block':>5} {'D_i %':>7} {'L_i':>6}  {'tensor':<34} {'mean|d|':>9} {'r_ij %':>7} {'T_ij':>6} "
                     f"{'density':>15} {'kept %':>15} clamp")
        layer = {b.block: b for b in rep.blocks}
        for tr in rep.tensors:
            b = layer[tr.block]
            short = tr.label or tr.name
            dens = "/".join(f"{d:.3f}" for d in tr.densities)
            kept = "/".join(f"{100 * k / tr.numel:.2f}" for k in tr.kept)
            lines.append(f"{tr.block:>5} {b.outlier_ratio:7.3f} {b.layer_score:6.2f}  {short:<34} {tr.mean_abs:9.2e} "
                         f"{tr.outlier_ratio:7.3f} {tr.linear_score:6.2f} {dens:>15} {kept:>15} {'yes' if any(tr.clamped) else ''}")
    return "\n".join(lines)


def write_json(result: StatsResult, path: str) -> None:
    text = json.dumps(result.to_json(), indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def plot(result: StatsResult, path: str) -> None:
    """PNG: per layer, block outlier ratio and per-linear densities (first pruning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.models)
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 7), squeeze=False)
    for col, (mpath, rep) in enumerate(zip(result.model_paths, result.models)):
        ax = axes[0][col]
        kinds = sorted({tr.name.split(f"layers.{tr.block}.")[-1] for tr in rep.tensors})
        for kind in kinds:
            pts = [(tr.block, tr.outlier_ratio) for tr in rep.tensors if tr.name.endswith(kind)]
            ax.plot(*zip(*pts), ".--", alpha=0.7, label=f"{kind.replace('.weight', '')}")
        ax.set_ylabel(f"linear outlier ratio r_ij (% > {result.params.get('outlier_multiple')} x mean)")
        twin = ax.twinx()
        twin.plot([b.block for b in rep.blocks], [b.outlier_ratio for b in rep.blocks], "ko-", lw=2,
                  label=f"block D_i (% > {result.params.get('layer_outlier_multiple')} x block mean)")
        twin.set_ylabel("block outlier ratio D_i (%)")
        twin.legend(fontsize=7, loc="upper right")
        ax.set_title(f"outlier ratios: {mpath.rstrip('/').split('/')[-1]}")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[1][col]
        for kind in kinds:
            pts = [(tr.block, tr.densities[0]) for tr in rep.tensors if tr.name.endswith(kind)]
            ax.plot(*zip(*pts), "o-", alpha=0.8, label=kind.replace(".weight", ""))
        rate = result.params.get("pruning_rates", [None])[0]
        if rate is not None:
            ax.axhline(1 - rate, color="k", lw=0.8, ls=":", label=f"uniform 1 - s = {1 - rate:.2f}")
        ax.set_title(f"DP density per linear (rate {rate}, lamda {result.params.get('lamda')})")
        ax.set_xlabel("layer")
        ax.set_ylabel("density kept")
        ax.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
