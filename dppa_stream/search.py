"""`dppa-stream search`: choose DPPA's merge parameters on a validation score.

What is searched (`tune`, combinable): `factors` (default), `rates`, `lamda`, `weight`.
- Factors are searched as what DPA does with them: an element first kept at level j is multiplied
  by max(alpha_j ... alpha_K), so the *effective* factor of each partition is non-increasing from
  the top partition down and [0.9, 1.5] is the same model as [1.5, 1.5]. Every candidate is held,
  logged and reported by its effective parameters, one vector per fine-tune.
- Rates: DP's pruning rates (one per partition, strictly decreasing, on a RATE_STEP grid). Every
  candidate is planned from the same pass-1 statistics (histograms and signals do not depend on
  the rates or lambda), so a candidate costs one plan (milliseconds; `semantics: exact` adds one
  read to refine its boundaries) and one pass 2.
- Lambda (`lamda`, LAMDA_STEP grid) and per-fine-tune `weight` (WEIGHT_STEP grid). With `combine:
  sum` or `mean` a weight only scales its model's factors, so `factors` and `weight` together are
  refused (one direction searched twice).

No model is evaluated twice: a candidate is keyed by a digest of its plan (every tensor's
thresholds, band factors and weights: what decides the merged weights), so a proposal that
lands on a model already evaluated, under any parameters, gets that model's score back without
a merge or an evaluation and without spending the budget.

Strategies, all under one budget of evaluations (`max_evals`):
- `refine` (default): the reference walk below, then a compass search in the tuned space: every
  coordinate (each fine-tune's own factors, the rates, lambda, the weights) one grid step up and
  down, following a move while it improves; when no move improves, the steps double. It makes the
  walk's moves first, so it keeps what the walk finds, and can then go where the walk cannot
  (down, per fine-tune, other parameters). Chosen on benchmarks/quality (README there).
- `reference`: the authors' greedy walk (`python_contral.py`; docs/dppa.md, step 4): one
  factor vector shared by every fine-tune, from the start, one coordinate at a time in +`step`
  moves while the objective improves; a coordinate below one step starts its walk at 1.0. Quirk
  Q11 is fixed: a probe that does not improve is reverted.
- `tpe`, `cmaes`: optuna's seeded samplers (multivariate TPE; CMA-ES, what mergekit-evolve uses)
  on a unit cube that maps one-to-one onto the valid space (top factor and ratios between
  consecutive effective factors; top rate and fractions of the room below), snapped to the grids.

Objective: the scores (last number each `--eval-cmd` prints), each divided by its `--dense-score`
(1 when not given), combined by `mean`, `geomean` or `min` (`objective_value` says how a zero is
treated). Noise margin: a candidate replaces the incumbent (the start, at first) only when it
beats it by more than `min_gain` *in score units*: its objective must exceed the one the
incumbent would have with every score raised by `min_gain`. The model kept is the last incumbent.

Work folder OUT.search/: `stats.zarr` (pass 1, computed once), `search_log.jsonl` (a header, then
one line per evaluation: parameters, plan digest, raw scores, times; appended and fsynced),
`best/` (the incumbent's model) and `best.json`. `resume=True` replays a log: an interrupted
search from OUT.search, a finished one from OUT/search_log.jsonl (then a larger `max_evals`
extends it and OUT is replaced by the new kept model). Logged models are never evaluated again;
the strategies are deterministic for a seed and a history, so a replay proposes the same points.
Tune on a validation split: the reference tuned on the test sets it reported (quirk Q12).
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
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field

import yaml

from .config import MergeConfig, _norm, parse_config
from .durable import write_atomic
from .errors import OutputError, UsageError
from .methods.dppa import effective_factors
from .output import check_output, fingerprint, prepare_partial, publish
from .pipeline import MergeOptions, session
from .stats_store import StatsStore

STRATEGIES = ("refine", "reference", "tpe", "cmaes")
TUNABLE = ("factors", "rates", "lamda", "weight")
OBJECTIVES = ("mean", "geomean", "min")
DEFAULT_MIN_GAIN = {"refine": 0.0, "reference": 0.0, "tpe": 0.01, "cmaes": 0.01}
DEFAULT_MAX_FACTOR = 4.0
RATE_STEP, RATE_MAX = 0.05, 0.95  # pruning rates searched on this grid, in [0, RATE_MAX]
LAMDA_STEP, LAMDA_MAX = 0.01, 0.3
WEIGHT_STEP = 0.05  # weights in [0, max(1, twice the start's)]
GEOMEAN_FLOOR = 0.01  # geomean: a ratio below 1 % of the dense score counts as 1 %
LOG_NAME = "search_log.jsonl"
_EPS = 1e-9  # "beats by more than X" is decided as gain > X + _EPS (0.53 - 0.52 is 0.010000000000000009)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _r(x: float) -> float:
    """Grid values are kept rounded to 6 decimals (0.1 + 0.2 is 0.3 here)."""
    return round(float(x), 6) + 0.0


# ---------------------------------------------------------------------------------------------
# Candidates and the space they live in


@dataclass(frozen=True)
class Params:
    """One candidate's merge parameters: pruning rates, effective factors (one non-increasing
    vector per fine-tune), lambda and per-fine-tune weights."""

    rates: tuple
    factors: tuple  # K x L
    lamda: float
    weights: tuple

    @classmethod
    def make(cls, rates, factors, lamda, weights) -> "Params":
        return cls(tuple(_r(s) for s in rates), tuple(tuple(_r(a) for a in effective_factors(list(row))) for row in factors),
                   _r(lamda), tuple(_r(w) for w in weights))

    def to_json(self) -> dict:
        return {"rates": list(self.rates), "factors": [list(r) for r in self.factors], "lamda": self.lamda,
                "weights": list(self.weights)}

    @classmethod
    def from_json(cls, d: dict) -> "Params":
        return cls.make(d["rates"], d["factors"], d["lamda"], d["weights"])

    @property
    def shared(self) -> bool:
        return len(set(self.factors)) == 1


@dataclass(frozen=True)
class Coord:
    kind: str  # factor | rate | lamda | weight
    model: int  # factor, weight: the fine-tune
    level: int  # factor, rate: the partition
    step: float
    hi: float  # every coordinate's range is [0, hi]

    @property
    def name(self) -> str:
        return {"factor": f"m{self.model}_a{self.level}", "rate": f"s{self.level}", "lamda": "lamda",
                "weight": f"m{self.model}_w"}[self.kind]


class Space:
    """The tuned coordinates around a start; points are tuples of coordinate values."""

    def __init__(self, tune, start: Params, step: float, max_factor: float):
        self.start, self.tune = start, tuple(t for t in TUNABLE if t in tune)
        k, n = len(start.factors), len(start.rates)
        self.coords: list[Coord] = []
        if "factors" in tune:
            hi = max(_r(math.floor(max_factor / step + 1e-9) * step), *(a for row in start.factors for a in row))
            self.coords += [Coord("factor", i, j, step, hi) for i in range(k) for j in range(n)]
        if "rates" in tune:
            self.coords += [Coord("rate", -1, j, RATE_STEP, max(RATE_MAX, start.rates[0])) for j in range(n)]
        if "lamda" in tune:
            self.coords.append(Coord("lamda", -1, -1, LAMDA_STEP, max(LAMDA_MAX, start.lamda)))
        if "weight" in tune:
            hi = max(1.0, 2 * max(start.weights))
            self.coords += [Coord("weight", i, -1, WEIGHT_STEP, hi) for i in range(k)]

    def point(self, p: Params) -> tuple:
        return tuple(self._get(p, c) for c in self.coords)

    @staticmethod
    def _get(p: Params, c: Coord) -> float:
        if c.kind == "factor":
            return p.factors[c.model][c.level]
        if c.kind == "rate":
            return p.rates[c.level]
        return p.lamda if c.kind == "lamda" else p.weights[c.model]

    def params(self, x) -> Params:
        s = self.start
        factors = [list(r) for r in s.factors]
        rates, lamda, weights = list(s.rates), s.lamda, list(s.weights)
        for c, v in zip(self.coords, x):
            if c.kind == "factor":
                factors[c.model][c.level] = v
            elif c.kind == "rate":
                rates[c.level] = v
            elif c.kind == "lamda":
                lamda = v
            else:
                weights[c.model] = v
        return Params.make(rates, factors, lamda, weights)

    def move(self, x: tuple, i: int, steps: int) -> tuple | None:
        """Coordinate i moved by `steps` grid steps, its neighbours pushed along where the move
        would break the order (a top factor lowered below the next lowers it too; a rate raised
        into the one above raises that one). None if that leaves the space."""
        c = self.coords[i]
        y = list(x)
        y[i] = _r(x[i] + steps * c.step)
        if not 0 <= y[i] <= c.hi:
            return None
        for o, d in enumerate(self.coords):
            if o == i or d.kind != c.kind or d.model != c.model or d.level < 0:
                continue
            gap = (d.level - c.level) * (RATE_STEP if c.kind == "rate" else 0.0)
            if d.level < c.level:  # above: must stay >= (factors) or > (rates)
                y[o] = max(y[o], _r(y[i] - gap))
            else:
                y[o] = min(y[o], _r(y[i] - gap))
            if not 0 <= y[o] <= d.hi:
                return None
        return tuple(y) if tuple(y) != tuple(x) else None

    # -- the unit cube of the box samplers: one-to-one onto valid points, snapped to the grids --
    def encode(self, p: Params) -> list[float]:
        u = []
        for c in self.coords:
            v = self._get(p, c)
            if c.kind in ("factor", "rate") and c.level > 0:
                above = self._get(p, dataclasses.replace(c, level=c.level - 1))
                room = above - (RATE_STEP if c.kind == "rate" else 0.0)
                u.append(v / room if room > 0 else 0.0)
            elif c.kind == "rate":
                low = (len(p.rates) - 1) * RATE_STEP
                u.append((v - low) / (c.hi - low) if c.hi > low else 0.0)
            else:
                u.append(v / c.hi)
        return [min(1.0, max(0.0, a)) for a in u]

    def decode(self, u) -> Params:
        x = []
        for c, a in zip(self.coords, u):
            if c.kind in ("factor", "rate") and c.level > 0:
                above = x[-1]  # the coordinate before is the same model's level above
                room = above - (RATE_STEP if c.kind == "rate" else 0.0)
                x.append(_r(math.floor(a * room / c.step + 1e-9) * c.step) if room > 0 else 0.0)
            elif c.kind == "rate":
                low = (len(self.start.rates) - 1) * RATE_STEP
                x.append(min(c.hi, _r(low + round(a * (c.hi - low) / c.step) * c.step)))
            else:
                x.append(min(c.hi, _r(round(a * c.hi / c.step) * c.step)))
        return self.params(x)


def plan_digest(tensors: dict) -> str:
    """What decides the merged weights: every tensor's plan (thresholds, band factors, weights).
    Which unit a kept tie falls in depends on the unit size, not on the model, so it is left out."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        seg = tensors[name]
        parts = tuple((span, tuple(dataclasses.replace(sp, tie_starts=()) for sp in sparse)) for span, sparse in seg.parts)
        h.update(repr((name, parts, seg.weights, seg.normalize, seg.lam)).encode())
    return h.hexdigest()


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
    """Combine raw scores: each divided by its dense score (1 if not given), then:
    `mean` of the ratios (a zero counts as zero); `min` (a zero makes the objective zero);
    `geomean`: exp of the mean log ratio, each ratio first floored at GEOMEAN_FLOOR, so a score
    of 0, or anything below 1 % of its dense score (negative scores too), counts as exactly 1 %
    instead of zeroing the product. With one score all three are that ratio (unfloored)."""
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


