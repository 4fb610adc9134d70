"""Parity with mergekit 0.1.5: every mergekit merge method dppa-stream implements, and the config
semantics (gradients, filter lists, slices, base as an input), merged by both tools from the same
YAML with `dtype: float32`, on tiny float32 Llama-shaped models made here.

mergekit runs in its own virtualenv, once per session: `tests/mergekit_driver.py`, executed with
that venv's python, merges every config in one process (`mergekit.merge.run_merge`) while our
merges run here. The venv is $MERGEKIT_VENV, else the repository's .venv-mergekit. When MERGEKIT_VENV is set, or
it exists, a broken mergekit FAILS these tests; they are skipped only when neither
exists. `.ci/run` builds .venv-mergekit (torch 2.13.0, mergekit 0.1.5) and sets MERGEKIT_VENV.

Inputs: base + 3 fine-tunes (4 layers, hidden 32; `main`, continuous float32 deltas); the same
models rounded to bfloat16 and stored as float32 (`ties`: bf16-origin deltas take few distinct
values, so top-k thresholds fall inside large tie classes).

Comparison rules (a = ours, b = mergekit, per tensor; max|b| over the tensor):
- deterministic methods: every element within |a - b| <= 1e-5 * |b| + 1e-6 * max|b| (1e-5 relative,
  with an absolute floor of 1e-6 of the tensor's scale for near-zero elements, where float32
  cancellation in a different operation order dominates). The table also reports max|a - b| / max|b|,
  the elements over a pure 1e-5 relative bound and the elements that differ at all (bits).
- top-k methods (ties, breadcrumbs, breadcrumbs_ties, sce): the same rule, except where mergekit
  broke a tie at a selection threshold differently (it uses torch's sort/topk order, we keep the
  lowest flat index). Every element outside the rule must be one where some model's |delta|
  (sce: the variance across models) equals a threshold value whose tie class straddles the cut;
  these are counted and reported. For sce a different choice also changes the models' weights (mean
  square of the kept delta) for the whole tensor: there the elements each tool selected must differ
  only inside the tie class, and mergekit's output must equal SCE's formula evaluated with mergekit's
  own selection (within the rule).
- arcee_fusion: the same rule, except for elements whose side of the selection threshold is decided
  by rounding: mergekit computes the row KL in float32, where the KL of a fine-tuned row and its base
  row (nearly equal) carries rounding noise of up to a few % of its value; dppa-stream computes it in
  float64. The test rebuilds mergekit's output with mergekit's own torch operations (it must match
  bit for bit), and every element outside the rule must lie closer to the float64 threshold than
  mergekit's float32 error of its importance plus that of the threshold.
- random methods (dare_linear, dare_ties, della, della_linear) use different random streams (torch's
  global generator there, a counter-based hash here), so they are compared by distribution:
  * with one fine-tune the kept elements are visible in the output. For each tool and tensor, the
    count kept must lie within 5 sigma of its expectation (Binomial(n, density) for DARE; for DELLA
    the sum of p_e = density - eps + 2 eps (rank_e - 1) / (ncols - 1), ranks of |delta| within each
    row, Poisson-binomial sigma); DELLA's keep rate per rank quintile (all tensors pooled) must be
    within 5 sigma of the formula and rise quintile by quintile; and every kept element must equal
    base + c * s * delta with s = sum|delta| / sum|kept delta| from that tool's own mask (mergekit's
    L1 rescale; c = weight, or 1 where DELLA normalises), within the deterministic rule.
  * with three fine-tunes the two outputs are independent draws: per tensor, for f = the merged
    delta projected on sign(sum_i w_i delta_i) and f = [merged != base], the paired statistic
    T = sum_e (f_a - f_b) / sqrt(sum_e (f_a - f_b)^2) must satisfy |T| <= 5.
- config.json's num_hidden_layers must agree (slices renumber layers), and so must the tensor names;
  with a top-level base_model, config.json must be the base model's (also where the base is merged
  as an input).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape, write_llama_set

from .reference import load_model

DEFAULT_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mergekit_driver.py")
SHAPE = LlamaShape(hidden=32, intermediate=80, layers=4, vocab=72, heads=4, kv_heads=2)
DRIFT = 3e-3
SEED = 1
REL, FLOOR = 1e-5, 1e-6  # |a - b| <= REL * |b| + FLOOR * max|b|
BASE_EPS = 1e-6  # rms_norm_eps of the base's config.json (the fine-tunes have 1e-5)
Z = 5.0  # bound on every z or T statistic of the distribution checks


def mergekit_python() -> tuple[str | None, str]:
    """(python of the mergekit venv, where it came from); (None, why) when there is none."""
    env = os.environ.get("MERGEKIT_VENV")
    if env:
        return os.path.join(env, "bin", "python"), f"MERGEKIT_VENV={env}"
    if os.path.isdir(DEFAULT_VENV):
        return os.path.join(DEFAULT_VENV, "bin", "python"), DEFAULT_VENV
    return None, f"mergekit 0.1.5 not available: set MERGEKIT_VENV or create {DEFAULT_VENV}"


MK_PYTHON, MK_FROM = mergekit_python()
pytestmark = pytest.mark.skipif(MK_PYTHON is None, reason=MK_FROM)


# --- configs ---------------------------------------------------------------------------------------------
# name: (kind, input set, YAML). kinds: exact | topk | arcee | random (3 fine-tunes) | random1 (one fine-tune).
# {base} {ft1} {ft2} {ft3} are replaced by the input set's paths; every config ends with dtype: float32.

def _models(*entries) -> str:
    return "models:\n" + "".join(f"  - model: {m}\n" + (f"    parameters: {p}\n" if p else "") for m, p in entries)


W3 = ("{ft1}", "{weight: 0.5}"), ("{ft2}", "{weight: 0.3}"), ("{ft3}", "{weight: 0.8}")
TD3 = (("{ft1}", "{weight: 0.5, density: 0.3}"), ("{ft2}", "{weight: 0.3, density: 0.5}"),
       ("{ft3}", "{weight: 0.8, density: 0.7}"))
BC3 = (("{ft1}", "{weight: 0.5, density: 0.8, gamma: 0.05}"), ("{ft2}", "{weight: 0.3, density: 0.6, gamma: 0.01}"),
       ("{ft3}", "{weight: 0.8, density: 0.9, gamma: 0.02}"))
DE3 = (("{ft1}", "{weight: 0.5, density: 0.3, epsilon: 0.15}"), ("{ft2}", "{weight: 0.3, density: 0.5, epsilon: 0.1}"),
       ("{ft3}", "{weight: 0.8, density: 0.7, epsilon: 0.15}"))
BASE = "base_model: {base}\n"


def _cfg(method, body, params=None):
    return f"merge_method: {method}\n" + body + (f"parameters: {params}\n" if params else "")


CONFIGS = {
    # --- deterministic methods
    "linear": ("exact", "main", _cfg("linear", _models(("{ft1}", "{weight: 1.0}"), ("{ft2}", "{weight: 2.0}"),
                                                     ("{ft3}", "{weight: 0.5}")))),
    "linear_base_input": ("exact", "main", _cfg("linear", BASE + _models(("{ft1}", "{weight: 0.5}"), ("{ft2}", "{weight: 0.3}")),
                                                "{weight: 2.0}")),
    "task_arithmetic": ("exact", "main", _cfg("task_arithmetic", BASE + _models(*W3), "{lambda: 0.9}")),
    "slerp": ("exact", "main", _cfg("slerp", BASE + _models(("{ft1}", None)),
                                    "{t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, "
                                    "{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: [0.2, 0.8]}]}")),
    "nuslerp": ("exact", "main", _cfg("nuslerp", BASE + _models(("{ft1}", "{weight: 0.3}"), ("{ft2}", "{weight: 0.6}")))),
    "nuslerp_rows": ("exact", "main", _cfg("nuslerp", _models(("{ft1}", "{weight: 0.7}"), ("{ft2}", "{weight: 0.4}")),
                                           "{nuslerp_flatten: false}")),
    "multislerp": ("exact", "main", _cfg("multislerp", BASE + _models(*W3))),
    "karcher_base_input": ("exact", "main", _cfg("karcher", BASE + _models(("{ft1}", None), ("{ft2}", None)))),
    "model_stock": ("exact", "main", _cfg("model_stock", BASE + _models(("{ft1}", None), ("{ft2}", None), ("{ft3}", None)))),
    "model_stock_filter_wise": ("exact", "main", _cfg("model_stock", BASE + _models(("{ft1}", None), ("{ft2}", None),
                                                                                    ("{ft3}", None)), "{filter_wise: true}")),
    "nearswap": ("exact", "main", _cfg("nearswap", BASE + _models(("{ft1}", None)), "{t: 0.002}")),
    "arcee_fusion": ("arcee", "main", _cfg("arcee_fusion", BASE + _models(("{ft2}", None)))),
    "passthrough": ("exact", "main", _cfg("passthrough", _models(("{ft3}", "{scale: 0.7}")))),
    "ram": ("exact", "main", _cfg("ram", BASE + _models(("{ft1}", None), ("{ft2}", None), ("{ft3}", None)),
                                  "{epsilon: 0.002}")),
    "ramplus_tl": ("exact", "main", _cfg("ramplus_tl", BASE + _models(("{ft1}", None), ("{ft2}", None), ("{ft3}", None)),
                                         "{epsilon: 0.002, r: 0.3, alpha: 0.5}")),
    # --- config semantics
    # filter lists: substring match, first match wins, no match falls through to the next scope
    # (ft1's weight -> the global weight outside self_attn/mlp; lambda -> its default outside proj/norm)
    "filters": ("exact", "main", _cfg("task_arithmetic", BASE + _models(
        ("{ft1}", "{weight: [{filter: self_attn, value: 0.8}, {filter: mlp, value: [0.1, 0.9]}]}"),
        ("{ft2}", None),
        ("{ft3}", "{weight: [{filter: norm, value: -0.3}, {filter: '*', value: [0.5, 0.2]}]}")),
        "{weight: 0.25, lambda: [{filter: proj, value: [1.0, 1.5]}, {filter: norm, value: 0.7}]}")),
    # gradients restart in every slice; embeddings take slice 0's value at t = 0, norm/lm_head the last slice's
    "slices_gradient": ("exact", "main", "merge_method: task_arithmetic\nbase_model: {base}\nslices:\n"
                        "  - sources:\n"
                        "      - {model: {base}, layer_range: [0, 2]}\n"
                        "      - {model: {ft1}, layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}\n"
                        "      - {model: {ft2}, layer_range: [0, 2]}\n"
                        "    parameters: {weight: 0.5, lambda: [1.0, 2.0]}\n"
                        "  - sources:\n"
                        "      - {model: {base}, layer_range: [2, 4]}\n"
                        "      - {model: {ft2}, layer_range: [2, 4], parameters: {weight: [0.9, 0.1]}}\n"
                        "      - {model: {ft3}, layer_range: [2, 4], parameters: {weight: 0.4}}\n"
                        "    parameters: {lambda: [0.5, 1.5]}\n"),
    # per-model filters match the input tensor name (source layer), shared ones the output name
    "slices_remap": ("exact", "main", "merge_method: task_arithmetic\nbase_model: {base}\nslices:\n"
                     "  - sources:\n"
                     "      - {model: {base}, layer_range: [1, 3]}\n"
                     "      - {model: {ft1}, layer_range: [1, 3], parameters: {weight: [{filter: layers.1., value: 5.0}, {value: 1.0}]}}\n"
                     "      - {model: {ft2}, layer_range: [1, 3], parameters: {weight: 0.5}}\n"
                     "    parameters: {lambda: [{filter: layers.1., value: 3.0}, {value: 1.0}]}\n"),
    # a slice base (ft2 for the second slice, hence for model.norm and lm_head) and slice parameters
    "slices_slice_base": ("exact", "main", "merge_method: slerp\nbase_model: {base}\nslices:\n"
                          "  - sources:\n"
                          "      - {model: {base}, layer_range: [0, 2]}\n"
                          "      - {model: {ft1}, layer_range: [0, 2]}\n"
                          "    parameters: {t: [0.2, 0.8]}\n"
                          "  - sources:\n"
                          "      - {model: {ft2}, layer_range: [2, 4]}\n"
                          "      - {model: {ft3}, layer_range: [2, 4]}\n"
                          "    base_model: {ft2}\n"
                          "    parameters: {t: [0.3, 0.6]}\n"),
    # frankenmerge: 3 + 3 layers renumbered 0..5, num_hidden_layers 6
    "passthrough_frankenmerge": ("exact", "main", "merge_method: passthrough\nslices:\n"
                                 "  - sources:\n      - {model: {ft1}, layer_range: [0, 3]}\n"
                                 "  - sources:\n      - {model: {ft2}, layer_range: [1, 4]}\n"),
    # --- top-k methods (gradients in a top-k method; then the bf16-origin set, full of ties)
    "ties": ("topk", "main", _cfg("ties", BASE + _models(*TD3))),
    "ties_gradient": ("topk", "main", _cfg("ties", BASE + _models(("{ft1}", "{weight: [0.3, 1.0], density: [0.2, 0.8]}"),
                                                                 ("{ft2}", "{weight: 0.6, density: 0.5}")),
                                           "{normalize: false, lambda: 1.2}")),
    "breadcrumbs": ("topk", "main", _cfg("breadcrumbs", BASE + _models(*BC3))),
    "breadcrumbs_ties": ("topk", "main", _cfg("breadcrumbs_ties", BASE + _models(*BC3))),
    "sce": ("topk", "main", _cfg("sce", BASE + _models(("{ft1}", None), ("{ft2}", None), ("{ft3}", None)), "{select_topk: 0.4}")),
    "ties_bf16_origin": ("topk", "ties", _cfg("ties", BASE + _models(*TD3))),
    "breadcrumbs_bf16_origin": ("topk", "ties", _cfg("breadcrumbs", BASE + _models(*BC3))),
    "breadcrumbs_ties_bf16_origin": ("topk", "ties", _cfg("breadcrumbs_ties", BASE + _models(*BC3))),
    "sce_bf16_origin": ("topk", "ties", _cfg("sce", BASE + _models(("{ft1}", None), ("{ft2}", None), ("{ft3}", None)),
                                             "{select_topk: 0.4}")),
    # --- random methods
    "dare_linear": ("random", "main", _cfg("dare_linear", BASE + _models(*TD3))),
    "dare_ties": ("random", "main", _cfg("dare_ties", BASE + _models(*TD3))),
    "della": ("random", "main", _cfg("della", BASE + _models(*DE3))),
    "della_linear": ("random", "main", _cfg("della_linear", BASE + _models(*DE3))),
    "dare_linear_1": ("random1", "main", _cfg("dare_linear", BASE + _models(("{ft1}", "{weight: 0.7, density: 0.4}")))),
    "dare_ties_1": ("random1", "main", _cfg("dare_ties", BASE + _models(("{ft1}", "{weight: 0.7, density: 0.4}")))),
    "della_1": ("random1", "main", _cfg("della", BASE + _models(("{ft1}", "{weight: 0.7, density: 0.4, epsilon: 0.15}")))),
    "della_linear_1": ("random1", "main", _cfg("della_linear", BASE + _models(("{ft1}", "{weight: 0.7, density: 0.4, epsilon: 0.15}")))),
}
# every mergekit method dppa-stream implements appears above
MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce",
                    "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl"}

RESULTS: dict[str, dict] = {}  # per config: the numbers of the summary table


def _paths(set_dir: str) -> dict:
    return {k: os.path.join(set_dir, k) for k in ("base", "ft1", "ft2", "ft3")}


def _fill(template: str, paths: dict) -> str:
    text = template
    for k, p in paths.items():
        text = text.replace("{" + k + "}", p)
    return text + "dtype: float32\n"


def _bf16_origin(src: list[str], dst: str) -> None:
    """Copies of the models with every value rounded to bfloat16, stored as float32."""
    from safetensors.torch import save_file

    for p in src:
        out = os.path.join(dst, os.path.basename(p))
        os.makedirs(out)
        tensors = {k: v.to(torch.bfloat16).float().contiguous() for k, v in load_model(p).items()}
        save_file(tensors, os.path.join(out, "model.safetensors"), {"format": "pt"})
        with open(os.path.join(p, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f)


@pytest.fixture(scope="session")
def parity(tmp_path_factory):
    """Both tools' outputs for every config: {name: {"ours": dir | error, "mk": dir | error, ...}}."""
    root = tmp_path_factory.mktemp("parity")
    main = write_llama_set(str(root / "main"), SHAPE, 3, torch.float32, seed=11, drift=DRIFT)
    with open(os.path.join(main[0], "config.json")) as f:  # tell the base's config.json from the others'
        cfg = json.load(f)
    with open(os.path.join(main[0], "config.json"), "w") as f:
        json.dump(dict(cfg, rms_norm_eps=BASE_EPS), f)
    _bf16_origin(main, str(root / "ties"))
    sets = {"main": _paths(str(root / "main")), "ties": _paths(str(root / "ties"))}
    jobs, runs = [], {}
    (root / "ours").mkdir()
    for name, (kind, inputs, template) in CONFIGS.items():
        text = _fill(template, sets[inputs])
        path = root / "configs" / f"{name}.yml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        runs[name] = {"kind": kind, "inputs": sets[inputs], "text": text, "mk": str(root / "mk" / name),
                      "ours": str(root / "ours" / name)}
        jobs.append({"config": str(path), "out": runs[name]["mk"], "seed": SEED})
    (root / "jobs.json").write_text(json.dumps(jobs))
    results = root / "mk-results.json"
    if not os.path.exists(MK_PYTHON):
        pytest.fail(f"mergekit venv ({MK_FROM}) has no {MK_PYTHON}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)
    with open(root / "mk-driver.log", "w") as log:
        driver = subprocess.Popen([MK_PYTHON, DRIVER, str(root / "jobs.json"), str(results)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, run in runs.items():  # ours, while mergekit starts up
            try:
                merge(parse_config(run["text"], name + ".yml"), run["ours"], MergeOptions(quiet=True, seed=SEED))
            except Exception as e:  # reported by the config's test
                run["ours_error"] = f"{type(e).__name__}: {e}"
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    if not results.exists():
        tail = (root / "mk-driver.log").read_text()[-3000:]
        pytest.fail(f"the mergekit driver ({MK_FROM}) failed (exit {driver.returncode}):\n{tail}")
    got = json.loads(results.read_text())
    if "broken" in got:
        pytest.fail(f"mergekit cannot be imported from {MK_FROM}: {got['broken']}")
    assert got["mergekit"] == "0.1.5", f"{MK_FROM} has mergekit {got['mergekit']}, not 0.1.5"
    for job in got["jobs"]:
        name = os.path.basename(job["out"])
        runs[name]["mk_seconds"] = job["seconds"]
        if not job["ok"]:
            runs[name]["mk_error"] = job["error"]
    runs["_versions"] = {"mergekit": got["mergekit"], "torch": got["torch"], "from": MK_FROM}
    return runs


# --- comparisons -----------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def _within(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elements within the deterministic rule (b is mergekit's)."""
    scale = np.abs(b).max() if b.size else 0.0
    return np.abs(a - b) <= REL * np.abs(b) + FLOOR * scale


def _exact_numbers(a: np.ndarray, b: np.ndarray, a32: torch.Tensor, b32: torch.Tensor) -> dict:
    scale = np.abs(b).max() if b.size else 0.0
    err = np.abs(a - b)
    return {"max_err": float(err.max() / scale) if scale else float(err.max() if err.size else 0.0),
            "over_rel": int((err > REL * np.abs(b)).sum()),
            "bits": int((a32.view(torch.int32) != b32.view(torch.int32)).sum()),
            "n": int(b.size)}


def _cut_ties(values: np.ndarray, cuts: list[int]) -> np.ndarray:
    """Elements whose value ties across a cut of the ascending order (position c: kept/dropped
    boundary between sorted[c-1] and sorted[c]), i.e. where which ones are kept is a tie choice."""
    flat = values.reshape(-1)
    s = np.sort(flat)
    amb = np.zeros(flat.size, bool)
    for c in cuts:
        if 0 < c < flat.size and s[c - 1] == s[c]:
            amb |= flat == s[c]
    return amb


def _model_params(text: str) -> list[dict]:
    import yaml

    cfg = yaml.safe_load(text)
    return [m.get("parameters") or {} for m in cfg["models"]]


def _topk_ambiguous(method: str, name: str, base: np.ndarray, fts: list[np.ndarray], params: list[dict]) -> np.ndarray:
    """Elements of tensor `name` where a tie at a selection threshold decides what is kept."""
    amb = np.zeros(base.size, bool)
    n = base.size
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        from dppa_stream.params import resolve

        t = int(name.split(".")[2]) / (SHAPE.layers - 1) if ".layers." in name else 0.0  # `models:` configs only
        for x, p in zip(fts, params):
            d = float(resolve(p.get("density", 1.0), name, t))
            if d >= 1:
                continue
            absd = np.abs((x - base).reshape(-1).astype(np.float32))
            if method == "ties":
                k = max(1, int(d * n))
                amb |= _cut_ties(absd, [n - k])
            else:
                g = float(resolve(p.get("gamma", 0.01), name, t))
                target = int(d * n)
                n_bot = max(0, n - target - int(g * n))
                amb |= _cut_ties(absd, [n_bot, n_bot + target])
    return amb


def _sce_parts(base_t: torch.Tensor, fts_t: list[torch.Tensor], topk: float):
    """mergekit's SCE variance (torch.var, as mergekit computes it), the cut and the tie class."""
    tvs = torch.stack([x - base_t for x in fts_t])
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1).abs().numpy()
    nnz = int(np.count_nonzero(var))
    k = int(np.float32(nnz) * np.float32(topk))
    return tvs.reshape(len(fts_t), -1).numpy().astype(np.float64), var, k, _cut_ties(var, [var.size - k])


def _sce_formula(base: np.ndarray, tvs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """SCE's output for a given selection (float64): weights = mean of the kept squares, sign
    election, disjoint weighted mean."""
    t = tvs * keep
    w = (t ** 2).mean(axis=1)
    w = np.full(len(w), 1 / len(w)) if abs(w.sum()) < 1e-6 else w / w.sum()
    maj = np.where(t.sum(axis=0) >= 0, 1.0, -1.0)
    e = w[:, None] * (np.sign(t) == maj)
    return base + (t * e).sum(axis=0) / np.maximum(e.sum(axis=0), 1e-6)


def _arcee_importance(x: torch.Tensor, b: torch.Tensor):
    """mergekit's importance |x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) per row and its
    threshold median + 1.5 IQR (quantiles at floor(q (n - 1)) of the sorted importance), computed
    with mergekit's torch operations in the inputs' dtype."""
    import torch.nn.functional as F

    p, q = F.softmax(x, dim=-1) + 1e-8, F.softmax(b, dim=-1) + 1e-8
    imp = (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    s = torch.sort(imp.reshape(-1)).values
    q1, med, q3 = s[(torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()]
    return imp, med + 1.5 * (q3 - q1)


def _arcee_band(b: torch.Tensor, x: torch.Tensor):
    """(elements whose side of the threshold float32 rounding decides, mergekit's output rebuilt).
    mergekit computes the KL in float32, where the KL of two nearly equal rows carries rounding
    noise of up to a few % of its value; dppa-stream computes it in float64. An element may be
    selected by one and not the other only if its exact importance lies closer to the exact
    threshold than mergekit's rounding error of the two (1e-6 of the threshold for ours)."""
    imp32, thr32 = _arcee_importance(x, b)
    imp64, thr64 = _arcee_importance(x.double(), b.double())
    replica = b + (x - b) * (imp32 >= thr32).float()
    gap = (imp64 - thr64).abs()
    noise = (imp32.double() - imp64).abs() + abs(float(thr32) - float(thr64)) + 1e-6 * abs(float(thr64))
    return (gap <= noise).reshape(-1).numpy(), replica


def _della_p(delta: np.ndarray, d: float, eps: float) -> np.ndarray:
    """DELLA's keep probability of each element: ranks of |delta| along dim 1 (a 1-D tensor is one row)."""
    rows = delta.reshape(1, -1) if delta.ndim == 1 else delta.reshape(delta.shape[0], delta.shape[1], -1)
    if delta.ndim == 1:
        rows = rows[:, :, None]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    q = ranks / max(1, rows.shape[1] - 1)
    return ((d - eps) + q * 2 * eps).reshape(-1)


def _check_random1(name: str, run: dict, ours: dict, mk: dict, base_m: dict, ft: dict) -> dict:
    params = _model_params(run["text"])[0]
    d, w, eps = float(params["density"]), float(params["weight"]), float(params.get("epsilon", 0.0))
    della = name.startswith("della")
    c = 1.0 if name == "della_1" else w
    out = {"z_max": {}, "kept": {}, "rescale_err": {}, "quintiles": {}}
    fails = []
    for tool, res in (("ours", ours), ("mk", mk)):
        zmax, kept, n_obs, rerr = 0.0, 0, 0, 0.0
        qk, qn, qe, qv = np.zeros(5), np.zeros(5), np.zeros(5), np.zeros(5)
        for tname in sorted(res):
            b = _np(base_m[tname]).reshape(-1)
            delta32 = (ft[tname] - base_m[tname])
            delta = _np(delta32).reshape(-1)
            o = _np(res[tname]).reshape(-1)
            observable = np.abs(delta) > 1e-6 * np.abs(b) + 1e-30  # kept deltas are visible next to the base
            m = (o != b)
            p = _della_p(_np(delta32), d, eps) if della else np.full(b.size, d)
            k_obs = int((m & observable).sum())
            mu = float(p[observable].sum())
            var = float((p * (1 - p))[observable].sum())
            z = (k_obs - mu) / math.sqrt(var) if var else 0.0
            zmax = max(zmax, abs(z))
            if abs(z) > Z:
                fails.append(f"{tool} {tname}: kept {k_obs} of {int(observable.sum())}, expected {mu:.1f} (z = {z:.1f})")
            kept += k_obs
            n_obs += int(observable.sum())
            full, kept_l1 = np.abs(delta).sum(), np.abs(delta * m).sum()
            s = full / kept_l1 if full >= 1e-7 and kept_l1 >= 1e-7 else 1.0
            want = b + c * s * delta
            ok = _within(o[m], want[m]) if m.any() else np.ones(0, bool)
            if not ok.all():
                fails.append(f"{tool} {tname}: {int((~ok).sum())} kept elements are not base + {c} * {s:.4f} * delta")
            if m.any():
                rerr = max(rerr, float(np.abs(o[m] - want[m]).max() / np.abs(want).max()))
            if della:
                q = np.minimum(4, ((p - (d - eps)) / (2 * eps) * 5).astype(int))
                for j in range(5):
                    sel = observable & (q == j)
                    qk[j] += (m & sel).sum()
                    qn[j] += sel.sum()
                    qe[j] += p[sel].sum()
                    qv[j] += (p * (1 - p))[sel].sum()
        out["z_max"][tool] = round(zmax, 2)
        out["kept"][tool] = round(kept / max(1, n_obs), 4)
        out["rescale_err"][tool] = rerr
        if della:
            rates = qk / np.maximum(qn, 1)
            out["quintiles"][tool] = [round(float(r), 3) for r in rates]
            out["quintiles"]["formula"] = [round(float(r), 3) for r in qe / np.maximum(qn, 1)]
            for j in range(5):
                zq = (qk[j] - qe[j]) / math.sqrt(qv[j])
                if abs(zq) > Z:
                    fails.append(f"{tool} quintile {j}: kept rate {rates[j]:.3f}, formula {qe[j] / qn[j]:.3f} (z = {zq:.1f})")
            if not all(rates[j] < rates[j + 1] for j in range(4)):
                fails.append(f"{tool}: keep rate by rank quintile does not rise: {rates}")
    out["fails"] = fails
    return out


def _check_random(run: dict, ours: dict, mk: dict, base_m: dict, fts: list[dict]) -> dict:
    weights = [float(p["weight"]) for p in _model_params(run["text"])]
    tmax = {"aligned": 0.0, "kept": 0.0}
    sums = {"ours": [0.0, 0], "mk": [0.0, 0]}
    fails = []
    for tname in sorted(mk):
        b = _np(base_m[tname]).reshape(-1)
        direction = np.sign(sum(w * (_np(f[tname]).reshape(-1) - b) for w, f in zip(weights, fts)))
        fa = {t: (_np(r[tname]).reshape(-1) - b) for t, r in (("ours", ours), ("mk", mk))}
        for stat, f in (("aligned", lambda x: x * direction), ("kept", lambda x: (x != 0).astype(float))):
            diff = f(fa["ours"]) - f(fa["mk"])
            ss = float((diff ** 2).sum())
            T = float(diff.sum()) / math.sqrt(ss) if ss else 0.0
            tmax[stat] = max(tmax[stat], abs(T))
            if abs(T) > Z:
                fails.append(f"{tname}: paired T of the {stat} merged delta = {T:.1f}")
        for t in ("ours", "mk"):
            sums[t][0] += float((fa[t] * direction).sum())
            sums[t][1] += int((fa[t] != 0).sum())
    return {"T_max": {k: round(v, 2) for k, v in tmax.items()},
            "aligned_ratio": round(sums["ours"][0] / sums["mk"][0], 4) if sums["mk"][0] else None,
            "nonzero_ratio": round(sums["ours"][1] / max(1, sums["mk"][1]), 4), "fails": fails}


def _compare(name: str, run: dict) -> dict:
    kind = run["kind"]
    ours, mk = load_model(run["ours"]), load_model(run["mk"])
    assert set(ours) == set(mk), f"tensor names differ: {sorted(set(ours) ^ set(mk))}"
    donor = {}
    for tool, folder in (("ours", run["ours"]), ("mergekit", run["mk"])):
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        run.setdefault("layers", {})[tool] = cfg["num_hidden_layers"]
        donor[tool] = cfg["rms_norm_eps"]
    assert run["layers"]["ours"] == run["layers"]["mergekit"], f"num_hidden_layers: {run['layers']}"
    if "\nbase_model:" in "\n" + run["text"]:  # config.json comes from base_model (else mergekit's choice is arbitrary)
        assert donor["ours"] == donor["mergekit"] == BASE_EPS, f"config.json not the base model's: {donor}"
    for t in (*ours.values(), *mk.values()):
        assert t.dtype == torch.float32
    base_m = load_model(run["inputs"]["base"])
    fts = [load_model(run["inputs"][k]) for k in ("ft1", "ft2", "ft3")]
    res = {"kind": kind, "tensors": len(mk), "layers": run["layers"]["ours"], "max_err": 0.0, "over_rel": 0, "bits": 0,
           "elements": 0, "bad": 0, "tie_ambiguous": 0, "tie_mismatches": 0, "tie_tensors": 0, "fails": []}
    if kind == "random1":
        res.update(_check_random1(name, run, ours, mk, base_m, fts[0]))
        return res
    if kind == "random":
        res.update(_check_random(run, ours, mk, base_m, [fts[i] for i in range(len(_model_params(run["text"])))]))
        return res
    method = parse_config(run["text"]).merge_method
    params = _model_params(run["text"]) if kind == "topk" else []
    for tname in sorted(mk):
        a32, b32 = ours[tname], mk[tname]
        assert a32.shape == b32.shape, tname
        a, b = _np(a32).reshape(-1), _np(b32).reshape(-1)
        nums = _exact_numbers(a, b, a32, b32)
        res["max_err"] = max(res["max_err"], nums["max_err"])
        res["over_rel"] += nums["over_rel"]
        res["bits"] += nums["bits"]
        res["elements"] += nums["n"]
        bad = ~_within(a, b)
        if kind == "topk" and method == "sce":
            base_np = _np(base_m[tname]).reshape(-1)
            tvs, var, k, amb = _sce_parts(base_m[tname], [f[tname] for f in fts], 0.4)
            res["tie_ambiguous"] += int(amb.sum())
            sel_a, sel_b = a != base_np, b != base_np
            if (sel_a != sel_b).any():  # mergekit chose other tied elements: its weights differ tensor-wide
                res["tie_tensors"] += 1
                res["tie_mismatches"] += int((sel_a != sel_b).sum())
                outside = (sel_a != sel_b) & ~amb
                if outside.any() or sel_a.sum() != sel_b.sum():
                    res["fails"].append(f"{tname}: selections differ outside the variance tie class "
                                        f"({int(outside.sum())} elements; kept {int(sel_a.sum())} vs {int(sel_b.sum())})")
                again = _within(_sce_formula(base_np, tvs, sel_b), b)
                if not again.all():
                    res["fails"].append(f"{tname}: mergekit's output is not SCE with its own selection "
                                        f"({int((~again).sum())} elements)")
                bad = np.zeros_like(bad)
        elif kind == "arcee":
            amb, replica = _arcee_band(base_m[tname], fts[1][tname])
            assert torch.equal(replica, b32), f"{tname}: mergekit's arcee_fusion is not reproduced in the test"
            res["tie_ambiguous"] += int(amb.sum())
            res["tie_mismatches"] += int((bad & amb).sum())
            res["tie_tensors"] += int((bad & amb).any())
            bad &= ~amb
        elif kind == "topk":
            amb = _topk_ambiguous(method, tname, _np(base_m[tname]).reshape(-1),
                                  [_np(f[tname]).reshape(-1) for f in fts[:len(params)]], params)
            res["tie_ambiguous"] += int(amb.sum())
            res["tie_mismatches"] += int((bad & amb).sum())
            res["tie_tensors"] += int((bad & amb).any())
            bad &= ~amb
        if bad.any():
            i = int(np.argmax(bad))
            res["fails"].append(f"{tname}: {int(bad.sum())} elements outside the rule (e.g. [{i}]: ours {a[i]!r}, "
                                f"mergekit {b[i]!r})")
        res["bad"] += int(bad.sum())
    return res


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(parity, name):
    run = parity[name]
    assert "mk_error" not in run, f"mergekit failed on {name}: {run['mk_error']}"
    assert "ours_error" not in run, f"dppa-stream failed on {name}: {run['ours_error']}"
    res = _compare(name, run)
    res["mk_seconds"] = run.get("mk_seconds")
    RESULTS[name] = res
    assert not res["fails"], f"{name}: " + "; ".join(res["fails"][:8])


def test_every_method_is_covered():
    covered = {parse_config(_fill(t, _paths("/x"))).merge_method for _, _, t in CONFIGS.values()}
    assert MERGEKIT_METHODS <= covered, MERGEKIT_METHODS - covered


def test_parity_summary(parity, tmp_path, capsys):
    """The per-config numbers (also written as JSON), printed whatever pytest's output options."""
    lines = [f"mergekit parity ({parity['_versions']['from']}: mergekit {parity['_versions']['mergekit']}, "
             f"torch {parity['_versions']['torch']}); rule |a-b| <= {REL:g}|b| + {FLOOR:g} max|b|",
             f"{'config':<30} {'kind':<8} {'max err/max':>11} {'>1e-5 rel':>9} {'bits':>6} {'elements':>8} "
             f"{'tie mism.':>9} {'distribution':<40}"]
    for name, r in RESULTS.items():
        if r["kind"] == "random1":
            q = r["quintiles"]
            dist = (f"kept {r['kept']['ours']}/{r['kept']['mk']} z<={max(r['z_max'].values())} "
                    f"rescale {max(r['rescale_err'].values()):.1e}")
            if q:
                dist += f" quint. ours {q['ours']} mk {q['mk']} formula {q['formula']}"
            lines.append(f"{name:<30} {r['kind']:<8} {'-':>11} {'-':>9} {'-':>6} {'-':>8} {'-':>9} {dist}")
        elif r["kind"] == "random":
            dist = (f"|T| aligned {r['T_max']['aligned']} kept {r['T_max']['kept']}; ratio mean {r['aligned_ratio']} "
                    f"nonzero {r['nonzero_ratio']}")
            lines.append(f"{name:<30} {r['kind']:<8} {'-':>11} {'-':>9} {'-':>6} {'-':>8} {'-':>9} {dist}")
        else:
            ties = f"{r['tie_mismatches']}/{r['tie_ambiguous']}" if r["kind"] in ("topk", "arcee") else "-"
            lines.append(f"{name:<30} {r['kind']:<8} {r['max_err']:>11.2e} {r['over_rel']:>9} {r['bits']:>6} "
                         f"{r['elements']:>8} {ties:>9} layers {r['layers']}")
    (tmp_path / "parity.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    with capsys.disabled():
        print("\n" + "\n".join(lines) + f"\n(JSON: {tmp_path / 'parity.json'})", file=sys.stderr)
