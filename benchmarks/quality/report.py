"""Aggregate the per-seed results: Markdown tables (mean ± sample std over seeds), the headline
numbers beside the paper's claims, and the retention-vs-rate plot."""

from __future__ import annotations

import math
import os
import statistics

METHOD_LABEL = {"dare": "DARE (`dare_linear`)", "magnitude": "magnitude", "dp": "DP (`dp`)",
                "dppa": "DP + DPA (`dppa`, rates [r, r − 0.1], α searched)"}
T2_LABEL = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES", "dppa": "DPPA"}


def mean_std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def pct(xs, digits=0) -> str:
    m, s, n = mean_std(xs)
    if n == 0:
        return "–"
    return f"{100 * m:.{digits}f}" + (f" ± {100 * s:.{digits}f}" if n > 1 else "")


def _seed_mean(rows, key, **match):
    """Per seed: mean over the matching rows (e.g. over domains) of `key`; returns one value per seed."""
    out = []
    for seed_rows in rows:
        vals = [r[key] for r in seed_rows if key in r and all(r.get(k) == v for k, v in match.items())]
        vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
        if vals:
            out.append(statistics.fmean(vals))
    return out


def _grouped(items: list[str]) -> str:
    """'a; a; b' -> 'a (×2); b' : one entry per distinct per-seed setting."""
    out = []
    for it in dict.fromkeys(items):
        n = items.count(it)
        out.append(it + (f" (×{n})" if n > 1 else ""))
    return "; ".join(out)


def _t2(results, reg, method, variant):
    return [r["avg_norm"] for s in results["seeds"] for r in s.get("table2", [])
            if r["regime"] == reg and r["method"] == method and r["variant"] == variant]


def headline(results: dict) -> str:
    """The paper's claims beside the corresponding numbers measured here."""
    plan = results["plan"]
    seeds = results["seeds"]
    t1 = [s.get("table1", []) for s in seeds]
    regimes = [r["name"] for r in plan["regimes"]]
    n = len(seeds)
    L = ["### Headline numbers beside the paper's claims", "",
         f"Mean ± sample std over {n} seed{'s' if n > 1 else ''}; retention = test accuracy as % of the dense "
         "fine-tune, averaged over domains.", "",
         "| paper's claim | measured here | " + " | ".join(regimes) + " |", "|---|---|" + "---|" * len(regimes)]

    def t1cell(method, rate, key="retention"):
        return [pct(_seed_mean(t1, key, regime=reg, method=method, rate=rate)) for reg in regimes]

    def row(claim, what, cells):
        L.append(f"| {claim} | {what} | " + " | ".join(cells) + " |")

    top, second = plan["table2_rates"][0], plan["table2_rates"][1]
    if top in plan["rates"] and "dppa" in plan["table1_methods"]:
        row("DPPA keeps only 20 % of the delta yet performs like methods that keep up to 90 %",
            f"DP + DPA at rates [{top:g}, {second:g}] (≤ {100 * (1 - second):.0f} % kept)", t1cell("dppa", top))
        for m in ("magnitude", "dp", "dare"):
            if m in plan["table1_methods"] and second in plan["rates"]:
                row("", f"{METHOD_LABEL[m]} at rate {second:g} (the same {100 * (1 - second):.0f} % kept)", t1cell(m, second))
        low = min(plan["rates"])
        best_low = []
        for reg in regimes:
            vals = [mean_std(_seed_mean(t1, "retention", regime=reg, method=m, rate=low))[0]
                    for m in plan["table1_methods"] if m != "dppa"]
            best_low.append(f"{100 * max(vals):.0f}" if vals else "–")
        row("", f"best of the other methods keeping {100 * (1 - low):.0f} % (rate {low:g})", best_low)
    if "dare" in plan["table1_methods"]:
        for rate in [r for r in (0.7, 0.8) if r in plan["rates"]]:
            row("DARE works for simple fine-tunes but falls apart for complex ones (large drift)" if rate == 0.7 else "",
                f"DARE at rate {rate:g}", t1cell("dare", rate))
        if 0.8 in plan["rates"]:
            row("", "DARE at rate 0.8, share of the fine-tuning gain kept (negative: worse than the base)",
                t1cell("dare", 0.8, "gain"))
    if results["seeds"] and results["seeds"][0].get("table2"):
        cells_dppa, cells_best, cells_gap = [], [], []
        for reg in regimes:
            d = _t2(results, reg, "dppa", "tuned") or _t2(results, reg, "dppa", "w=1")
            others = {m: _t2(results, reg, m, "tuned") or _t2(results, reg, m, "lambda=1")
                      for m in plan["table2_methods"] if m != "dppa"}
            others = {m: v for m, v in others.items() if v}
            cells_dppa.append(pct(d, 1))
            if others and d:
                best = max(others, key=lambda m: mean_std(others[m])[0])
                cells_best.append(f"{pct(others[best], 1)} ({T2_LABEL.get(best, best)})")
                gaps = [100 * (a / b - 1) if b > 0 else float("nan") for a, b in zip(d, others[best])]
                cells_gap.append(f"{mean_std(gaps)[0]:+.0f} % ({', '.join(f'{g:+.0f}' for g in gaps)})")
            else:
                cells_best.append("–")
                cells_gap.append("–")
        row("DPPA improves model merging by nearly 20 %", "DPPA merge, avg normalised accuracy (tuned on val)", cells_dppa)
        row("", "best other method (tuned on val)", cells_best)
        row("", "DPPA relative to the best other method (per seed)", cells_gap)
    return "\n".join(L) + "\n"