@dataclass(frozen=True)
class Judge:
    """Turns raw scores into the objective and decides "beats by more than the margin"."""

    dense: list | None = None
    objective: str = "geomean"
    min_gain: float = 0.0

    def value(self, scores) -> float:
        return objective_value(list(scores), self.dense, self.objective)

    def beats(self, a, b) -> bool:
        """Scores `a` beat `b` by more than min_gain per score: a's objective exceeds the one b
        would have with every score raised by min_gain (so the margin means the same in every
        objective and near the geomean floor: one example of a 100-example set is 0.01)."""
        return self.value(a) > self.value([s + self.min_gain for s in b]) + _EPS


class Incumbent:
    """The model kept: the first evaluation (the start) until one beats it by more than the
    margin, which then becomes the incumbent; offered every evaluation in the order made."""

    def __init__(self, judge: Judge):
        self.judge, self.ev = judge, None

    def offer(self, ev) -> bool:
        """True when `ev` becomes the incumbent."""
        if self.ev is None or self.judge.beats(ev.scores, self.ev.scores):
            self.ev = ev
            return True
        return False


# ---------------------------------------------------------------------------------------------
# Strategies. Each calls f(params) -> Evaluation (answered from memory for a model already
# evaluated) and beats(a, b) on two evaluations; f raises OutOfBudget when a new model is asked
# for and the budget is spent, which ends the search.


