"""`dppa-stream search`: choose DPA amplification factors on a validation score.

Two strategies, both under one budget of evaluations (`max_evals`):

- `tpe` (default): every fine-tune gets its own factors (a K x L matrix: K fine-tunes, L pruning
  rates), searched in both directions inside [0, max_factor] on a grid of `step` by optuna's
  TPE sampler (seeded, multivariate, ask/tell), starting with an evaluation of the start factors.
  optuna is imported only here, only for this strategy.
- `reference`: the authors' greedy walk (`python_contral.py`, docs/dppa-algorithm.md §4.3), kept
  for faithfulness: one factor vector shared by every fine-tune, start (1.8, 0.0), one coordinate
  at a time in +`step` moves while the objective improves; a coordinate below one step starts its
  walk at 1.0. Quirk Q11 is fixed: a probe that does not improve is reverted, and the model kept
  is the best one evaluated.

Objective: the scores (last number each `--eval-cmd` prints), each divided by its `--dense-score`
(1 when not given), combined by `mean`, `geomean` or `min`; with one command all three are the
score (ratio). `geomean` floors each ratio at GEOMEAN_FLOOR so one task scoring 0 does not make
every candidate score 0.

Noise margin: a candidate replaces the incumbent (the start, at first) only when it beats it by
more than `min_gain`; the model kept is the last incumbent, so when nothing beats the start by more
than the margin, the start is kept (and the report says so).

Work folder OUT.search/: `stats.zarr` (pass 1, computed once: every candidate is planned from it),
`search_log.jsonl` (a header, then one line per evaluation: factors, raw scores, objective, wall
time; appended and fsynced), `best/` (the incumbent's model) and `best.json` (its factors).
`resume=True` replays the logged evaluations (no logged point is evaluated again; the seeded
optimiser proposes the same points from the same history) and continues to `max_evals`. A log
made with another config, other inputs, another seed, strategy or evaluation command is refused.
On success the kept model is published to OUT with `search_log.json`/`search_log.md`, and
OUT.search is removed. Tune on a validation split: the reference tuned on the test sets it
reported (quirk Q12).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import yaml

from .config import MergeConfig, _norm, parse_config
from .errors import OutputError, UsageError
from .output import check_output, fingerprint, prepare_partial, publish
from .pipeline import MergeOptions, session
from .stats_store import StatsStore

STRATEGIES = ("tpe", "reference")
OBJECTIVES = ("mean", "geomean", "min")
DEFAULT_MIN_GAIN = {"tpe": 0.01, "reference": 0.0}
DEFAULT_MAX_FACTOR = 4.0
GEOMEAN_FLOOR = 0.01  # a ratio below 1 % of the dense score counts as 1 % in the geometric mean
LOG_NAME = "search_log.jsonl"
_EPS = 1e-9  # "beats by more than X" is decided as gain > X + _EPS (0.53 - 0.52 is 0.010000000000000009)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Evaluation:
    n: int  # 1-based, in the order evaluated
    factors: list  # K x L: per fine-tune, one factor per pruning rate
    scores: list  # raw score per evaluation command
    objective: float
    seconds: float
    replayed: bool = False  # taken from the log of an interrupted run (--resume), not run again

    def to_json(self) -> dict:
        return {"n": self.n, "factors": self.factors, "scores": self.scores, "objective": self.objective,
                "seconds": round(self.seconds, 3), "replayed": self.replayed}


@dataclass
class SearchResult:
    out: str
    strategy: str
    objective_name: str
    min_gain: float
    start_factors: list  # K x L
    start_score: float
    best_factors: list  # K x L: the factors of the model kept in OUT
    best_score: float
    best_index: int  # the kept evaluation's number (1 = the start)
    beat_start: bool  # some candidate beat the start by more than min_gain
    models: list  # fine-tune paths
    log: list = field(default_factory=list)  # Evaluation
    wall_seconds: float = 0.0

    @property
    def best_amplification(self):
        """As written into the kept model's config: one shared vector (reference) or per model."""
        return self.best_factors[0] if self.strategy == "reference" else self.best_factors

    @property
    def changed(self) -> list:
        """Per fine-tune: (start factors, kept factors), or None where they are equal."""
        return [None if a == b else (a, b) for a, b in zip(self.start_factors, self.best_factors)]

    def _scores(self, n: int) -> str:
        ev = self.log[n - 1] if 0 < n <= len(self.log) else None
        return f" (scores {', '.join(f'{x:g}' for x in ev.scores)})" if ev is not None and len(ev.scores) > 1 else ""

    def report(self) -> str:
        """The final report (stderr and search_log.md)."""
        n = len(self.log)
        replayed = sum(e.replayed for e in self.log)
        lines = [f"search ({self.strategy}, objective {self.objective_name}, min gain {self.min_gain:g}): "
                 f"{n} evaluations" + (f" ({replayed} replayed from the log)" if replayed else "")
                 + f" in {self.wall_seconds:.1f}s",
                 f"  start: {_fmt(self.start_factors)}, objective {self.start_score:.6g}{self._scores(1)}",
                 f"  kept:  {_fmt(self.best_factors)}, objective {self.best_score:.6g}{self._scores(self.best_index)} "
                 f"(evaluation {self.best_index}, {self.best_score - self.start_score:+.6g} over the start)"]
        if self.beat_start:
            for i, ch in enumerate(self.changed):
                name = os.path.basename(self.models[i].rstrip("/")) if i < len(self.models) else str(i)
                lines.append(f"  model {i + 1} ({name}): " + ("unchanged " + _fmt1(self.start_factors[i]) if ch is None
                                                               else f"{_fmt1(ch[0])} -> {_fmt1(ch[1])}"))
            lines.append(f"kept the best candidate in {self.out}")
        else:
            top = max(self.log, key=lambda e: e.objective) if self.log else None
            if top is not None and top.objective > self.start_score:
                lines.append(f"  (the highest objective, {top.objective:.6g} at evaluation {top.n}, is within the margin)")
            lines.append(f"no candidate beat the start by more than {self.min_gain:g}; kept the start in {self.out}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "objective": self.objective_name, "min_gain": self.min_gain,
                "start_factors": self.start_factors, "start_score": self.start_score,
                "best_factors": self.best_factors, "best_score": self.best_score, "best_evaluation": self.best_index,
                "best_amplification": self.best_amplification, "beat_start": self.beat_start,
                "changed": [None if c is None else {"model": self.models[i], "from": c[0], "to": c[1]}
                            for i, c in enumerate(self.changed)],
                "models": self.models, "evaluations_used": len(self.log), "wall_seconds": round(self.wall_seconds, 2),
                "evaluations": [e.to_json() for e in self.log]}


