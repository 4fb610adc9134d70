"""`dppa-stream stats`: pass 1 only, and what a user looks at when tuning DP (lamda, M).

Reports per stack, block and linear: mean |delta|, outlier ratios, the scores they normalise to,
chosen densities, thresholds, realised kept counts (ties pruned) and clamps; as JSON, a text table
and a plot of the block signal, the linear signal and the densities across the blocks of each
stack, coloured by linear kind (blocks.KINDS). matplotlib is imported by `figure` (and `plot`) only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
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

# One colour per linear kind, the same in every panel and every run. Kinds that share a block get
# clearly different colours (Llama: q k v o gate up down; MoE: q k v o + the experts' kinds, plus a
# shared expert's gate up down; GPT-2: qkv o fc_in fc_out; T5/BERT: q k v o fc_in fc_out).
KIND_COLOURS = {
    "q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "o": "#d62728", "qkv": "#17becf",
    "gate": "#9467bd", "up": "#8c564b", "gate_up": "#bcbd22", "down": "#e377c2",
    "fc_in": "#f032e6", "fc_out": "#808000",
    "expert_gate_up": "#000075", "expert_down": "#800000", "expert": "#469990",
    "attn": "#9a6324", "mlp": "#b15928", "other": "#7f7f7f",
}
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
    from .stats_store import StatsStore

    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        # pass-1 statistics wait on disk until the plan reads them back, as in a merge (an MoE
        # model's histograms outgrow memory); nothing is kept after the report
        with session(cfg, opts) as s, tempfile.TemporaryDirectory(prefix="dppa-stream-stats-") as tmp:
            engine = s.engine(StatsStore(os.path.join(tmp, "stats.zarr")))
            plan = s.plan(engine)
    return StatsResult(cfg.merge_method, list(plan.report), [m.path for m in cfg.models], time.perf_counter() - t0,
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


# -- the plot ------------------------------------------------------------------------------------

_STYLES = ("-", "--", ":", "-.")
_LEGEND_W = 2.6  # at most this many inches right of the last column for the legends


def _line_keys(per_model: list[list]) -> dict:
    """How the linears of one stack (a list per fine-tune) become lines: id(tr) -> (kind, module or "").
    A kind with one linear per block is one line. A kind with several per block is one line per
    module when they are distinct modules (T5's SelfAttention.q and EncDecAttention.q: same colour,
    own line style), and one line (median, min-max band) when they are experts or more than
    len(_STYLES) modules. The same for every fine-tune."""
    per_block: dict[tuple, int] = {}
    modules: dict[str, list] = {}
    for i, trs in enumerate(per_model):
        for tr in trs:
            per_block[(i, tr.kind, tr.block)] = per_block.get((i, tr.kind, tr.block), 0) + 1
            mod = _module(tr)
            if mod not in modules.setdefault(tr.kind, []):
                modules[tr.kind].append(mod)
    multi = {k for (_, k, _), c in per_block.items() if c > 1}
    split = {k for k in multi if not k.startswith("expert") and len(modules[k]) <= len(_STYLES)}
    return {id(tr): (tr.kind, _module(tr) if tr.kind in split else "") for trs in per_model for tr in trs}


def _module(tr) -> str:
    return tr.label.rsplit(".", 1)[0] if "." in tr.label else ""


def _series(trs, keys: dict, value) -> dict:
    """line key -> (blocks, median, min, max, linears per block) over the linears of a key per block."""
    import numpy as np

    per: dict[tuple, dict[int, list]] = {}
    for tr in trs:
        per.setdefault(keys[id(tr)], {}).setdefault(tr.block, []).append(value(tr))
    out = {}
    for key in sorted(per, key=lambda k: (_kind_index(k[0]), k[1])):
        bl = sorted(per[key])
        vals = [np.asarray(per[key][b], dtype=float) for b in bl]
        out[key] = (np.array(bl), np.array([np.median(v) for v in vals]), np.array([v.min() for v in vals]),
                    np.array([v.max() for v in vals]), max(len(v) for v in vals))
    return out


def _g(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _block_ticks(ax, nblocks: int) -> None:
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(12, max(nblocks, 1)), integer=True, steps=[1, 2, 4, 5, 10]))
    if nblocks <= 32:  # a minor tick per block (beyond that, ticks cost more to lay out than they help)
        ax.xaxis.set_minor_locator(MultipleLocator(1))


def plot(result: StatsResult, path: str) -> None:
    """Write `figure(result)` as a PNG."""
    figure(result).savefig(path)


def figure(result: StatsResult):
    """The plot as a matplotlib Figure (made without pyplot, so no global backend or state): one
    column per fine-tune; per stack three panels over its blocks: the block signal D_i, the linear
    outlier ratios r_ij and the densities at the first pruning rate (with the uniform 1 - s and the
    clamped linears). One colour per linear kind (KIND_COLOURS). Several linears of a
    kind in a block are drawn as their median with a min-max band (experts), or one line style per
    module (T5's self- and cross-attention). Legends sit right of the last column, outside every axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rs = rates(result)
    s0 = rs[0]
    p = result.params
    lm, m = p.get("layer_outlier_multiple"), p.get("outlier_multiple")
    names = _names(result.model_paths)
    n = max(len(result.models), 1)
    all_stacks: dict[str, set] = {}
    for rep in result.models:
        for st in stacks(rep):
            all_stacks.setdefault(st["name"], set()).update(st["blocks"])
    stack_names = list(all_stacks) or [""]
    S = len(stack_names)
    # columns widen with the number of blocks (up to 80), within a total width of about 26 inches;
    # an empty last column holds the legends (kept out of the layout, so they do not stretch rows)
    most = max((max(b) + 1 for b in all_stacks.values() if b), default=1)
    col_w = max(4.2, min(4.6 + 0.05 * max(0, most - 24), 7.0, (26 - 1.0 - _LEGEND_W) / n))
    fig = Figure(figsize=(1.0 + col_w * n + _LEGEND_W, 0.9 + 5.0 * S), dpi=110, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.06)  # room for label descenders at the edges
    FigureCanvasAgg(fig)  # fig.canvas.draw() lays it out and renders, as savefig does
    gs = fig.add_gridspec(3 * S, n + 1, height_ratios=[1.15, 1.6, 1.6] * S, width_ratios=[col_w] * n + [_LEGEND_W])
    base = f" of {_names([result.base_model])[0]}" if result.base_model else ""
    fig.suptitle(f"DP statistics ({result.method}) of {', '.join(names)}{base}\n"
                 f"pruning rates s = {'/'.join(_g(s) for s in rs)},  λ = {_g(p.get('lamda'))},  M = {_g(m)},  "
                 f"block multiple {_g(lm)},  semantics {p.get('semantics')}", fontsize=11)
    first_axes: dict[tuple, object] = {}
    longest = 0  # characters in the longest legend line
    for si, sname in enumerate(stack_names):
        nblocks = max(all_stacks[sname]) + 1 if all_stacks.get(sname) else 1
        markers = nblocks <= 24
        in_stack = [[tr for tr in rep.tensors if tr.stack == sname] for rep in result.models]
        keys = _line_keys(in_stack)
        count: dict[str, int] = {}  # kind -> most linears of it in one block
        styles: dict[str, str] = {}  # module -> line style, for kinds drawn per module
        banded = clamped_any = False
        for col, (mname, rep, trs) in enumerate(zip(names, result.models, in_stack)):
            axs = []
            for r in range(3):
                ax = fig.add_subplot(gs[3 * si + r, col], sharey=first_axes.get((si, r)),
                                     sharex=axs[0] if axs else first_axes.get((si, 0)))
                first_axes.setdefault((si, r), ax)
                axs.append(ax)
            a_d, a_r, a_k = axs
            brs = sorted((br for br in rep.blocks if br.stack == sname), key=lambda br: br.block)
            st = next((x for x in stacks(rep) if x["name"] == sname), None)
            a_d.plot([br.block for br in brs], [br.outlier_ratio for br in brs], "-", color="black", lw=1.6,
                     marker="o" if markers else None, ms=3.5)
            a_d.set_title(f"{shorten(mname, 60)}\n{shorten(sname or 'blocks', 40)}: {len(brs)} blocks × "
                          f"{_per_block(st) if st else 0} linears", fontsize=9.5)
            for ax, value in ((a_r, lambda tr: tr.outlier_ratio), (a_k, lambda tr: tr.densities[0])):
                for (kind, module), (x, med, lo, hi, cnt) in _series(trs, keys, value).items():
                    colour = KIND_COLOURS.get(kind, KIND_COLOURS["other"])
                    count[kind] = max(count.get(kind, 0), cnt)
                    ls = "-"
                    if module:
                        ls = styles.setdefault(module, _STYLES[len(styles) % len(_STYLES)])
                    if cnt > 1:
                        banded = True
                        ax.fill_between(x, lo, hi, color=colour, alpha=0.12, lw=0)
                        for edge in (lo, hi):
                            ax.plot(x, edge, "-", color=colour, lw=0.6, alpha=0.5)
                    ax.plot(x, med, ls, color=colour, lw=1.5, alpha=0.95, marker="o" if markers else None, ms=3)
            clamped = [(tr.block, tr.densities[0]) for tr in trs if tr.clamped and tr.clamped[0]]
            if clamped:
                clamped_any = True
                a_k.plot(*zip(*sorted(set(clamped))), "x", color="black", ms=6 if markers else 4.5, mew=1.2 if markers else 0.9,
                         ls="none", zorder=5)
            a_k.axhline(1 - s0, color="black", lw=1.0, ls=":")
            for ax in axs:
                ax.grid(True, which="major", alpha=0.25, lw=0.6)
                ax.tick_params(labelsize=8.5)
                ax.set_xlim(-0.5, nblocks - 0.5)
                _block_ticks(ax, nblocks)
            for ax in axs[:2]:
                ax.tick_params(labelbottom=False)
            a_k.set_xlabel(f"block of {sname}" if sname else "block", fontsize=9.5)
            if col == 0:
                a_d.set_ylabel(f"block D_i %\n|δ| > {_g(lm)}× its mean", fontsize=9)
                a_r.set_ylabel(f"linear r_ij %\n|δ| > {_g(m)}× its mean", fontsize=9)
                a_k.set_ylabel(f"density kept at s = {_g(s0)}", fontsize=9)
            else:
                for ax in axs:
                    ax.tick_params(labelleft=False)
        # the density axis starts just below 0, so that clamped (emptied) linears show
        top = first_axes[(si, 2)].get_ylim()[1]
        first_axes[(si, 2)].set_ylim(-0.04 * top, top)
        legend = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8.5,
                      frameon=False, alignment="left")
        split = {k for k, mod in keys.values() if mod}
        handles = [Line2D([], [], color=KIND_COLOURS.get(k, KIND_COLOURS["other"]), lw=2,
                          label=k if c == 1 or k in split else f"{k} (median of ×{c})") for k, c in count.items()]
        handles += [Line2D([], [], color="0.3", lw=1.5, ls=ls, label=shorten(mod, 30)) for mod, ls in styles.items()]
        handles.append(Line2D([], [], color="black", lw=1.0, ls=":", label=f"uniform 1 − s = {1 - s0:.2f}"))
        if banded:
            handles.append(Patch(facecolor="0.85", edgecolor="0.5", lw=0.6, label="min–max of a kind's\nlinears in a block"))
        if clamped_any:
            handles.append(Line2D([], [], color="black", marker="x", ls="none", label="clamped to [1/n, 1]"))
        a_d, a_r, a_k = (ax for ax in fig.axes[-3:])
        # centred on the gap between the r_ij and density panels: it is the key to both
        leg = a_r.legend(handles=handles, title="linear kind" + (" / module" if styles else ""), title_fontsize=9,
                         **{**legend, "loc": "center left", "bbox_to_anchor": (1.02, -0.03)})
        leg.set_in_layout(False)
        longest = max([longest] + [len(line) for h in handles for line in h.get_label().split("\n")])
        leg = a_d.legend(handles=[Line2D([], [], color="black", lw=1.6, label="block D_i")], **legend)
        leg.set_in_layout(False)
    legend_w = min(max(0.75 + 0.06 * longest, 1.4), _LEGEND_W)  # the legend column, fitted to the labels
    fig.set_size_inches(1.0 + col_w * n + legend_w, fig.get_size_inches()[1])
    gs.set_width_ratios([col_w] * n + [legend_w])
    return fig
