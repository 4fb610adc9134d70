"""The experiments: train (or reuse) the checkpoints of one seed, then Table 1 (pruning one
fine-tune) and Table 2 (merging all fine-tunes of a regime). Every pruned or merged model is
written by the `dppa-stream merge` / `dppa-stream search` command.

By default the commands run in this process through the click entry point
(`dppa_stream.cli.main.main([...])`, exactly what the `dppa-stream` executable calls): a fresh
process per merge would spend ~3 s importing torch, dask and zarr to merge a 1 MB model in 0.5 s.
`--cli subprocess` runs the installed executable instead (same results, much slower).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import yaml

from . import model as M
from . import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_SCRIPT = os.path.join(HERE, "evaluate.py")
DPPA_BIN = os.environ.get("DPPA_STREAM_BIN") or os.path.join(os.path.dirname(sys.executable), "dppa-stream")


@dataclass
class Regime:
    name: str
    steps: int
    lr: float


@dataclass
class Plan:
    """Everything one run needs: `Plan()` is the full benchmark, `smoke_plan()` the CI version."""

    shape: M.ModelShape = field(default_factory=lambda: M.ModelShape(hidden=64, layers=4, heads=4, intermediate=192))
    domains: tuple = ("rev", "sort", "shift")
    base_steps: int = 400
    base_hard_share: float = 0.02  # the base sees a little of the hard level: a weak generalist
    base_lr: float = 3e-3
    base_batch: int = 128
    ft_batch: int = 64
    ft_replay: float = 0.5  # share of each fine-tuning batch drawn from the base mixture
    regimes: tuple = (Regime("simple", 120, 3e-4), Regime("complex", 500, 3e-3))
    rates: tuple = (0.5, 0.7, 0.8, 0.9, 0.95)
    table1_methods: tuple = ("dare", "magnitude", "dp", "dppa")
    table2_methods: tuple = ("task_arithmetic", "ties", "dare_ties", "dppa")
    table2_density: float = 0.2  # ties / dare_ties keep 20 %, as DPPA at [0.9, 0.8] keeps at most 20 %
    table2_rates: tuple = (0.9, 0.8)
    lambdas: tuple = (0.1, 0.2, 0.33, 0.5, 0.75, 1.0)  # validation grid for the baselines' merged-delta scale
    dppa_weights: tuple = ("1", "1/K", "1/2K", "1/4K")  # DPPA per-model weight grid (K = number of fine-tunes)
    search_start: tuple = (1.0, 0.0)
    search_step: float = 0.1
    search_max_evals: int = 16
    # the search table: the strategies of `dppa-stream search` at the same budgets, tuned on val, test reported
    strategies: tuple = ("reference", "refine", "refine:0.01", "tpe", "cmaes")  # NAME or NAME:MIN_GAIN
    strategy_budgets: tuple = (8, 16, 32)
    n_val: int = 100
    n_test: int = 200

    def to_json(self) -> dict:
        d = asdict(self)
        d["regimes"] = [asdict(r) if not isinstance(r, dict) else r for r in self.regimes]
        return d


def smoke_plan() -> Plan:
    return Plan(shape=M.ModelShape(hidden=32, layers=2, heads=2, intermediate=64), domains=("count",),
                base_steps=60, base_batch=32, ft_batch=32, regimes=(Regime("complex", 40, 3e-3),),
                rates=(0.8,), table1_methods=("dare", "dppa"), table2_methods=("task_arithmetic", "dppa"),
                lambdas=(1.0,), dppa_weights=("1",), search_max_evals=3, strategies=("reference", "refine"),
                strategy_budgets=(2, 3), n_val=20, n_test=20)


# ---------------------------------------------------------------------------------------------
# Running the CLI


class Cli:
    def __init__(self, mode: str = "inproc"):
        self.mode = mode
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, args: list[str]) -> None:
        t0 = time.perf_counter()
        self.calls += 1
        try:
            if self.mode == "subprocess":
                res = subprocess.run([DPPA_BIN] + args, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"dppa-stream {shlex.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
            else:
                from dppa_stream.cli.main import main

                try:
                    main(args, standalone_mode=False, prog_name="dppa-stream")
                except SystemExit as e:
                    if e.code not in (0, None):
                        raise RuntimeError(f"dppa-stream {shlex.join(args)} exited with {e.code}") from None
        finally:
            self.seconds += time.perf_counter() - t0


def write_config(path: str, method: str, base: str, models: list[tuple[str, dict]], params: dict) -> str:
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": p, **({"parameters": mp} if mp else {})} for p, mp in models],
           "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def eval_cmd(domain: str) -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(EVAL_SCRIPT)} --model {{model}} --domain {domain} --split val"


def kept_fraction(base: str, model: str) -> float:
    """Share of block-linear delta entries that are non-zero in `model` (the realised density)."""
    import re

    b, m = M.load_weights(base), M.load_weights(model)
    nz = n = 0
    for k, w in b.items():
        if w.dim() == 2 and re.search(r"layers\.\d+\.", k):
            nz += int((m[k].float() != w.float()).sum())
            n += w.numel()
    return nz / n


def read_search_log(out: str) -> dict:
    with open(os.path.join(out, "search_log.json")) as f:
        return json.load(f)


def geo_mean_ratio(acc: dict, dense: dict, floor: float) -> float:
    """The search's objective: geometric mean of accuracy / dense accuracy (dense floored at `floor`)."""
    ratios = [acc[d] / max(dense[d], floor) for d in acc]
    if any(r <= 0 for r in ratios):
        return 0.0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