def aggregate(results: dict) -> dict:
    """Headline numbers (seed mean/std) for the JSON summary and the README."""
    seeds = results["seeds"]
    plan = results["plan"]
    t1 = [s.get("table1", []) for s in seeds]
    t2 = [s.get("table2", []) for s in seeds]
    summary = {"table1": {}, "table2": {}}
    for reg in [r["name"] for r in plan["regimes"]]:
        for method in plan["table1_methods"]:
            for rate in plan["rates"]:
                vals = _seed_mean(t1, "retention", regime=reg, method=method, rate=rate)
                kept = _seed_mean(t1, "kept", regime=reg, method=method, rate=rate)
                if vals:
                    m, s, n = mean_std(vals)
                    gain = mean_std(_seed_mean(t1, "gain", regime=reg, method=method, rate=rate))
                    summary["table1"][f"{reg}/{method}/{rate:g}"] = {"retention_mean": m, "retention_std": s, "seeds": n,
                                                                     "gain_mean": gain[0], "gain_std": gain[1],
                                                                     "kept_mean": mean_std(kept)[0]}
        for method in plan["table2_methods"]:
            for variant in ("lambda=1", "w=1", "tuned"):
                vals = _seed_mean(t2, "avg_norm", regime=reg, method=method, variant=variant)
                if vals:
                    m, s, n = mean_std(vals)
                    summary["table2"][f"{reg}/{method}/{variant}"] = {"avg_norm_mean": m, "avg_norm_std": s, "seeds": n}
    return summary


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    plan = results["plan"]
    domains = plan["domains"]
    regimes = [r["name"] for r in plan["regimes"]]
    n_seeds = len(seeds)
    t1 = [s.get("table1", []) for s in seeds]
    t2 = [s.get("table2", []) for s in seeds]
    L = [headline(results)]
    spread = f"mean ± sample std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    # -- training and drift
    L += ["### Checkpoints: accuracy and drift", "",
          f"Exact-match accuracy (%) on the test split ({plan['n_test']} examples per domain), {spread}. "
          "Drift = mean |δ| / mean |θ0| over the block linear weights (per layer: blocks 0…"
          f"{plan['shape']['layers'] - 1}); mean abs δ is over the same weights (seed mean).", "",
          "| model | " + " | ".join(domains) + " | mean abs δ | drift (all blocks) | drift per block |",
          "|---|" + "---|" * (len(domains) + 3)]
    L.append("| base | " + " | ".join(pct([s["base_acc"]["test"][d] for s in seeds]) for d in domains) + " | – | – | – |")
    for reg in regimes:
        for d in domains:
            name = f"{d}-{reg}"
            accs = " | ".join(pct([s["dense"][name]["test"][dd] for s in seeds]) for dd in domains)
            drift = pct([s["drift"][name]["overall"] for s in seeds], 1)
            layers = sorted(seeds[0]["drift"][name]["per_layer"], key=int)
            per = " / ".join(f"{100 * statistics.fmean(s['drift'][name]['per_layer'][k] for s in seeds):.1f}" for k in layers)
            mad = statistics.fmean(s["drift"][name]["mean_abs_delta"] for s in seeds)
            L.append(f"| {name} | {accs} | {mad:.4f} | {drift} % | {per} % |")
    L.append("")
    # -- Table 1
    rates = plan["rates"]
    for reg in regimes:
        L += [f"### Table 1 ({reg} fine-tunes): accuracy retained after pruning the delta", "",
              f"Test accuracy as % of the dense fine-tune's, averaged over the {len(domains)} domains, {spread}. "
              "Rate = share of the delta pruned; `kept` = measured share of non-zero block-linear delta entries.", "",
              "| method | " + " | ".join(f"rate {r:g}" for r in rates) + " |",
              "|---|" + "---|" * len(rates)]
        for method in plan["table1_methods"]:
            cells = []
            for rate in rates:
                vals = _seed_mean(t1, "retention", regime=reg, method=method, rate=rate)
                kept = _seed_mean(t1, "kept", regime=reg, method=method, rate=rate)
                cells.append(f"{pct(vals)} (kept {pct(kept)})" if vals else "–")
            L.append(f"| {METHOD_LABEL.get(method, method)} | " + " | ".join(cells) + " |")
        L.append("")
        L += [f"Per domain ({reg}; retention %, seed mean; DPPA's searched factors of seed {seeds[0]['seed']} in brackets):", "",
              "| domain | method | " + " | ".join(f"{r:g}" for r in rates) + " |", "|---|---|" + "---|" * len(rates)]
        for d in domains:
            for method in plan["table1_methods"]:
                cells = []
                for rate in rates:
                    vals = _seed_mean(t1, "retention", regime=reg, method=method, rate=rate, domain=d)
                    cell = pct(vals)
                    if method == "dppa":
                        amp = [r.get("amplification") for r in t1[0] if r["regime"] == reg and r["domain"] == d
                               and r["method"] == method and r["rate"] == rate]
                        if amp and amp[0]:
                            cell += " [" + ", ".join(f"{a:g}" for a in amp[0]) + "]"
                    cells.append(cell)
                L.append(f"| {d} | {method} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["### Table 1b: share of the fine-tuning *gain* retained", "",
          "(accuracy − base) / (dense − base), averaged over domains, "
          f"{spread}: 100 = the dense fine-tune, 0 = no better than the base model, negative = worse than the base. "
          "This removes the base model's floor from the retention figures above.", "",
          "| regime | method | " + " | ".join(f"rate {r:g}" for r in rates) + " |", "|---|---|" + "---|" * len(rates)]
    for reg in regimes:
        for method in plan["table1_methods"]:
            cells = [pct(_seed_mean(t1, "gain", regime=reg, method=method, rate=rate)) for rate in rates]
            L.append(f"| {reg} | {METHOD_LABEL.get(method, method)} | " + " | ".join(cells) + " |")
    L.append("")
    # -- Table 2
    for reg in regimes:
        L += [f"### Table 2 ({reg} fine-tunes): all {len(domains)} domains merged into one model", "",
              f"Test accuracy (%) per domain and the average of accuracy / dense accuracy (normalised), {spread}.", "",
              "| method | setting | " + " | ".join(domains) + " | avg normalised | kept |",
              "|---|---|" + "---|" * (len(domains) + 2)]
        base_norm = []
        for sd in seeds:
            dn = {d: sd["dense"][f"{d}-{reg}"]["test"][d] for d in domains}
            base_norm.append(statistics.fmean(sd["base_acc"]["test"][d] / dn[d] for d in domains if dn[d] > 0))
        L.append("| base model (no merge) | – | " + " | ".join(pct([sd["base_acc"]["test"][d] for sd in seeds]) for d in domains)
                 + f" | {pct(base_norm, 1)} | 0 |")
        variants = []
        for s in t2:
            for r in s:
                key = (r["method"], r["variant"])
                if r["regime"] == reg and key not in variants:
                    variants.append(key)
        for method, variant in variants:
            rows = [[r for r in s if r["regime"] == reg and r["method"] == method and r["variant"] == variant] for s in t2]
            rows = [r[0] for r in rows if r]
            accs = " | ".join(pct([r["acc"][d] for r in rows]) for d in domains)
            if method == "dppa":
                setting = _grouped([f"w {r['weight']:.3g}, α [" + ", ".join(f"{a:g}" for a in r["amplification"]) + "]"
                                    for r in rows]) + (" (val)" if variant == "tuned" else "")
            elif variant == "tuned":
                setting = "λ " + _grouped([f"{r['lambda']:g}" for r in rows]) + " (val)"
            else:
                setting = "λ 1"
            kept = pct([r.get("kept") for r in rows])
            L.append(f"| {T2_LABEL.get(method, method)} | {setting} | {accs} | **{pct([r['avg_norm'] for r in rows], 1)}** | {kept} |")
        L.append("")
    return "\n".join(L)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = results["plan"]
    t1 = [s.get("table1", []) for s in results["seeds"]]
    regimes = [r["name"] for r in plan["regimes"]]
    fig, axes = plt.subplots(2, len(regimes), figsize=(5.5 * len(regimes), 8), sharey="row", squeeze=False)
    for row, (key, label) in enumerate((("retention", "test accuracy retained (% of dense)"),
                                        ("gain", "fine-tuning gain retained (%)"))):
        for ax, reg in zip(axes[row], regimes):
            for method in plan["table1_methods"]:
                xs, ms, ss = [], [], []
                for rate in plan["rates"]:
                    vals = _seed_mean(t1, key, regime=reg, method=method, rate=rate)
                    if vals:
                        m, s, _ = mean_std(vals)
                        xs.append(rate)
                        ms.append(100 * m)
                        ss.append(100 * s)
                if xs:
                    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=METHOD_LABEL.get(method, method))
            ax.axhline(100, color="grey", lw=0.8, ls=":")
            if key == "gain":
                ax.axhline(0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{reg} fine-tunes")
            ax.set_xlabel("pruning rate (share of the delta dropped)")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(label)
    axes[0][0].legend(fontsize=8, loc="lower left")
    n = len(results["seeds"])
    fig.suptitle(f"Pruning one fine-tune's delta (mean over domains; error bars: std over {n} seed{'s' if n > 1 else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def search_markdown(results: dict) -> str:
    """The search-strategy table: each strategy at the same budgets, tuned on val, scored on test."""
    seeds = results["seeds"]
    plan = results["plan"]
    rows = [r for s in seeds for r in s.get("search", [])]
    regimes = [r["name"] for r in plan["regimes"]]
    strategies = plan["strategies"]
    budgets = plan["strategy_budgets"]
    n = len(seeds)
    spread = f"mean ± sample std over {n} seeds" if n > 1 else "one seed"
    rates = ", ".join(f"{r:g}" for r in plan["table2_rates"])

    def per_seed(task, reg, strat, budget, key="retention"):
        """One number per seed: the mean over that seed's searches of this task and regime."""
        out = []
        for s in seeds:
            sel = [r[key] for r in s.get("search", []) if r["task"] == task and r["regime"] == reg
                   and r["strategy"] == strat and r["budget"] == budget]
            if sel:
                out.append(statistics.fmean(sel))
        return out

    cells = [(t, g) for t in ("prune", "merge") for g in regimes]
    L = ["### Search strategies at budgets of " + ", ".join(str(b) for b in budgets) + " evaluations", "",
         f"`dppa-stream search --strategy S --max-evals B` (the smallest budget fresh, each larger one `--resume`d "
         f"from it), start [{', '.join(f'{a:g}' for a in plan['search_start'])}], CLI defaults otherwise; "
         f"tuned on the validation split, the kept model scored on the test split; {spread} (seeds "
         f"{', '.join(str(s['seed']) for s in seeds)}). **prune**: dppa with pruning_rates [{rates}] on one fine-tune "
         "(one search per domain), test accuracy as % of the dense fine-tune's, mean over domains. **merge**: dppa "
         f"of the {len(plan['domains'])} fine-tunes (weight 1/{len(plan['domains'])} each, combine sum, objective "
         "geomean of accuracy / dense accuracy), average normalised test accuracy. Δ = the strategy minus the "
         "reference walk, seed by seed, then averaged. `evals` = evaluations used at the largest budget (the walk "
         "stops by itself); `repeats` = proposals that were a model already evaluated, answered from memory; "
         "`twice` = models merged and evaluated more than once (from the logs' plan digests).", "",
         "| task | regime | strategy | " + " | ".join(f"test @{b}" for b in budgets) + " | Δ vs walk "
         + " / ".join(f"@{b}" for b in budgets) + " | evals | repeats | twice | wall s |",
         "|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|"]
    overall = {}
    for task, reg in cells:
        for strat in strategies:
            sel = [r for r in rows if r["task"] == task and r["regime"] == reg and r["strategy"] == strat]
            if not sel:
                continue
            tests, deltas = [], []
            for b in budgets:
                mine, ref = per_seed(task, reg, strat, b), per_seed(task, reg, "reference", b)
                tests.append(f"**{pct(mine, 1)}**")
                overall.setdefault((strat, b), []).append(mine)
                deltas.append(f"{100 * statistics.fmean(a - c for a, c in zip(mine, ref)):+.1f}"
                              if strat != "reference" and len(mine) == len(ref) else "–")
            top = [r for r in sel if r["budget"] == budgets[-1]]
            evals = statistics.fmean(r["evals"] for r in top)
            repeats = statistics.fmean(r["repeats"] for r in top)
            twice = sum(r["evals"] - r["distinct_models"] for r in top)
            wall = sum(r["wall_seconds"] for r in sel) / len(top)  # a whole search, every budget's stage
            L.append(f"| {task} | {reg} | {strat} | " + " | ".join(tests) + " | " + " / ".join(deltas)
                     + f" | {evals:.1f} | {repeats:.1f} | {twice} | {wall:.0f} |")
    L += ["", f"Mean over the {len(cells)} task × regime rows (each seed's mean over rows, then mean ± std over seeds):", "",
          "| strategy | " + " | ".join(f"@{b}" for b in budgets) + " | Δ vs walk " + " / ".join(f"@{b}" for b in budgets)
          + " |", "|---|" + "---|" * len(budgets) + "---|"]
    for strat in strategies:
        means, deltas = [], []
        for b in budgets:
            cols = overall.get((strat, b), [])
            ref = overall.get(("reference", b), [])
            seedwise = [statistics.fmean(c[i] for c in cols) for i in range(min(len(c) for c in cols))] if cols else []
            refwise = [statistics.fmean(c[i] for c in ref) for i in range(min(len(c) for c in ref))] if ref else []
            means.append(pct(seedwise, 1))
            deltas.append(f"{100 * statistics.fmean(a - c for a, c in zip(seedwise, refwise)):+.1f}"
                          if strat != "reference" and seedwise and len(seedwise) == len(refwise) else "–")
        L.append(f"| {strat} | " + " | ".join(means) + " | " + " / ".join(deltas) + " |")
    merge_s = [x for r in rows for x in r.get("merge_seconds", [])]
    eval_s = [x for r in rows for x in r.get("eval_seconds", [])]
    if merge_s:
        L += ["", f"Per evaluation (median of {len(merge_s)} evaluations run): merge (plan from the stored statistics + "
                  f"pass 2) {statistics.median(merge_s):.2f} s, evaluation commands {statistics.median(eval_s):.2f} s."]
    b = budgets[-1]
    L += ["", f"Kept parameters at budget {b} (seed {seeds[0]['seed']}; effective factors, one vector per fine-tune "
              "when they differ):", "", "| task | regime | domain | strategy | kept factors | test accuracy |",
          "|---|---|---|---|---|---|"]
    for r in seeds[0].get("search", []) if seeds else []:
        if r["budget"] != b:
            continue
        m = r["best_factors"]
        fac = ("[" + ", ".join(f"{a:g}" for a in m[0]) + "]") if len({tuple(x) for x in m}) == 1 else \
            "; ".join("[" + ", ".join(f"{a:g}" for a in x) + "]" for x in m)
        acc = ", ".join(f"{d} {100 * v:.0f}" for d, v in r["acc"].items())
        rates = r.get("best_rates") or plan["table2_rates"]
        fac += "" if list(rates) == list(plan["table2_rates"]) else ", rates [" + ", ".join(f"{x:g}" for x in rates) + "]"
        L.append(f"| {r['task']} | {r['regime']} | {r['domain']} | {r['strategy']} | {fac}"
                 f"{'' if r['beat_start'] else ' (start kept)'} | {acc} |")
    return "\n".join(L) + "\n"


BEGIN, END = "<!-- results:begin (written by run.py) -->", "<!-- results:end -->"
SEARCH_BEGIN, SEARCH_END = "<!-- search:begin (written by run.py --tables search) -->", "<!-- search:end -->"


def write_readme_block(results: dict, readme: str, search: bool = False) -> bool:
    """Replace the text between the README's result markers (or its search markers) with the
    generated tables."""
    if not os.path.isfile(readme):
        return False
    with open(readme) as f:
        text = f.read()
    begin, end = (SEARCH_BEGIN, SEARCH_END) if search else (BEGIN, END)
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    t = results["timing"]
    block = (f"\n_Generated by `{results['environment']['command']}`: {len(results['seeds'])} seed(s), "
             f"{t['wall_seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU._\n\n"
             + (search_markdown(results) if search else markdown(results)) + "\n")
    with open(readme, "w") as f:
        f.write(head + begin + block + end + tail)
    return True


def main(argv=None) -> int:
    """Re-write tables.md and retention.png (and with --readme the README's results block) from a
    quality.json, or search.md (and the README's search block) from a search.json, e.g. after
    editing this module."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", help="results/quality.json")
    ap.add_argument("--readme", help="README.md whose results block to rewrite")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        results = json.load(f)
    folder = os.path.dirname(os.path.abspath(args.json))
    if results["seeds"] and "search" in results["seeds"][0] and "table1" not in results["seeds"][0]:
        with open(os.path.join(folder, "search.md"), "w") as f:  # a search.json (run.py --tables search)
            f.write(search_markdown(results) + "\n")
        if args.readme and not write_readme_block(results, args.readme, search=True):
            raise SystemExit(f"{args.readme}: no search markers")
        return 0
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(markdown(results) + "\n")
    plot(results, os.path.join(folder, "retention.png"))
    if args.readme and not write_readme_block(results, args.readme):
        raise SystemExit(f"{args.readme}: no results markers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