class OutOfBudget(Exception):
    pass


def walk(f, beats, start: Params, step: float):
    """The reference's coordinate ascent on one factor vector shared by every fine-tune, with
    rejected probes reverted (quirk Q11 fixed). Moves are made on the raw vector, as the
    reference does; f sees the effective parameters. Returns the incumbent evaluation."""
    def shared(a):
        return Params.make(start.rates, [a] * len(start.factors), start.lamda, start.weights)

    alpha = list(start.factors[0])
    best = f(shared(alpha))
    for j in range(len(alpha)):
        while True:
            probe = list(alpha)
            probe[j] = 1.0 if alpha[j] < step - 1e-9 else _r(alpha[j] + step)
            ev = f(shared(probe))
            if beats(ev, best):
                alpha, best = probe, ev
            else:
                break
    return best


def compass(f, beats, space: Space, incumbent):
    """Compass search on the grid from an evaluated point: each coordinate one step up, then
    down, following a move while it beats the incumbent; a sweep without a gain doubles the
    step, a sweep with one resets it. Ends when every move leaves the space."""
    x, mult = space.point(incumbent.params), 1
    while True:
        moved = improved = False
        for i in range(len(space.coords)):
            for sign in (1, -1):
                y = space.move(x, i, sign * mult)
                if y is None:
                    continue
                moved = True
                ev = f(space.params(y))
                if not beats(ev, incumbent):
                    continue
                x, incumbent, improved = y, ev, True
                while (y := space.move(x, i, sign * mult)) is not None:
                    ev = f(space.params(y))
                    if not beats(ev, incumbent):
                        break
                    x, incumbent = y, ev
                break
        if not moved:
            return incumbent
        mult = 1 if improved else 2 * mult