# ---------------------------------------------------------------------------------------------
# One seed


class SeedRun:
    def __init__(self, plan: Plan, seed: int, evaluator, cli: Cli, work: str, cache_dir: str = M.CACHE_DIR,
                 log=print, rates: tuple | None = None):
        self.plan, self.seed, self.ev, self.cli, self.log = plan, seed, evaluator, cli, log
        self.work = os.path.join(work, f"seed{seed}")
        self.cache_dir = cache_dir
        self.rates = rates or plan.rates
        os.makedirs(self.work, exist_ok=True)
        self.result = {"seed": seed, "timing": {}}

    def _clock(self, key: str, t0: float):
        self.result["timing"][key] = round(time.perf_counter() - t0, 2)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self):
        p = self.plan
        t0 = time.perf_counter()
        exclude = tasks.excluded_prompts(p.domains, p.n_val, p.n_test)
        evalsizes = {"n_val": p.n_val, "n_test": p.n_test}
        base_mix = tuple((t, lv, w) for (t, lv), w in tasks.base_mixture(p.domains, p.base_hard_share).items())
        self.base, binfo = M.trained(p.shape, M.TrainRecipe("base", base_mix, p.base_steps, p.base_lr, p.base_batch),
                                     self.seed, None, exclude, self.cache_dir, evalsizes, self.log)
        self.fts = {}
        train = {"base": _train_info(binfo)}
        drift = {}
        for r in p.regimes:
            for d in p.domains:
                mix = tuple((t, lv, w) for (t, lv), w in tasks.finetune_mixture(d, p.ft_replay, p.domains).items())
                recipe = M.TrainRecipe(f"{d}-{r.name}", mix, r.steps, r.lr, p.ft_batch)
                path, info = M.trained(p.shape, recipe, self.seed, self.base, exclude, self.cache_dir, evalsizes, self.log)
                self.fts[(r.name, d)] = path
                train[f"{d}-{r.name}"] = _train_info(info)
                drift[f"{d}-{r.name}"] = M.delta_stats(self.base, path)
        self._clock("checkpoints", t0)
        t0 = time.perf_counter()
        self.base_acc = {s: self.ev.accuracies(self.base, p.domains, s) for s in ("val", "test")}
        self.dense = {}
        for (reg, d), path in self.fts.items():
            self.dense[(reg, d)] = {s: self.ev.accuracies(path, p.domains, s) for s in ("val", "test")}
        self._clock("dense_eval", t0)
        self.result.update(
            checkpoints={"base": self.base, **{f"{d}-{r}": v for (r, d), v in self.fts.items()}},
            training=train, drift=drift, base_acc=self.base_acc,
            dense={f"{d}-{r}": v for (r, d), v in self.dense.items()})

    # -- Table 1 -------------------------------------------------------------------------------
    def table1(self):
        t0 = time.perf_counter()
        rows = []
        for r in self.plan.regimes:
            for d in self.plan.domains:
                ft = self.fts[(r.name, d)]
                dense = self.dense[(r.name, d)]["test"][d]
                for rate in self.rates:
                    for method in self.plan.table1_methods:
                        row = self._prune(method, ft, d, r.name, rate)
                        row["retention"] = row["acc"] / dense if dense > 0 else float("nan")
                        floor = self.base_acc["test"][d]
                        # share of the fine-tuning gain kept: 1 = dense fine-tune, 0 = the base's accuracy
                        row["gain"] = (row["acc"] - floor) / (dense - floor) if dense - floor >= 0.05 else float("nan")
                        row["dense"] = dense
                        row["base"] = floor
                        rows.append(row)
                        self.log(f"  table1 seed {self.seed} {r.name:7s} {d:5s} rate {rate:.2f} {method:9s} "
                                 f"acc {row['acc']:.3f} ({100 * row['retention']:.0f} % of dense), kept {row['kept']:.3f}")
        self.result["table1"] = rows
        self._clock("table1", t0)

    def _prune(self, method: str, ft: str, domain: str, regime: str, rate: float) -> dict:
        tag = f"t1-{regime}-{domain}-{method}-{rate:g}"
        cfg = os.path.join(self.work, tag + ".yml")
        out = os.path.join(self.work, tag)
        row = {"regime": regime, "domain": domain, "method": method, "rate": rate}
        if method == "dppa":
            rates = [rate, round(max(rate - 0.1, 0.0), 6)]
            write_config(cfg, "dppa", self.base, [(ft, {})], {"pruning_rates": rates,
                                                             "amplification": list(self.plan.search_start)})
            self.cli(["search", cfg, out, "--eval-cmd", eval_cmd(domain), "--strategy", "reference", "--start",
                      ",".join(f"{a:g}" for a in self.plan.search_start), "--step", f"{self.plan.search_step:g}",
                      "--max-evals", str(self.plan.search_max_evals), "--overwrite", "--quiet"])
            slog = read_search_log(out)
            row.update(pruning_rates=rates, amplification=slog["best_amplification"], val_score=slog["best_score"],
                       search_evals=len(slog["evaluations"]))
        else:
            if method == "dare":
                write_config(cfg, "dare_linear", self.base, [(ft, {"weight": 1.0, "density": round(1 - rate, 6)})], {})
            elif method == "magnitude":
                write_config(cfg, "magnitude", self.base, [(ft, {"weight": 1.0, "density": round(1 - rate, 6)})], {})
            elif method == "dp":
                write_config(cfg, "dp", self.base, [(ft, {})], {"pruning_rate": rate})
            else:
                raise ValueError(method)
            self.cli(["merge", cfg, out, "--seed", str(self.seed), "--overwrite", "--quiet"])
        row["acc"] = self.ev.accuracy(out, domain, "test")
        row["kept"] = kept_fraction(self.base, out)
        shutil.rmtree(out, ignore_errors=True)
        return row

    # -- Table 2 -------------------------------------------------------------------------------
    def table2(self):
        t0 = time.perf_counter()
        rows = []
        p = self.plan
        for r in p.regimes:
            fts = [self.fts[(r.name, d)] for d in p.domains]
            dense_val = {d: self.dense[(r.name, d)]["val"][d] for d in p.domains}
            dense_test = {d: self.dense[(r.name, d)]["test"][d] for d in p.domains}
            for method in p.table2_methods:
                for variant, row in self._merge_all(method, r.name, fts, dense_val):
                    row["norm"] = {d: row["acc"][d] / dense_test[d] if dense_test[d] > 0 else float("nan") for d in p.domains}
                    row["avg_norm"] = sum(row["norm"].values()) / len(row["norm"])
                    row.update(regime=r.name, method=method, variant=variant)
                    rows.append(row)
                    self.log(f"  table2 seed {self.seed} {r.name:7s} {method:15s} {variant:8s} "
                             + " ".join(f"{d} {row['acc'][d]:.2f}" for d in p.domains)
                             + f"  avg normalised {100 * row['avg_norm']:.1f} %")
        self.result["table2"] = rows
        self._clock("table2", t0)

    def _merge_all(self, method, regime, fts, dense_val):
        p = self.plan
        tag = f"t2-{regime}-{method}"
        cfg = os.path.join(self.work, tag + ".yml")
        out = os.path.join(self.work, tag)
        if method == "dppa":
            # One factor search per per-model weight: w = 1 is the plain sum θ0 + Σ α·δ' (untuned);
            # w = 1/K makes α = 1 the mean of the pruned deltas. The search only climbs from its
            # start, so the weight sets the smallest merged-delta scale it can reach; the weight is
            # chosen on validation like the baselines' λ.
            found = {}
            K = len(fts)
            grid = {"1": 1.0, "1/K": 1.0 / K, "1/2K": 0.5 / K, "1/4K": 0.25 / K}
            for w in sorted({round(grid[g], 6) for g in p.dppa_weights}, reverse=True):
                write_config(cfg, "dppa", self.base, [(f, {"weight": w}) for f in fts],
                             {"pruning_rates": list(p.table2_rates), "amplification": list(p.search_start),
                              "combine": "sum"})
                args = ["search", cfg, out]
                for d in p.domains:
                    args += ["--eval-cmd", eval_cmd(d)]
                for d in p.domains:  # floored at one example's worth: a score of 0 is refused (see README)
                    args += ["--dense-score", f"{max(dense_val[d], 1 / p.n_val):.6g}"]
                self.cli(args + ["--strategy", "reference", "--start", ",".join(f"{a:g}" for a in p.search_start),
                                 "--step", f"{p.search_step:g}",
                                 "--max-evals", str(p.search_max_evals), "--overwrite", "--quiet"])
                slog = read_search_log(out)
                found[w] = {"weight": w, "amplification": slog["best_amplification"], "val_objective": slog["best_score"],
                            "search_evals": len(slog["evaluations"]), "acc": self.ev.accuracies(out, p.domains, "test"),
                            "kept": kept_fraction(self.base, out)}
                shutil.rmtree(out, ignore_errors=True)
            if 1.0 in found:
                yield "w=1", found[1.0]
            if len(found) > 1:
                best = max(found, key=lambda k: found[k]["val_objective"])
                yield "tuned", {**found[best], "grid": {str(k): v["val_objective"] for k, v in found.items()}}
            return
        models = []
        for f in fts:
            mp = {"weight": 1.0}
            if method in ("ties", "dare_ties"):
                mp["density"] = p.table2_density
            models.append((f, mp))
        grid = {}
        for lam in sorted(set(p.lambdas) | {1.0}):
            write_config(cfg, method, self.base, models, {"lambda": lam})
            self.cli(["merge", cfg, out, "--seed", str(self.seed), "--overwrite", "--quiet"])
            val = self.ev.accuracies(out, p.domains, "val")
            test = self.ev.accuracies(out, p.domains, "test")
            grid[lam] = {"val_objective": geo_mean_ratio(val, dense_val, 1 / p.n_val), "acc": test,
                         "kept": kept_fraction(self.base, out) if lam == 1.0 else None}
        shutil.rmtree(out, ignore_errors=True)
        one = grid[1.0]
        yield "lambda=1", {"lambda": 1.0, "val_objective": one["val_objective"], "acc": one["acc"], "kept": one["kept"]}
        if len(grid) > 1:
            best = max(grid, key=lambda k: (grid[k]["val_objective"], -abs(k - 1.0)))
            yield "tuned", {"lambda": best, "val_objective": grid[best]["val_objective"], "acc": grid[best]["acc"],
                            "kept": one["kept"], "grid": {str(k): v["val_objective"] for k, v in grid.items()}}

    # -- the search table: every strategy at the same budgets -------------------------------------
    def search_table(self):
        """`dppa-stream search` with each strategy at each budget, tuned on validation and scored on
        test: pruning one fine-tune (dppa, rates table2_rates) and merging all fine-tunes of a regime
        (dppa, weight 1/K, combine sum, objective: geomean of accuracy / dense accuracy). Every
        strategy starts at search_start and uses the CLI's defaults otherwise (--min-gain, --objective
        geomean, --max-factor 4, --seed 0). The smallest budget is a fresh search; each larger one
        extends it with `--resume --max-evals B` (the logged evaluations are replayed, not run again:
        the strategies propose the same points whatever the budget, so this is the search a fresh run
        with budget B makes), and the kept model of every budget is scored on test."""
        t0 = time.perf_counter()
        p = self.plan
        rows = []
        start = ",".join(f"{a:g}" for a in p.search_start)
        for r in p.regimes:
            dense_val = {d: self.dense[(r.name, d)]["val"][d] for d in p.domains}
            dense_test = {d: self.dense[(r.name, d)]["test"][d] for d in p.domains}
            jobs = [("prune", d, [(self.fts[(r.name, d)], {})], [d]) for d in p.domains]
            K = len(p.domains)
            jobs.append(("merge", "all", [(self.fts[(r.name, d)], {"weight": round(1 / K, 6)}) for d in p.domains],
                         list(p.domains)))
            for task, domain, models, doms in jobs:
                for strategy in p.strategies:
                    tag = f"s-{r.name}-{task}-{domain}-{strategy.replace(':', '-').replace('+', '-')}"
                    cfg = os.path.join(self.work, tag + ".yml")
                    out = os.path.join(self.work, tag)
                    write_config(cfg, "dppa", self.base, models, {"pruning_rates": list(p.table2_rates),
                                                                  "amplification": list(p.search_start)})
                    args = ["search", cfg, out]
                    for d in doms:
                        args += ["--eval-cmd", eval_cmd(d)]
                    if task == "merge":  # floored at one example's worth, like Table 2
                        for d in doms:
                            args += ["--dense-score", f"{max(dense_val[d], 1 / p.n_val):.6g}"]
                    spec, _, extra = strategy.partition("+")  # NAME[:MIN_GAIN][+TUNED]: e.g. refine+rates
                    name, _, gain = spec.partition(":")
                    args += ["--strategy", name, "--start", start, "--seed", "0", "--quiet"]
                    args += ["--min-gain", gain] if gain else []
                    args += ["--tune", "factors," + extra] if extra else []
                    for i, budget in enumerate(p.strategy_budgets):
                        t1 = time.perf_counter()
                        self.cli(args + ["--max-evals", str(budget)] + (["--resume"] if i else ["--overwrite"]))
                        wall = time.perf_counter() - t1
                        slog = read_search_log(out)
                        acc = self.ev.accuracies(out, doms, "test")
                        norm = {d: acc[d] / dense_test[d] if dense_test[d] > 0 else float("nan") for d in doms}
                        evs = slog["evaluations"]
                        row = {"regime": r.name, "task": task, "domain": domain, "strategy": strategy, "budget": budget,
                               "start_factors": slog["start_factors"], "best_factors": slog["best_factors"],
                               "best_rates": slog["kept"]["rates"],
                               "val_start": slog["start_score"], "val_best": slog["best_score"],
                               "beat_start": slog["beat_start"], "evals": slog["evaluations_used"],
                               "repeats": slog["repeats"], "distinct_models": len({e["digest"] for e in evs}),
                               "merge_seconds": [e["merge_seconds"] for e in evs if not e["replayed"]],
                               "eval_seconds": [e["eval_seconds"] for e in evs if not e["replayed"]],
                               "min_gain": slog["min_gain"], "wall_seconds": round(wall, 2), "acc": acc,
                               "retention": sum(norm.values()) / len(norm)}
                        rows.append(row)
                        self.log(f"  search seed {self.seed} {r.name:7s} {task} {domain:5s} {strategy:9s} "
                                 f"budget {budget:2d}: val {row['val_start']:.3f} -> {row['val_best']:.3f}, test "
                                 f"retention {100 * row['retention']:.1f} %, {row['evals']} evals, {wall:.0f}s")
                    shutil.rmtree(out, ignore_errors=True)
        self.result["search"] = rows
        self._clock("search", t0)

    def run(self, tables=("table1", "table2")) -> dict:
        self.checkpoints()
        if "table1" in tables:
            self.table1()
        if "table2" in tables:
            self.table2()
        if "search" in tables:
            self.search_table()
        return self.result


def _train_info(info: dict) -> dict:
    return {k: info[k] for k in ("key", "final_loss", "seconds") if k in info}