def _fmt1(v) -> str:
    return "[" + ", ".join(f"{a:g}" for a in v) + "]"


def _fmt(m) -> str:
    rows = [tuple(r) for r in m]
    if len(set(rows)) == 1:
        return _fmt1(m[0]) + (" (every model)" if len(m) > 1 else "")
    return "; ".join(_fmt1(r) for r in m)


# ---------------------------------------------------------------------------------------------
# Scores and objectives


def last_number(text: str, cmd: str) -> float:
    found = _NUMBER.findall(text)
    if not found:
        raise UsageError(f"evaluation command printed no number: {cmd}")
    return float(found[-1])


def run_commands(cmds: list[str], model_dir: str) -> list[float]:
    """Run each command with {model} replaced; return the raw scores."""
    scores = []
    for cmd in cmds:
        full = cmd.replace("{model}", shlex.quote(model_dir))
        res = subprocess.run(full, shell=True, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            raise UsageError(f"evaluation command failed (exit {res.returncode}): {full}: {tail[0]}")
        scores.append(last_number(res.stdout, full))
    return scores


def objective_value(scores: list[float], dense: list[float] | None = None, objective: str = "geomean") -> float:
    """Combine raw scores: ratio to the dense score (1 if not given), then mean, geomean or min.

    With one score all three are that ratio. `geomean` floors every ratio at GEOMEAN_FLOOR, so a
    task scoring 0 weighs like one scoring 1 % of its dense score instead of zeroing the objective."""
    refs = dense or [1.0] * len(scores)
    if len(refs) != len(scores):
        raise UsageError(f"--dense-score given {len(refs)} times for {len(scores)} evaluation commands")
    ratios = [s / r for s, r in zip(scores, refs)]
    if len(ratios) == 1:
        return ratios[0]
    if objective == "mean":
        return math.fsum(ratios) / len(ratios)
    if objective == "min":
        return min(ratios)
    if objective == "geomean":
        return math.exp(math.fsum(math.log(max(x, GEOMEAN_FLOOR)) for x in ratios) / len(ratios))
    raise UsageError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def evaluate(cmds: list[str], model_dir: str, dense: list[float] | None,
             objective: str = "geomean") -> tuple[float, list[float]]:
    """Run the commands on a model folder; return (objective, raw scores)."""
    scores = run_commands(cmds, model_dir)
    return objective_value(scores, dense, objective), scores


def kept_index(values: list[float], min_gain: float) -> int:
    """The incumbent after a sequence of objective values: the first (the start) until a value
    beats the incumbent by more than `min_gain`, which then becomes the incumbent."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best] + min_gain + _EPS:
            best = i
    return best


# ---------------------------------------------------------------------------------------------
# Strategies: each calls objective(factors) with a K x L matrix and stops on OutOfBudget


class OutOfBudget(Exception):
    """Raised by the objective when a new point is asked for and `max_evals` are spent."""


def greedy_ascent(objective, start: list[float], step: float, max_evals: int = 100,
                  min_gain: float = 0.0) -> tuple[list[float], float, list]:
    """Coordinate ascent as in the reference, with rejected probes reverted (quirk Q11 fixed).
    A probe is accepted when it beats the current best by more than `min_gain` (0: the reference)."""
    seen: dict[tuple, float] = {}
    log = []

    def f(alpha):
        key = tuple(round(a, 6) for a in alpha)
        if key not in seen:
            if len(seen) >= max_evals:
                raise OutOfBudget
            seen[key] = objective(list(key))
            log.append({"amplification": list(key), "score": seen[key]})
        return seen[key]

    alpha = [round(a, 6) for a in start]
    try:
        best = f(alpha)
    except OutOfBudget:
        return alpha, -math.inf, log
    for j in range(len(alpha)):
        while True:
            probe = list(alpha)
            probe[j] = 1.0 if alpha[j] < step - 1e-9 else round(alpha[j] + step, 6)
            try:
                score = f(probe)
            except OutOfBudget:
                return alpha, best, log
            if score > best + min_gain + (_EPS if min_gain else 0.0):
                alpha, best = probe, score
            else:
                break
    return alpha, best, log


def tpe_search(objective, start: list[list[float]], step: float, max_factor: float, seed: int) -> None:
    """Per-model factors in [0, max_factor] on a grid of `step`, by optuna's seeded multivariate
    TPE sampler through ask/tell. The start is evaluated first; then a few random points (startup)
    and TPE's proposals until the objective raises OutOfBudget. Deterministic for a seed and a
    history of objective values, which is what lets --resume replay a log."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    k, n_rates = len(start), len(start[0])
    names = [f"m{i}_a{j}" for i in range(k) for j in range(n_rates)]
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=TPE_STARTUP)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    grid_top = math.floor(max_factor / step + 1e-9) * step
    high = max(grid_top, max(max(r) for r in start))
    study.enqueue_trial({n: start[i][j] for n, (i, j) in zip(names, _cells(k, n_rates))}, skip_if_exists=False)
    proposals = 0
    while True:
        proposals += 1
        if proposals > 50 * (k * n_rates + 10):  # the grid is (nearly) exhausted: stop asking
            return
        trial = study.ask()
        x = [trial.suggest_float(n, 0.0, high) for n in names]
        if proposals > 1:  # the start is evaluated as given; proposals are snapped to the grid
            x = [min(max(round(round(v / step) * step, 6), 0.0), grid_top) for v in x]
        matrix = [x[i * n_rates:(i + 1) * n_rates] for i in range(k)]
        try:
            value = objective(matrix)
        except OutOfBudget:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        study.tell(trial, value)