def refine(f, beats, space: Space, start: Params, step: float) -> None:
    """The reference walk (when factors are tuned and shared at the start), then compass search
    from its incumbent over every tuned coordinate."""
    if "factors" in space.tune and start.shared:
        best = walk(f, beats, start, step)
    else:
        best = f(start)
    compass(f, beats, space, best)


def sampler_search(f, space: Space, start: Params, sampler_name: str, seed: int) -> None:
    """optuna's TPE or CMA-ES through ask/tell on the unit cube `Space.decode` maps onto valid,
    snapped points. The start is evaluated as given and told first. Deterministic for a seed and a
    history of values, which is what lets --resume replay a log. optuna is imported only here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [c.name for c in space.coords]
    dists = {n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in names}
    x0 = dict(zip(names, space.encode(start)))
    if sampler_name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=SAMPLER_STARTUP)
    else:
        with warnings.catch_warnings():  # x0 and sigma0 are deprecated since optuna 4.9 (removal planned for 6)
            warnings.simplefilter("ignore", FutureWarning)
            sampler = optuna.samplers.CmaEsSampler(x0=x0, sigma0=CMAES_SIGMA0, seed=seed, n_startup_trials=0,
                                                   warn_independent_sampling=False)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.add_trial(optuna.trial.create_trial(params=x0, distributions=dists, value=f(start).objective))
    for _ in range(50 * (len(names) + 10)):  # beyond this the grid is (nearly) exhausted
        trial = study.ask()
        u = [trial.suggest_float(n, 0.0, 1.0) for n in names]
        try:
            value = f(space.decode(u)).objective
        except OutOfBudget:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)


SAMPLER_STARTUP = 4  # TPE: random proposals before it models the history (after the start)
CMAES_SIGMA0 = 0.2  # CMA-ES: initial step, as a share of each coordinate's range


# ---------------------------------------------------------------------------------------------
# Options and candidate configs


def parse_tune(text) -> tuple:
    """'factors', 'rates,lamda', ... (comma-separated, any order)."""
    items = [t.strip() for t in (text if isinstance(text, (list, tuple)) else str(text).split(",")) if t.strip()]
    bad = [t for t in items if t not in TUNABLE]
    if bad or not items:
        raise UsageError(f"--tune {','.join(items) or text!r}: choose one or more of {', '.join(TUNABLE)}, "
                         "comma-separated")
    return tuple(t for t in TUNABLE if t in items)


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


def with_params(cfg: MergeConfig, p: Params, tune=("factors",)) -> MergeConfig:
    """The config with a candidate's parameters written in: the factors once under `parameters`
    when every fine-tune has the same, else under each model; rates, lamda and weights only
    when tuned (otherwise the config's own values stand)."""
    data = yaml.safe_load(cfg.text)
    glob = dict(data.get("parameters") or {})
    glob.pop("amplification", None)
    if p.shared:
        glob["amplification"] = list(p.factors[0])
    if "rates" in tune:
        glob["pruning_rates"] = list(p.rates)
    if "lamda" in tune:
        glob["lamda"] = p.lamda
    data["parameters"] = glob
    if not glob:
        del data["parameters"]
    base = _norm(cfg.base_model) if cfg.base_model else None
    entries = []
    for i, m in enumerate(data.get("models") or []):
        entry = {"model": m} if isinstance(m, str) else m
        data["models"][i] = entry
        if base and _norm(entry["model"]) == base:
            continue  # the base listed among the models: not a fine-tune
        entries.append(entry)
    for i, entry in enumerate(entries[:len(p.factors)]):
        params = dict(entry.get("parameters") or {})
        params.pop("amplification", None)
        if not p.shared:
            params["amplification"] = list(p.factors[i])
        if "weight" in tune:
            params["weight"] = p.weights[i]
        if params:
            entry["parameters"] = params
        else:
            entry.pop("parameters", None)
    return parse_config(yaml.safe_dump(data, sort_keys=False), cfg.source)


def _start_params(cfg: MergeConfig, method, start, strategy: str, tune) -> Params:
    k, n_rates = len(method.mparams), len(method.rates)
    factors = start if start is not None else [method.factors(m) for m in method.mparams]
    if len(factors) == 1:
        factors = [list(factors[0]) for _ in range(k)]
    if len(factors) != k:
        raise UsageError(f"--start gives {len(factors)} factor vectors for {k} fine-tunes; give one vector (shared) "
                         "or one per fine-tune separated by ';'")
    for row in factors:
        if len(row) != n_rates:
            raise UsageError(f"--start needs {n_rates} factors per vector, one per pruning rate {method.rates}")
    if strategy == "reference" and len({tuple(effective_factors(list(r))) for r in factors}) > 1:
        raise UsageError("--strategy reference shares one factor vector across fine-tunes, but the start gives "
                         "different factors per model; pass --start A,B")
    weights = []
    for m in cfg.models:
        w = m.params.get("weight", cfg.parameters.get("weight", 1.0))
        if "weight" in tune and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise UsageError(f"{cfg.source}: --tune weight needs one number per model, but {m.path} has weight {w!r}")
        weights.append(float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else 1.0)
    return Params.make(method.rates, factors, method.params["lamda"], weights)


def merge_command(cfg: MergeConfig, out: str) -> str:
    """The command that merges the kept settings again (OUT/dppa_stream_config.yml); paths in a
    config are read relative to the working folder, so it starts with a cd when one is relative."""
    data = yaml.safe_load(cfg.text) or {}
    paths = [data.get("base_model")] + [m if isinstance(m, str) else (m or {}).get("model")
                                        for m in data.get("models") or []]
    cmd = (f"dppa-stream merge {shlex.quote(os.path.join(out, 'dppa_stream_config.yml'))} "
           f"{shlex.quote(out + '-merged')}")
    if any(isinstance(p, str) and not os.path.isabs(os.path.expanduser(p)) for p in paths):
        cmd = f"cd {shlex.quote(os.getcwd())} && {cmd}"
    return cmd


# ---------------------------------------------------------------------------------------------
# The log and the result


@dataclass
class Evaluation:
    n: int  # 1-based, in the order evaluated
    params: Params
    digest: str  # of the plan: the identity of the merged model
    scores: list  # raw score per evaluation command
    objective: float
    merge_seconds: float = 0.0  # plan + pass 2
    eval_seconds: float = 0.0  # the evaluation commands
    replayed: bool = False  # taken from the log (--resume), not run again

    @property
    def factors(self) -> list:
        return [list(r) for r in self.params.factors]

    def to_json(self) -> dict:
        return {"n": self.n, **self.params.to_json(), "digest": self.digest, "scores": self.scores,
                "objective": self.objective, "merge_seconds": round(self.merge_seconds, 3),
                "eval_seconds": round(self.eval_seconds, 3), "replayed": self.replayed}


class SearchLog:
    """search_log.jsonl: a header naming the search, then one line per evaluation.

    The header is written atomically (temporary file, fsync, rename); each evaluation is appended
    and fsynced, so a crash loses at most the evaluation in progress."""

    def __init__(self, path: str, header: dict, resume_from: str | None):
        self.path = path
        self.by_digest: dict[str, dict] = {}
        self.by_params: dict[Params, dict] = {}
        if resume_from and os.path.exists(resume_from):
            first, rows = _read_log(resume_from)
            if first is None or first.get("identity") != header["identity"]:
                raise OutputError(f"{resume_from}: was made with another config, other inputs, another --seed, "
                                  "--strategy, --tune or --eval-cmd; remove it or run without --resume")
            for row in rows:
                self.by_digest.setdefault(row["digest"], row)
                self.by_params.setdefault(Params.from_json(row), row)
            self._rewrite(first, rows)  # drops a torn last line
        else:
            self._rewrite(header, [])
        self._f = open(path, "a")

    def _rewrite(self, header: dict, rows: list) -> None:
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in [header] + rows).encode())

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
            elif isinstance(row, dict) and {"digest", "scores", "rates", "factors", "lamda", "weights"} <= set(row):
                rows.append(row)
    return header, rows


