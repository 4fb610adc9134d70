"""Parity with mergekit 0.1.5 on vocabulary merging: the same YAML, on tiny float32 models with tiny
tokenizers (tests/vocab_models.py), through both tools; mergekit runs in its own virtualenv
through tests/mergekit_driver.py, as in test_mergekit_parity.py.

Every tensor must be equal bit for bit, except the padding rows of `pad_to_multiple_of` (mergekit
takes torch's float32 mean of the vocabulary rows, we accumulate in float64 and round once) and
`linear` merges (which already differ from mergekit's by float32 rounding, see
test_mergekit_parity.py): these must agree within that suite's rule,
|a - b| <= 1e-5 |b| + 1e-6 max|b|. The tokenizer files mergekit writes (tokenizer.json,
tokenizer_config.json, chat_template.jinja, ...) must be byte-identical, and config.json must give
the same vocab_size and layer count. The configs avoid what mergekit leaves to chance (it visits
the models in the order of a Python set): a model-less base, two models adding different tokens,
an `auto` chat template tied between models.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

pytest.importorskip("transformers")

from dppa_stream.config import parse_config  # noqa: E402
from dppa_stream.pipeline import MergeOptions, merge  # noqa: E402

from .reference import load_model  # noqa: E402
from .test_mergekit_parity import DRIVER, MK_FROM, MK_PYTHON  # noqa: E402
from .vocab_models import vocab_set  # noqa: E402

pytestmark = pytest.mark.skipif(MK_PYTHON is None, reason=MK_FROM)

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # as the driver runs mergekit (tokenizer_config records it)

CONFIGS = {
    # base rows, ft1's own regular token, <a> (three models: a mean in model order) and <b> (two)
    "union": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
  - model: {ft4}
    parameters: {{weight: 0.3}}
tokenizer_source: union
dtype: float32
""",
    # configured sources, forced tokens, an added token, padding, and the plurality chat template
    "tokens": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.2}}
  - model: {ft3}
    parameters: {{weight: 0.7}}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<a>": {{source: {ft1}, force: true}}
    "c": {{source: {{kind: zero}}, force: true}}
    "<new>": {{source: {{kind: model_token, model: {ft3}, token: "d"}}}}
    "b": {{source: {{kind: model_token, model: {base}, token_id: 5}}, force: true}}
chat_template: auto
dtype: float32
""",
    "base": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
tokenizer_source: base
dtype: float32
""",
    "model_source_linear": """merge_method: linear
base_model: {base}
models:
  - model: {ft2}
    parameters: {{weight: 0.4}}
  - model: {ft4}
    parameters: {{weight: 0.6}}
  - model: {base}
    parameters: {{weight: 1.0}}
tokenizer_source: {ft2}
dtype: float32
""",
    "slices": """merge_method: passthrough
base_model: {ft1}
slices:
  - sources:
      - {{model: {ft1}, layer_range: [0, 2]}}
  - sources:
      - {{model: {ft4}, layer_range: [1, 2]}}
tokenizer_source: union
dtype: float32
""",
}
PAD_ROWS = {"tokens": 26}  # rows from here on are padding
ROUNDED = {"model_source_linear"}  # linear: within float32 rounding everywhere


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokparity")
    models = vocab_set(str(root / "models"), torch.float32)
    jobs, out = [], {}
    for name, template in CONFIGS.items():
        path = root / f"{name}.yml"
        path.write_text(template.format(**models))
        out[name] = {"cfg": str(path), "ours": str(root / "ours" / name), "mk": str(root / "mk" / name)}
        jobs.append({"config": str(path), "out": out[name]["mk"], "seed": 0})
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "ours").mkdir()
    env = dict(os.environ, PYTHONHASHSEED="0", **ENV)
    env.pop("PYTHONPATH", None)
    with open(root / "mk.log", "w") as log:
        driver = subprocess.Popen([MK_PYTHON, DRIVER, str(root / "jobs.json"), str(root / "results.json")], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        for name, run in out.items():
            merge(parse_config(open(run["cfg"]).read(), run["cfg"]), run["ours"], MergeOptions(quiet=True))
        driver.wait(timeout=900)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if driver.poll() is None:
            driver.kill()
    results = json.loads((root / "results.json").read_text())
    assert results.get("mergekit") == "0.1.5", results
    for job in results["jobs"]:
        assert job["ok"], job["error"]
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors(runs, name):
    ours, theirs = load_model(runs[name]["ours"]), load_model(runs[name]["mk"])
    assert set(ours) == set(theirs)
    for t, want in theirs.items():
        got = ours[t]
        assert got.shape == want.shape and got.dtype == want.dtype, t
        pad = PAD_ROWS.get(name) if t in ("model.embed_tokens.weight", "lm_head.weight") else None
        if name in ROUNDED:
            pad = 0
        if pad is not None:
            close = (got[pad:] - want[pad:]).abs() <= 1e-5 * want[pad:].abs() + 1e-6 * want.abs().max()
            assert bool(close.all()), f"{t}: {int((~close).sum())} elements beyond float32 rounding"
            got, want = got[:pad], want[:pad]
        assert torch.equal(got, want), f"{t}: {int((got != want).sum())} elements differ"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tokenizer_files_and_config(runs, name):
    ours, theirs = runs[name]["ours"], runs[name]["mk"]
    written = sorted(f for f in os.listdir(theirs) if f.startswith(("tokenizer", "special_tokens", "chat_template",
                                                                     "added_tokens", "vocab", "merges")))
    assert "tokenizer.json" in written
    for f in written:
        with open(os.path.join(ours, f), "rb") as a, open(os.path.join(theirs, f), "rb") as b:
            assert a.read() == b.read(), f
    assert not [f for f in os.listdir(ours) if f.startswith("tokenizer") and f not in written]
    with open(os.path.join(ours, "config.json")) as a, open(os.path.join(theirs, "config.json")) as b:
        a, b = json.load(a), json.load(b)
    assert (a["vocab_size"], a["num_hidden_layers"]) == (b["vocab_size"], b["num_hidden_layers"])