TPE_STARTUP = 4  # random proposals before TPE models the history (the start is evaluated before them)


def _cells(k, n_rates):
    return [(i, j) for i in range(k) for j in range(n_rates)]


# ---------------------------------------------------------------------------------------------
# Start factors and candidate configs


def parse_start(text: str | None) -> list[list[float]] | None:
    """'1.8,0.0' (one vector, every fine-tune) or '1.8,0.0;1.5,0.5' (one vector per fine-tune)."""
    if text is None or not str(text).strip():
        return None
    try:
        rows = [[float(x) for x in part.split(",")] for part in str(text).split(";")]
    except ValueError:
        raise UsageError(f"--start {text!r}: give comma-separated factors like 1.8,0.0, or one vector per "
                         "fine-tune separated by ';' like 1.8,0.0;1.5,0.5") from None
    if any(not math.isfinite(a) or a < 0 for r in rows for a in r):
        raise UsageError(f"--start {text!r}: factors must be finite and >= 0")
    return rows


def with_factors(cfg: MergeConfig, factors: list[list[float]], shared: bool) -> MergeConfig:
    """The config with the factors set: `parameters.amplification` when shared (one vector for
    every fine-tune), else `amplification` under each model's parameters."""
    data = yaml.safe_load(cfg.text)
    data["parameters"] = dict(data.get("parameters") or {})
    data["parameters"].pop("amplification", None)
    if shared:
        data["parameters"]["amplification"] = list(factors[0])
    if not data["parameters"]:
        del data["parameters"]
    base = _norm(cfg.base_model) if cfg.base_model else None
    entries = []
    for i, m in enumerate(data.get("models") or []):
        entry = {"model": m} if isinstance(m, str) else m
        data["models"][i] = entry
        if base and _norm(entry["model"]) == base:
            continue  # the base listed among the models: not a fine-tune
        entries.append(entry)
    for entry, row in zip(entries, factors):
        params = dict(entry.get("parameters") or {})
        params.pop("amplification", None)
        if not shared:
            params["amplification"] = list(row)
        if params:
            entry["parameters"] = params
        else:
            entry.pop("parameters", None)
    return parse_config(yaml.safe_dump(data, sort_keys=False), cfg.source)