@dataclass
class SearchResult:
    out: str
    strategy: str
    tune: tuple
    judge: Judge
    start: Evaluation
    kept: Evaluation
    models: list  # fine-tune paths
    log: list = field(default_factory=list)  # Evaluation
    repeats: int = 0  # proposals that were models already evaluated (answered without a merge)
    pass1_seconds: float = 0.0
    wall_seconds: float = 0.0
    command: str = ""  # merges the kept settings again

    @property
    def beat_start(self) -> bool:
        return self.kept.n != self.start.n

    @property
    def best_amplification(self):
        """As written into the kept model's config: one vector when every fine-tune has the same."""
        return list(self.kept.params.factors[0]) if self.kept.params.shared else self.kept.factors

    def _scores(self, ev: Evaluation) -> str:
        return f" (scores {', '.join(f'{x:g}' for x in ev.scores)})" if len(ev.scores) > 1 else ""

    def _median(self, key: str, fresh: list) -> float:
        return statistics.median(getattr(e, key) for e in fresh) if fresh else 0.0

    def report(self) -> str:
        """The final report (stderr and search_log.md); its last line is a merge command."""
        n, replayed = len(self.log), sum(e.replayed for e in self.log)
        s, k = self.start.params, self.kept.params
        lines = [f"search ({self.strategy}, tuning {', '.join(self.tune)}, objective {self.judge.objective}, "
                 f"min gain {self.judge.min_gain:g}): {n} evaluations"
                 + (f" ({replayed} replayed from the log)" if replayed else "")
                 + (f"; {self.repeats} proposals were models already evaluated (not merged again)" if self.repeats else "")
                 + f" in {self.wall_seconds:.1f}s",
                 f"  start: {_fmt(s.factors)}{_extras(s, self.tune)}, objective {self.start.objective:.6g}"
                 f"{self._scores(self.start)}",
                 f"  kept:  {_fmt(k.factors)}{_extras(k, self.tune)}, objective {self.kept.objective:.6g}"
                 f"{self._scores(self.kept)} (evaluation {self.kept.n}, "
                 f"{self.kept.objective - self.start.objective:+.6g} over the start)",
                 "  (factors are effective: what each partition is multiplied by, from the top partition down)"]
        if self.beat_start:
            for i, (a, b) in enumerate(zip(s.factors, k.factors)):
                name = os.path.basename(self.models[i].rstrip("/")) if i < len(self.models) else str(i)
                extra = f", weight {s.weights[i]:g} -> {k.weights[i]:g}" if "weight" in self.tune else ""
                lines.append(f"  model {i + 1} ({name}): " + (f"unchanged {_fmt1(a)}" if a == b else
                                                               f"{_fmt1(a)} -> {_fmt1(b)}") + extra)
        else:
            top = max(self.log, key=lambda e: e.objective) if self.log else None
            if top is not None and top.objective > self.start.objective:
                lines.append(f"  (the highest objective, {top.objective:.6g} at evaluation {top.n}, is within the margin)")
        fresh = [e for e in self.log if not e.replayed]
        if fresh:
            lines.append(f"  cost per evaluation (median of {len(fresh)}): merge {self._median('merge_seconds', fresh):.2f}s "
                         f"(plan from the stored statistics + pass 2), evaluation commands "
                         f"{self._median('eval_seconds', fresh):.2f}s; pass 1 ran once ({self.pass1_seconds:.1f}s)")
        lines.append(("kept the best candidate" if self.beat_start else
                      f"no candidate beat the start by more than {self.judge.min_gain:g}; kept the start")
                     + f" in {self.out}; its settings are in {os.path.join(self.out, 'dppa_stream_config.yml')}. "
                     "To merge them again (another dtype, shard size, machine):")
        lines.append(self.command)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "tune": list(self.tune), "objective": self.judge.objective,
                "min_gain": self.judge.min_gain, "start": self.start.params.to_json(),
                "kept": self.kept.params.to_json(), "start_factors": self.start.factors,
                "start_score": self.start.objective, "best_factors": self.kept.factors,
                "best_score": self.kept.objective, "best_evaluation": self.kept.n,
                "best_amplification": self.best_amplification, "beat_start": self.beat_start,
                "models": self.models, "evaluations_used": len(self.log), "repeats": self.repeats,
                "pass1_seconds": round(self.pass1_seconds, 3), "wall_seconds": round(self.wall_seconds, 2),
                "merge_command": self.command, "evaluations": [e.to_json() for e in self.log]}


