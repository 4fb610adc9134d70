"""`dppa-stream search`: choose DPA amplification factors by greedy coordinate ascent.

As in the authors' `python_contral.py` (docs/dppa-algorithm.md §4.3): start at (1.8, 0.0), walk one
coordinate at a time in +0.1 steps while the objective improves; a coordinate below one step
starts its walk at 1.0. Quirk Q11 is fixed: a probe that does not improve is always reverted, and
the model kept is the best one evaluated. Pass 1 and the DP plan run once; each candidate costs one
pass 2 (write), one evaluation, and is deleted unless it is the best so far.

The objective is the last number the evaluation command prints; with several commands, the
geometric mean of each score divided by its dense reference score. Tune on a validation split:
the reference tuned on the test sets it reported (quirk Q12).
"""

from __future__ import annotations

import dataclasses
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

from .config import MergeConfig, parse_config
from .errors import UsageError
from .stats_store import StatsStore
from .output import check_output, fingerprint, publish
from .output import prepare_partial
from .pipeline import MergeOptions, session

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class SearchResult:
    out: str
    best_amplification: list
    best_score: float
    log: list = field(default_factory=list)
    wall_seconds: float = 0.0


def last_number(text: str, cmd: str) -> float:
    found = _NUMBER.findall(text)
    if not found:
        raise UsageError(f"evaluation command printed no number: {cmd}")
    return float(found[-1])


def evaluate(cmds: list[str], model_dir: str, dense: list[float] | None) -> tuple[float, list[float]]:
    """Run each command with {model} replaced; return (objective, raw scores)."""
    scores = []
    for cmd in cmds:
        full = cmd.replace("{model}", shlex.quote(model_dir))
        res = subprocess.run(full, shell=True, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            raise UsageError(f"evaluation command failed (exit {res.returncode}): {full}: {tail[0]}")
        scores.append(last_number(res.stdout, full))
    if len(scores) == 1 and not dense:
        return scores[0], scores
    refs = dense or [1.0] * len(scores)
    if len(refs) != len(scores):
        raise UsageError(f"--dense-score given {len(refs)} times for {len(scores)} evaluation commands")
    ratios = [s / r for s, r in zip(scores, refs)]
    if any(x <= 0 for x in ratios):
        return 0.0, scores
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios)), scores


def greedy_ascent(objective, start: list[float], step: float, max_evals: int = 100) -> tuple[list[float], float, list]:
    """Coordinate ascent as in the reference, with rejected probes reverted (quirk Q11 fixed)."""
    seen: dict[tuple, float] = {}
    log = []

    def f(alpha):
        key = tuple(round(a, 6) for a in alpha)
        if key not in seen:
            if len(seen) >= max_evals:
                return -math.inf
            seen[key] = objective(list(key))
            log.append({"amplification": list(key), "score": seen[key]})
        return seen[key]

    alpha = [round(a, 6) for a in start]
    best = f(alpha)
    for j in range(len(alpha)):
        while True:
            probe = list(alpha)
            probe[j] = 1.0 if alpha[j] < step - 1e-9 else round(alpha[j] + step, 6)
            score = f(probe)
            if score > best:
                alpha, best = probe, score
            else:
                break
    return alpha, best, log


def with_amplification(cfg: MergeConfig, alpha: list[float]) -> MergeConfig:
    """The config with `parameters.amplification` set (for the candidate's model card)."""
    data = yaml.safe_load(cfg.text)
    data.setdefault("parameters", {})
    data["parameters"] = dict(data["parameters"] or {}, amplification=alpha)
    for m in data.get("models", []):
        if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
            m["parameters"].pop("amplification", None)
    return parse_config(yaml.safe_dump(data, sort_keys=False), cfg.source)


def search(cfg: MergeConfig, out: str, eval_cmds: list[str], opts: MergeOptions | None = None, start=None,
           step: float = 0.1, dense: list[float] | None = None, max_evals: int = 100, echo=print) -> SearchResult:
    if cfg.merge_method != "dppa":
        raise UsageError(f"{cfg.source}: search tunes DPA factors; merge_method must be dppa, not {cfg.merge_method!r}")
    if not eval_cmds:
        raise UsageError("give at least one --eval-cmd 'COMMAND {model}'")
    if dense and len(dense) != len(eval_cmds):
        raise UsageError(f"--dense-score given {len(dense)} times for {len(eval_cmds)} --eval-cmd")
    if dense and any(not (d > 0) for d in dense):
        raise UsageError(f"--dense-score must be positive (scores are divided by it), got {dense}")
    opts = opts or MergeOptions()
    out = os.path.abspath(out)
    t0 = time.perf_counter()
    work = out + ".search"
    with session(cfg, opts, out) as s:
        method = s.method
        start = list(start or method.factors(method.mparams[0]))
        if len(start) != len(method.rates):
            raise UsageError(f"--start needs {len(method.rates)} factors, one per pruning rate {method.rates}")
        # statistics persist in OUT.search/stats.zarr: a re-run after a crash does not redo pass 1
        fp = fingerprint(cfg, s.inputs, opts.seed, opts.shard_size)
        stamp = os.path.join(work, "fingerprint")
        if os.path.exists(work) and (not os.path.exists(stamp) or open(stamp).read() != fp):
            shutil.rmtree(work)  # statistics of other inputs or another config
        os.makedirs(work, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(fp)
        for leftover in os.listdir(work):
            if leftover.startswith("alpha-"):
                shutil.rmtree(os.path.join(work, leftover))
        engine = s.engine(StatsStore(os.path.join(work, "stats.zarr")))
        best = {"dir": None, "score": -math.inf}

        def objective(alpha):
            from .merge_pass import write_output

            cand_cfg = with_amplification(cfg, alpha)
            cand_session = dataclasses.replace(s, method=cand_cfg.method(opts.seed))
            plan = cand_session.plan(engine)  # statistics come from the store after the first candidate
            cand = os.path.join(work, "alpha-" + "-".join(f"{a:g}" for a in alpha))
            prepare_partial(cand + ".partial", "", False, True, {})
            write_output(cand_cfg, cand, cand_session, plan.tensors, set(), opts.shard_size)
            publish(cand + ".partial", cand)
            score, raw = evaluate(eval_cmds, cand, dense)
            echo(f"amplification {alpha}: score {score:.6g}" + (f" (raw {raw})" if len(raw) > 1 or dense else ""))
            if score > best["score"]:
                if best["dir"]:
                    shutil.rmtree(best["dir"], ignore_errors=True)
                best.update(dir=cand, score=score)
            else:
                shutil.rmtree(cand, ignore_errors=True)
            return score

        alpha, score, log = greedy_ascent(objective, start, step, max_evals)
    check_output(out, s.inputs, opts.overwrite)
    publish(best["dir"], out)
    shutil.rmtree(work, ignore_errors=True)
    result = SearchResult(out, alpha, score, log, time.perf_counter() - t0)
    with open(os.path.join(out, "search_log.json"), "w") as f:
        json.dump({"best_amplification": alpha, "best_score": score, "step": step, "start": start,
                   "eval_cmds": eval_cmds, "dense_scores": dense, "evaluations": log}, f, indent=2)
    with open(os.path.join(out, "search_log.md"), "w") as f:
        f.write("| # | amplification | score |\n|---|---|---|\n")
        for i, row in enumerate(log, 1):
            mark = " **best**" if row["amplification"] == alpha else ""
            f.write(f"| {i} | {row['amplification']} | {row['score']:.6g}{mark} |\n")
    return result