def with_amplification(cfg: MergeConfig, alpha: list[float]) -> MergeConfig:
    """The config with one shared `parameters.amplification` vector (the reference strategy)."""
    return with_factors(cfg, [alpha] * len(cfg.models), True)


# ---------------------------------------------------------------------------------------------
# The search log


class SearchLog:
    """OUT.search/search_log.jsonl: a header naming the search, then one line per evaluation.

    The header is written atomically (temporary file, fsync, rename); each evaluation is appended
    and fsynced, so a crash loses at most the evaluation in progress."""

    def __init__(self, path: str, header: dict, resume: bool):
        self.path = path
        self.logged: dict[tuple, dict] = {}
        if resume and os.path.exists(path):
            first, rows = _read_log(path)
            if first is None or first.get("identity") != header["identity"]:
                raise OutputError(f"{path}: was made with another config, other inputs, another --seed, --strategy or "
                                  "--eval-cmd; remove it or run without --resume")
            for row in rows:
                self.logged.setdefault(_key(row["factors"]), row)
            self._rewrite(first, rows)  # drops a torn last line
        else:
            self._rewrite(header, [])
        self._f = open(path, "a")

    def _rewrite(self, header: dict, rows: list) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for row in [header] + rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def append(self, ev: Evaluation) -> None:
        row = ev.to_json()
        del row["replayed"]
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _read_log(path: str):
    header, rows = None, []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.endswith("\n"):
                break  # torn by a crash
            try:
                row = json.loads(line)
            except ValueError:
                break
            if i == 0:
                header = row if isinstance(row, dict) and "identity" in row else None
                if header is None:
                    return None, []
            elif isinstance(row, dict) and "factors" in row and "scores" in row:
                rows.append(row)
    return header, rows


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key(factors) -> tuple:
    return tuple(tuple(round(float(a), 6) for a in row) for row in factors)


# ---------------------------------------------------------------------------------------------
# The search, end to end


