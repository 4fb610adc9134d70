"""End to end with Hugging Face transformers: checkpoints written by `save_pretrained` (sharded, with an
index) go through the CLI, and the merged folder loads with `from_pretrained` and computes exactly the
logits of a model holding the in-memory reference merge."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from .reference import load_model, reference_merge  # noqa: E402
from .reference_dppa import dppa_merge  # noqa: E402

SHARD = "50KB"  # the tiny model (~180 KB in bf16) spans several shards
ATTN = "eager"  # the same attention kernel on both sides of the comparison


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                       attn_implementation=ATTN)


def _new_model(dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-init model whose parameters (only) are in `dtype`, as from_pretrained builds it:
    `model.to(dtype)` would also round the float32 rotary buffers and change the logits."""
    model = LlamaForCausalLM(_config())
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _heavy_tailed(shape, g: torch.Generator) -> torch.Tensor:
    """Student-t (3 dof) noise: outliers for DPPA's outlier ratios, like real fine-tune deltas."""
    z = torch.randn(shape, generator=g)
    chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(3))
    return z / torch.sqrt(chi2 / 3)


def _model(delta_seed: int | None) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same random init every time: the base
    model = _new_model(torch.bfloat16)
    if delta_seed is not None:
        g = torch.Generator().manual_seed(delta_seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                d = 0.004 * _heavy_tailed(p.shape, g)
                p.copy_((p.float() + d).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def hf_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = []
    for name, seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        path = str(root / name)
        _model(seed).save_pretrained(path, max_shard_size=SHARD)
        paths.append(path)
    base = paths[0]
    shards = [f for f in os.listdir(base) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(os.path.join(base, "model.safetensors.index.json"))
    return paths


def _run_cli(cfg_text: str, folder) -> str:
    cfg = folder / "merge.yml"
    cfg.write_text(cfg_text)
    out = folder / "out"
    proc = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(cfg), str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(out)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(out: str):
    """from_pretrained, failing on any missing / unexpected / mismatched key or its warning."""
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation=ATTN)
    finally:
        logger.removeHandler(handler)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info[key]}"
    words = ("load report", "missing", "unexpected", "newly initialized", "not initialized", "not used", "mismatch")
    bad = [m for m in handler.messages if any(w in m.lower() for w in words)]
    assert not bad, bad
    return model.eval()


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (3, 17), generator=g)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_batch()).logits


def _reference_model(merged: dict, dtype: torch.dtype) -> LlamaForCausalLM:
    model = _new_model(dtype)
    model.load_state_dict(merged, strict=True)
    return model.eval()


def _check(out: str, merged: dict, base: str):
    got = _load(out)
    assert isinstance(got, LlamaForCausalLM)
    # the weights themselves, then what a user sees: the logits
    sd = got.state_dict()
    assert set(sd) == set(merged)
    for k, v in merged.items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), k
    want = _reference_model(merged, got.dtype)
    a, b = _logits(got), _logits(want)
    assert torch.equal(a, b), f"max |diff| {float((a.float() - b.float()).abs().max())}"
    # and the merge changed the model
    assert not torch.equal(a, _logits(_load(base)))


def test_ties_loads_and_matches_reference(tmp_path, hf_set):
    base, ft1, ft2 = hf_set
    out = _run_cli(f"""merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.3}}
""", tmp_path)
    merged = reference_merge("ties", base, [ft1, ft2], [0.5, 0.5], [0.3, 0.3])
    _check(out, merged, base)


def test_dppa_loads_and_matches_reference(tmp_path, hf_set):
    base, ft1, ft2 = hf_set
    out = _run_cli(f"""merge_method: dppa
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
""", tmp_path)
    merged = dppa_merge(load_model(base), [load_model(ft1), load_model(ft2)], [0.9, 0.8],
                        [[1.8, 0.0], [1.8, 0.0]], [1.0, 1.0])
    _check(out, merged, base)
