"""`dppa-stream stats`: pass 1 only, and what a user looks at when tuning DP (lamda, M).

Reports per stack, block and linear: mean |delta|, outlier ratios, the scores they normalise to,
chosen densities, thresholds, realised kept counts (ties pruned) and clamps; as JSON, a text table
and a plot of densities and outlier ratios across layers.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from .blocks import KINDS
from .config import MergeConfig
from .errors import UsageError
from .memory import PeakSampler
from .pipeline import MergeOptions, session

# A fused or numbered expert tensor with more experts than this is one summary row per block in the
# table (`experts="auto"`); the JSON always has every expert.
EXPERT_ROWS_MAX = 4
EXPERT_MODES = ("auto", "each", "summary")
LABEL_MAX = 44  # longer labels are shortened in the middle

_ATTN_KINDS = ("q", "k", "v", "o", "qkv", "attn")


@dataclass
class StatsResult:
    method: str
    models: list  # ModelReport per fine-tune
    model_paths: list
    wall_seconds: float = 0.0
    bytes_read: int = 0
    peak_anon_bytes: int = 0
    params: dict = field(default_factory=dict)
    base_model: str = ""

    def to_json(self) -> dict:
        return {
            "method": self.method, "base_model": self.base_model, "params": self.params,
            "wall_seconds": self.wall_seconds, "bytes_read": self.bytes_read, "peak_anon_bytes": self.peak_anon_bytes,
            "models": [{"path": p, **m.to_json(), "stacks": stacks(m), "summary": summary(m)}
                       for p, m in zip(self.model_paths, self.models)],
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
                       engine.bytes_read, sampler.peak, dict(s.method.params), cfg.base_model or "")


# -- what the report is made of ------------------------------------------------------------------

def stacks(rep) -> list[dict]:
    """The stacks DP found in one fine-tune's report, in order: name, block indices, linears, linears
    per block (a number, or [min, max] when blocks differ) and linears per kind."""
    out: dict[str, dict] = {}
    per_block: dict[tuple, int] = {}

    def new(name):
        return {"name": name, "blocks": [], "linears": 0, "linears_per_block": 0, "kinds": {}}

    for br in rep.blocks:
        out.setdefault(br.stack, new(br.stack))["blocks"].append(br.block)
    for tr in rep.tensors:
        st = out.setdefault(tr.stack, new(tr.stack))
        st["linears"] += 1
        st["kinds"][tr.kind] = st["kinds"].get(tr.kind, 0) + 1
        per_block[(tr.stack, tr.block)] = per_block.get((tr.stack, tr.block), 0) + 1
    for st in out.values():
        st["kinds"] = dict(sorted(st["kinds"].items(), key=lambda kv: _kind_index(kv[0])))
        counts = [per_block.get((st["name"], b), 0) for b in st["blocks"]] or [0]
        st["linears_per_block"] = counts[0] if min(counts) == max(counts) else [min(counts), max(counts)]
    return list(out.values())


def summary(rep) -> dict:
    return {"linears": len(rep.tensors), "clamped": sum(any(tr.clamped) for tr in rep.tensors),
            "emptied": sum(tr.emptied for tr in rep.tensors)}


def rates(result: StatsResult) -> list[float]:
    p = result.params
    if p.get("pruning_rates"):
        return list(p["pruning_rates"])
    if p.get("pruning_rate") is not None:
        return [p["pruning_rate"]]
    first = next((tr for rep in result.models for tr in rep.tensors), None)
    return [float("nan")] * (len(first.densities) if first else 1)


def _per_block(st: dict) -> str:
    """Linears per block of a stack: '7', or '4-10' when blocks differ."""
    n = st["linears_per_block"]
    return f"{n[0]}-{n[1]}" if isinstance(n, list) else str(n)


_BRACKET = re.compile(r"\[(\d+)\]$")  # fused experts: mlp.experts.down_proj[3]
_NUMBERED = re.compile(r"(^|\.)([A-Za-z_]*experts)\.(\d+)(?=\.|$)")  # block_sparse_moe.experts.3.w1


def _expert(tr) -> tuple[str, int | None]:
    """(the label with the expert index replaced by '*', the index) for an expert linear; else (label, None)."""
    if tr.kind.startswith("expert"):
        m = _BRACKET.search(tr.label)
        if m:
            return tr.label[: m.start()] + "[*]", int(m.group(1))
        m = _NUMBERED.search(tr.label)
        if m:
            return tr.label[: m.start(3)] + "*" + tr.label[m.end(3):], int(m.group(3))
    return tr.label, None


def _kind_index(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _row_key(tr) -> tuple:
    """Order inside a block: attention, then MLP, then experts; by module, kind, tensor, expert."""
    pattern, idx = _expert(tr)
    group = 0 if tr.kind in _ATTN_KINDS else 2 if tr.kind.startswith("expert") else 1
    prefix = pattern.rsplit(".", 1)[0] if "." in pattern else ""
    return (group, prefix, _kind_index(tr.kind), pattern, -1 if idx is None else idx)


def shorten(text: str, width: int = LABEL_MAX) -> str:
    """`text` cut in the middle to at most `width` characters ('...' marks the cut)."""
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2:]


# -- the table -----------------------------------------------------------------------------------

def _median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _flags(trs) -> str:
    c = sum(any(tr.clamped) for tr in trs)
    e = sum(tr.emptied for tr in trs)
    if len(trs) == 1:
        return ", ".join(w for w, n in (("clamped", c), ("emptied", e)) if n)
    return ", ".join(f"{n}/{len(trs)} {w}" for w, n in (("clamped", c), ("emptied", e)) if n)


def _rows(rep, block_of: dict, nrates: int, experts: str) -> tuple[list, bool]:
    """Per stack: (stack dict, rows of cells). An expert tensor with more than EXPERT_ROWS_MAX experts
    (any number with 'summary', none with 'each') becomes one row per block: medians, and the range
    of the first density."""
    by_block: dict[tuple, list] = {}
    for tr in rep.tensors:
        by_block.setdefault((tr.stack, tr.block), []).append(tr)
    compact = False
    out = []
    for st in stacks(rep):
        rows = []
        for b in st["blocks"]:
            groups: dict[str, list] = {}
            for tr in sorted(by_block.get((st["name"], b), []), key=_row_key):
                pattern, idx = _expert(tr)
                groups.setdefault(pattern if idx is not None else f"\0{tr.label}\0{tr.span}", []).append(tr)
            first = True
            for key, trs in groups.items():
                many = len(trs) > 1 and (experts == "summary" or (experts == "auto" and len(trs) > EXPERT_ROWS_MAX))
                parts = [trs] if many else [[tr] for tr in trs]
                for part in parts:
                    br = block_of[(st["name"], b)]
                    tr = part[0]
                    if len(part) > 1:
                        compact = True
                        idxs = [_expert(t)[1] for t in part]
                        label = key.replace("*", f"{min(idxs)}-{max(idxs)}", 1)
                        med = lambda f: _median([f(t) for t in part])  # noqa: E731
                        d0 = [t.densities[0] for t in part]
                        extra = f"{min(d0):.3f}-{max(d0):.3f}"
                    else:
                        label, extra = tr.label or tr.name, ""
                        med = lambda f: f(tr)  # noqa: E731
                    cells = [str(b) if first else "", f"{br.outlier_ratio:.3f}" if first else "",
                             f"{br.layer_score:+.2f}" if first else "", shorten(label), tr.kind,
                             f"{med(lambda t: t.mean_abs):.2e}", f"{med(lambda t: t.outlier_ratio):.3f}",
                             f"{med(lambda t: t.linear_score):+.2f}"]
                    cells += [f"{med(lambda t, j=j: t.densities[j]):.3f}" for j in range(nrates)]
                    cells += [f"{med(lambda t, j=j: 100 * t.kept[j] / t.numel if t.numel else 0.0):.2f}"
                              if len(tr.kept) > j else "-" for j in range(nrates)]
                    cells += [_flags(part), extra]
                    rows.append(cells)
                    first = False
        out.append((st, rows))
    return out, compact


def table(result: StatsResult, experts: str = "auto") -> str:
    """A text table per fine-tune: a summary line, then per stack a header line and one row per linear
    (block signal on the first row of each block). Columns are aligned whatever the label lengths;
    labels over LABEL_MAX characters are shortened in the middle. `experts`: 'auto' (one summary row
    per expert tensor with more than EXPERT_ROWS_MAX experts), 'each' (a row per expert) or
    'summary' (a summary row for any expert tensor)."""
    if experts not in EXPERT_MODES:
        raise UsageError(f"experts must be one of {', '.join(EXPERT_MODES)}, not {experts!r}")
    rs = rates(result)
    head = ["block", "D_i %", "L_i", "linear", "kind", "mean|d|", "r_ij %", "T_ij"]
    head += [f"d@{s:g}" for s in rs] + [f"kept%@{s:g}" for s in rs] + ["clamp"]
    left = {3, 4, len(head) - 1}
    models = []
    compact = False
    for path, rep in zip(result.model_paths, result.models):
        block_of = {(br.stack, br.block): br for br in rep.blocks}
        per_stack, c = _rows(rep, block_of, len(rs), experts)
        compact |= c
        models.append((path, rep, per_stack))
    if compact:
        head.append(f"experts d@{rs[0]:g} min-max")
    ncol = len(head)
    all_rows = [r[:ncol] for _, _, ps in models for _, rows in ps for r in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in all_rows]) for i in range(ncol)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left or i == ncol - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = []
    for path, rep, per_stack in models:
        s = summary(rep)
        name = _names(result.model_paths)[result.model_paths.index(path)]
        plural = "" if len(per_stack) == 1 else "s"
        lines.append(f"# {name} ({path}): {s['linears']} linears in {len(per_stack)} stack{plural}, "
                     f"{s['clamped']} clamped, {s['emptied']} emptied")
        for st, rows in per_stack:
            lines.append(f"## {st['name']}: {len(st['blocks'])} blocks, {_per_block(st)} linears per block")
            lines.append(fmt(head))
            lines.extend(fmt(r[:ncol]) for r in rows)
        lines.append("")
    if compact:
        lines.append("Rows of several experts (e.g. [0-127]) show medians over those experts and the range of the "
                     "first density; `--experts each` lists every expert, --json has them all.")
    return "\n".join(lines).rstrip("\n")


def write_json(result: StatsResult, path: str) -> None:
    text = json.dumps(result.to_json(), indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def _names(paths: list[str]) -> list[str]:
    """Short, distinct names for the fine-tunes: the last path component(s)."""
    for depth in (1, 2, 3):
        names = ["/".join(os.path.normpath(p).split(os.sep)[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}: {n}" for i, n in enumerate(names)]


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