def _fmt1(v) -> str:
    return "[" + ", ".join(f"{a:g}" for a in v) + "]"


def _fmt(m) -> str:
    rows = [tuple(r) for r in m]
    if len(set(rows)) == 1:
        return "factors " + _fmt1(m[0]) + (" (every model)" if len(m) > 1 else "")
    return "factors " + "; ".join(_fmt1(r) for r in m)


def _extras(p: Params, tune) -> str:
    out = ""
    if "rates" in tune:
        out += f", rates {_fmt1(p.rates)}"
    if "lamda" in tune:
        out += f", lamda {p.lamda:g}"
    if "weight" in tune:
        out += f", weights {_fmt1(p.weights)}"
    return out


# ---------------------------------------------------------------------------------------------
# The search, end to end


def search(cfg: MergeConfig, out: str, eval_cmds: list[str], opts: MergeOptions | None = None, start=None,
           step: float = 0.1, dense: list[float] | None = None, max_evals: int = 100, echo=print,
           strategy: str = "refine", objective: str = "geomean", min_gain: float | None = None,
           max_factor: float = DEFAULT_MAX_FACTOR, resume: bool = False, tune=("factors",)) -> SearchResult:
    """Search DPPA's parameters on `eval_cmds`; publish the kept model to `out`.

    `start`: None (the config's factors), one vector (every fine-tune) or a K x L matrix.
    `opts.seed` seeds the optimiser (DPPA itself has no randomness)."""
    tune, min_gain = _check_search(cfg, eval_cmds, step, dense, max_evals, strategy, objective, min_gain, max_factor,
                                   tune)
    start = parse_start(start) if isinstance(start, str) else \
        [list(start)] if start is not None and start and not isinstance(start[0], (list, tuple)) else start
    judge = Judge(list(dense) if dense else None, objective, min_gain)
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = time.perf_counter()
    work = out + ".search"
    log_path, finished_log = os.path.join(work, LOG_NAME), os.path.join(out, LOG_NAME)
    # --resume on a finished search (OUT holds its log) extends it: OUT is replaced by the new kept model.
    # An interrupted extension has both logs; the work folder's holds everything OUT's does, and more.
    extending = resume and os.path.isfile(finished_log)
    resume_from = (log_path if os.path.isfile(log_path) else finished_log if extending else None) if resume else None
    with session(cfg, dataclasses.replace(opts, overwrite=opts.overwrite or extending), out) as s:
        start_p = _start_params(cfg, s.method, start, strategy, tune)
        space = Space(tune, start_p, step, max_factor)
        fp = fingerprint(cfg, s.inputs, opts.seed, opts.shard_size)
        identity = hashlib.sha256(json.dumps([fp, strategy, list(tune), list(eval_cmds), list(dense or [])])
                                  .encode()).hexdigest()
        _prepare_work(work, fp, resume)
        header = {"identity": identity, "strategy": strategy, "tune": list(tune), "seed": opts.seed,
                  "eval_cmds": list(eval_cmds), "dense_scores": list(dense or []), "config": cfg.source,
                  "created": time.time()}
        if extending and (_read_log(finished_log)[0] or {}).get("identity") != identity:
            raise OutputError(f"{finished_log}: {out} holds another search (another config, inputs, --seed, --strategy, "
                              "--tune or --eval-cmd); choose another OUT, or pass --overwrite without --resume")
        ev = Evaluator(cfg, s, opts, tune, work, eval_cmds, judge, SearchLog(log_path, header, resume_from), max_evals,
                       bool(dense), echo)
        t1 = time.perf_counter()
        ev.planned(start_p)  # pass 1: every later plan reads its statistics from the store
        pass1 = time.perf_counter() - t1
        try:
            if strategy == "reference":
                walk(ev, ev.beats, start_p, step)
            elif strategy == "refine":
                refine(ev, ev.beats, space, start_p, step)
            else:
                sampler_search(ev, space, start_p, strategy, opts.seed)
        except OutOfBudget:
            pass
        finally:
            ev.log.close()
        kept = ev.incumbent.ev
        ev.ensure_best(kept)
        shutil.copyfile(log_path, os.path.join(ev.best_dir, LOG_NAME))  # what --resume extends
    check_output(out, s.inputs, opts.overwrite or extending)
    publish(ev.best_dir, out)
    result = SearchResult(out, strategy, tune, judge, ev.evals[0], kept, [m.path for m in cfg.models], ev.evals,
                          ev.repeats, pass1, time.perf_counter() - t0,
                          merge_command(with_params(cfg, kept.params, tune), out))
    _write_reports(result, out, step, max_evals, max_factor, eval_cmds, dense, opts.seed)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _check_search(cfg, eval_cmds, step, dense, max_evals, strategy, objective, min_gain, max_factor, tune):
    """The search's options, checked before anything is read: (tune, min_gain) as used."""
    if cfg.merge_method != "dppa":
        raise UsageError(f"{cfg.source}: search tunes DPPA; merge_method must be dppa, not {cfg.merge_method!r}")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    tune = parse_tune(tune)
    if strategy == "reference" and tune != ("factors",):
        raise UsageError("--strategy reference is the authors' walk over the factors only; use --tune factors, "
                         "or another strategy")
    if "factors" in tune and "weight" in tune and cfg.parameters.get("combine", "sum") in ("sum", "mean"):
        raise UsageError("--tune factors,weight: with combine sum or mean a model's weight only scales its "
                         "factors, so this searches one direction twice; tune one of them")
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
    return tune, min_gain