def search(cfg: MergeConfig, out: str, eval_cmds: list[str], opts: MergeOptions | None = None, start=None,
           step: float = 0.1, dense: list[float] | None = None, max_evals: int = 100, echo=print,
           strategy: str = "tpe", objective: str = "geomean", min_gain: float | None = None,
           max_factor: float = DEFAULT_MAX_FACTOR, resume: bool = False) -> SearchResult:
    """Search the DPA factors of a dppa config on `eval_cmds`; publish the kept model to `out`.

    `start`: None (the config's factors), one vector (every fine-tune) or a K x L matrix.
    `opts.seed` seeds the optimiser (and DARE-like randomness; DPPA has none)."""
    if cfg.merge_method != "dppa":
        raise UsageError(f"{cfg.source}: search tunes DPA factors; merge_method must be dppa, not {cfg.merge_method!r}")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not eval_cmds:
        raise UsageError("give at least one --eval-cmd 'COMMAND {model}'")
    if dense and len(dense) != len(eval_cmds):
        raise UsageError(f"--dense-score given {len(dense)} times for {len(eval_cmds)} --eval-cmd")
    if dense and any(not (d > 0) for d in dense):
        raise UsageError(f"--dense-score must be positive (scores are divided by it), got {dense}")
    if not (step > 0 and math.isfinite(step)):
        raise UsageError(f"--step must be positive, got {step}")
    if max_evals < 1:
        raise UsageError(f"--max-evals must be at least 1, got {max_evals}")
    min_gain = DEFAULT_MIN_GAIN[strategy] if min_gain is None else min_gain
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise UsageError(f"--min-gain must be >= 0, got {min_gain}")
    if not (max_factor > 0 and math.isfinite(max_factor)):
        raise UsageError(f"--max-factor must be positive, got {max_factor}")
    if isinstance(start, str):
        start = parse_start(start)
    elif start is not None and start and not isinstance(start[0], (list, tuple)):
        start = [list(start)]
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = time.perf_counter()
    work = out + ".search"
    with session(cfg, opts, out) as s:
        method = s.method
        k, n_rates = len(method.mparams), len(method.rates)
        start = _start_matrix(start, [method.factors(m) for m in method.mparams], k, n_rates, method.rates, strategy)
        shared = strategy == "reference"
        fp = fingerprint(cfg, s.inputs, opts.seed, opts.shard_size)
        identity = hashlib.sha256(json.dumps([fp, strategy, list(eval_cmds), list(dense or [])]).encode()).hexdigest()
        # pass-1 statistics persist in OUT.search/stats.zarr: computed once, for every candidate and re-run
        stamp = os.path.join(work, "fingerprint")
        if os.path.exists(work) and (not os.path.isfile(stamp) or open(stamp).read() != fp):
            if resume and os.path.isfile(os.path.join(work, LOG_NAME)):
                raise OutputError(f"{os.path.join(work, LOG_NAME)}: was made with another config, other inputs or "
                                  "another --seed; remove it or run without --resume")
            shutil.rmtree(work)
        os.makedirs(work, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(fp)
        for leftover in os.listdir(work):
            if leftover.startswith("cand-"):
                shutil.rmtree(os.path.join(work, leftover))
        header = {"identity": identity, "strategy": strategy, "seed": opts.seed, "eval_cmds": list(eval_cmds),
                  "dense_scores": list(dense or []), "config": cfg.source, "created": time.time()}
        slog = SearchLog(os.path.join(work, LOG_NAME), header, resume)
        engine = s.engine(StatsStore(os.path.join(work, "stats.zarr")))
        evals: list[Evaluation] = []
        memo: dict[tuple, Evaluation] = {}
        best_dir = os.path.join(work, "best")
        best_json = os.path.join(work, "best.json")

        def write(factors, folder):
            from .merge_pass import write_output

            cand_cfg = with_factors(cfg, factors, shared)
            cand = dataclasses.replace(s, cfg=cand_cfg, method=cand_cfg.method(opts.seed))
            plan = cand.plan(engine)  # pass 1 ran for the first candidate; later plans read the store
            prepare_partial(folder + ".partial", "", False, True, {})
            write_output(cand_cfg, folder, cand, plan.tensors, set(), opts.shard_size)
            publish(folder + ".partial", folder)

        def keep(folder, factors):
            if os.path.exists(best_json):
                os.unlink(best_json)
            if os.path.exists(best_dir):
                shutil.rmtree(best_dir)
            os.rename(folder, best_dir)
            with open(best_json, "w") as f:
                json.dump({"factors": factors}, f)

        def f(factors):
            key = _key(factors)
            if key in memo:
                return memo[key].objective
            if len(evals) >= max_evals:
                raise OutOfBudget
            factors = [list(r) for r in key]
            row = slog.logged.get(key)
            if row is not None:  # --resume: evaluated by the interrupted run
                ev = Evaluation(len(evals) + 1, factors, row["scores"], objective_value(row["scores"], dense, objective),
                                row.get("seconds", 0.0), replayed=True)
                echo(f"evaluation {ev.n}/{max_evals}: {_fmt(factors)}: objective {ev.objective:.6g} (from the log)")
            else:
                t = time.perf_counter()
                cand = os.path.join(work, f"cand-{len(evals) + 1}")
                write(factors, cand)
                scores = run_commands(eval_cmds, cand)
                ev = Evaluation(len(evals) + 1, factors, scores, objective_value(scores, dense, objective),
                                time.perf_counter() - t)
                slog.append(ev)
                raw = f" (scores {', '.join(f'{x:g}' for x in scores)})" if len(scores) > 1 or dense else ""
                echo(f"evaluation {ev.n}/{max_evals}: {_fmt(factors)}: objective {ev.objective:.6g}{raw}")
                incumbent = kept_index([e.objective for e in evals + [ev]], min_gain)
                if incumbent == len(evals):
                    keep(cand, factors)
                else:
                    shutil.rmtree(cand, ignore_errors=True)
            evals.append(ev)
            memo[key] = ev
            return ev.objective

        try:
            if strategy == "reference":
                greedy_ascent(lambda a: f([a] * k), start[0], step, max_evals, min_gain)
            else:
                tpe_search(f, start, step, max_factor, opts.seed)
        finally:
            slog.close()
        kept = evals[kept_index([e.objective for e in evals], min_gain)]
        saved = json.load(open(best_json)) if os.path.isfile(best_json) and os.path.isdir(best_dir) else None
        if saved is None or _key(saved["factors"]) != _key(kept.factors):  # e.g. resumed after the last evaluation
            if os.path.exists(best_dir):
                shutil.rmtree(best_dir)
            write(kept.factors, best_dir)
    check_output(out, s.inputs, opts.overwrite)
    publish(best_dir, out)
    result = SearchResult(out, strategy, objective, min_gain, evals[0].factors, evals[0].objective, kept.factors,
                          kept.objective, kept.n, kept.n != 1, [m.path for m in cfg.models], evals,
                          time.perf_counter() - t0)
    _write_reports(result, out, step, max_evals, max_factor, eval_cmds, dense, opts.seed)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _start_matrix(start, config_factors, k, n_rates, rates, strategy) -> list[list[float]]:
    if start is None:
        start = config_factors
        if strategy == "reference" and len({tuple(r) for r in start}) > 1:
            raise UsageError("the reference strategy shares one factor vector across fine-tunes, but the config sets "
                             "different amplification per model; pass --start A,B")
    if len(start) == 1:
        start = [list(start[0]) for _ in range(k)]
    if len(start) != k:
        raise UsageError(f"--start gives {len(start)} factor vectors for {k} fine-tunes; give one vector (shared) "
                         "or one per fine-tune separated by ';'")
    for row in start:
        if len(row) != n_rates:
            raise UsageError(f"--start needs {n_rates} factors per vector, one per pruning rate {rates}")
    if strategy == "reference" and len({tuple(r) for r in start}) > 1:
        raise UsageError("--strategy reference shares one factor vector across fine-tunes; give --start as one vector")
    return [[float(a) for a in row] for row in start]


def _write_reports(res: SearchResult, out: str, step, max_evals, max_factor, eval_cmds, dense, seed) -> None:
    data = res.to_json()
    data.update(step=step, max_evals=max_evals, max_factor=max_factor, seed=seed, eval_cmds=eval_cmds,
                dense_scores=dense)
    with open(os.path.join(out, "search_log.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(out, "search_log.md"), "w") as f:
        f.write("# Factor search\n\n```\n" + res.report() + "\n```\n\n")
        f.write("| # | factors (per fine-tune) | scores | objective | seconds |\n|---|---|---|---|---|\n")
        for e in res.log:
            mark = " **kept**" if e.n == res.best_index else (" (start)" if e.n == 1 else "")
            f.write(f"| {e.n} | {_fmt(e.factors)} | {', '.join(f'{x:g}' for x in e.scores)} | "
                    f"{e.objective:.6g}{mark} | {e.seconds:.1f}{' (log)' if e.replayed else ''} |\n")