def _prepare_work(work: str, fp: str, resume: bool) -> None:
    """The search's work folder, stamped with the run's fingerprint: another run's is removed
    (refused with --resume), and candidates a stopped run left behind are cleared."""
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


class Evaluator:
    """The strategies' f(params) -> Evaluation: plans the candidate from the stored statistics,
    answers from memory a parameter point or a model (plan digest) already evaluated, replays
    evaluations an earlier run logged, else merges the candidate into the work folder, runs the
    eval commands and logs the scores. The incumbent's model is kept in `best_dir`."""

    def __init__(self, cfg, s, opts, tune, work, eval_cmds, judge, log: SearchLog, max_evals, show_raw, echo):
        self.cfg, self.s, self.opts, self.tune, self.work = cfg, s, opts, tune, work
        self.eval_cmds, self.judge, self.log, self.max_evals, self.show_raw, self.echo = \
            eval_cmds, judge, log, max_evals, show_raw, echo
        self.engine = s.engine(StatsStore(os.path.join(work, "stats.zarr")))
        self.evals: list[Evaluation] = []
        self.by_params: dict[Params, Evaluation] = {}
        self.by_digest: dict[str, Evaluation] = {}
        self.repeats = 0
        self.incumbent = Incumbent(judge)
        self.best_dir = os.path.join(work, "best")
        self.best_json = os.path.join(work, "best.json")

    def planned(self, p: Params):
        cand_cfg = with_params(self.cfg, p, self.tune)
        cand = dataclasses.replace(self.s, cfg=cand_cfg, method=cand_cfg.method(self.opts.seed))
        return cand_cfg, cand, cand.plan(self.engine)  # the statistics come from the store

    def write(self, cand_cfg, cand, plan, folder: str) -> None:
        from .merge_pass import write_output

        prepare_partial(folder + ".partial", "", False, True, {})
        write_output(cand_cfg, folder, cand, plan.tensors, set(), self.opts.shard_size)
        publish(folder + ".partial", folder)

    def keep(self, folder: str, ev: Evaluation) -> None:
        if os.path.exists(self.best_json):
            os.unlink(self.best_json)
        if os.path.exists(self.best_dir):
            shutil.rmtree(self.best_dir)
        os.rename(folder, self.best_dir)
        with open(self.best_json, "w") as f:
            json.dump({"digest": ev.digest}, f)

    def ensure_best(self, kept: Evaluation) -> None:
        """`best_dir` holds the kept model (one replayed from the log is merged again)."""
        saved = json.load(open(self.best_json)) if os.path.isfile(self.best_json) and os.path.isdir(self.best_dir) \
            else None
        if saved is None or saved["digest"] != kept.digest:
            if os.path.exists(self.best_dir):
                shutil.rmtree(self.best_dir)
            self.write(*self.planned(kept.params), self.best_dir)

    def beats(self, a: Evaluation, b: Evaluation) -> bool:
        return self.judge.beats(a.scores, b.scores)

    def __call__(self, p: Params) -> Evaluation:
        if p in self.by_params:
            self.repeats += 1
            return self.by_params[p]
        t = time.perf_counter()
        cand_cfg, cand, plan = self.planned(p)
        digest = plan_digest(plan.tensors)
        if digest in self.by_digest:  # another parameter point, the same model
            self.repeats += 1
            self.by_params[p] = self.by_digest[digest]
            return self.by_digest[digest]
        if len(self.evals) >= self.max_evals:
            raise OutOfBudget
        n, where = len(self.evals) + 1, f"{_fmt(p.factors)}{_extras(p, self.tune)}"
        row = self.log.by_digest.get(digest) or self.log.by_params.get(p)
        if row is not None:  # evaluated by an earlier run of this search
            ev = Evaluation(n, p, digest, row["scores"], self.judge.value(row["scores"]),
                            row.get("merge_seconds", 0.0), row.get("eval_seconds", 0.0), replayed=True)
            self.echo(f"evaluation {n}/{self.max_evals}: {where}: objective {ev.objective:.6g} (from the log)")
        else:
            cand_dir = os.path.join(self.work, f"cand-{n}")
            self.write(cand_cfg, cand, plan, cand_dir)
            t_eval = time.perf_counter()
            scores = run_commands(self.eval_cmds, cand_dir)
            ev = Evaluation(n, p, digest, scores, self.judge.value(scores), t_eval - t, time.perf_counter() - t_eval)
            self.log.append(ev)
            raw = f" (scores {', '.join(f'{x:g}' for x in scores)})" if len(scores) > 1 or self.show_raw else ""
            self.echo(f"evaluation {n}/{self.max_evals}: {where}: objective {ev.objective:.6g}{raw}")
        self.evals.append(ev)
        self.by_params[p] = self.by_digest[digest] = ev
        if self.incumbent.offer(ev):
            if not ev.replayed:
                self.keep(cand_dir, ev)
        elif not ev.replayed:
            shutil.rmtree(cand_dir, ignore_errors=True)
        return ev


def _write_reports(res: SearchResult, out: str, step, max_evals, max_factor, eval_cmds, dense, seed) -> None:
    data = res.to_json()
    data.update(step=step, max_evals=max_evals, max_factor=max_factor, seed=seed, eval_cmds=eval_cmds,
                dense_scores=dense)
    with open(os.path.join(out, "search_log.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(out, "search_log.md"), "w") as f:
        f.write("# Parameter search\n\n```\n" + res.report() + "\n```\n\n")
        f.write("| # | parameters (effective factors per fine-tune) | scores | objective | merge s | eval s |\n"
                "|---|---|---|---|---|---|\n")
        for e in res.log:
            mark = " **kept**" if e.n == res.kept.n else (" (start)" if e.n == 1 else "")
            f.write(f"| {e.n} | {_fmt(e.params.factors)}{_extras(e.params, res.tune)} | "
                    f"{', '.join(f'{x:g}' for x in e.scores)} | {e.objective:.6g}{mark} | {e.merge_seconds:.2f} | "
                    f"{e.eval_seconds:.2f}{' (log)' if e.replayed else ''} |\n")
