"""Slice merges write a config.json that loads: the layer count and every per-layer setting follow
the stacked layers (output layer k takes the settings of the source layer it came from), for
architectures whose configs carry per-layer lists (Gemma 3's sliding-window pattern, gpt-oss's
layer types, the hybrid Qwen3-Next and LFM2), and a stack a config cannot describe (Jamba's
periodic attention layers, a MoE model's first dense layers out of place) is refused before
anything is written. The outputs are loaded with transformers: no missing or unexpected weights,
every layer holds its source layer's weights, and a forward pass runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

T = pytest.importorskip("transformers")

from dppa_stream.errors import UsageError  # noqa: E402
from dppa_stream.hf_files import relayer  # noqa: E402

from .reference import load_model  # noqa: E402


def _dec(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **kw)


ARCHS = {  # name -> (model, slices as (first, stop) layer ranges of the same model)
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_dec(head_dim=8, num_hidden_layers=3,
                                                                      sliding_window_pattern=2, sliding_window=16))),
               [(0, 3), (1, 3)]),  # 3 -> 5 layers
    "gpt_oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(**_dec(head_dim=8, num_hidden_layers=2, num_local_experts=4,
                                                                  num_experts_per_tok=2))),
                [(0, 2), (1, 2)]),  # 2 -> 3 layers
    "qwen3_next": (lambda: T.Qwen3NextForCausalLM(T.Qwen3NextConfig(**_dec(
        head_dim=8, num_hidden_layers=4, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, full_attention_interval=2))),
        [(0, 4), (1, 3)]),  # linear, full, linear, full + full, linear: no longer periodic
    "lfm2": (lambda: T.Lfm2ForCausalLM(T.Lfm2Config(**_dec(num_hidden_layers=4, full_attn_idxs=[1, 3]))),
             [(0, 4), (1, 3)]),
}


def _slices_yaml(model: str, ranges) -> str:
    body = "".join(f"  - sources:\n      - {{model: {model}, layer_range: [{a}, {b}]}}\n" for a, b in ranges)
    return f"merge_method: passthrough\nslices:\n{body}"


def _merge(tmp_path, text: str):
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(cfg), str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_slice_merge_loads_with_its_layers_settings(tmp_path, arch):
    build, ranges = ARCHS[arch]
    torch.manual_seed(0)
    src = str(tmp_path / arch)
    build().save_pretrained(src)
    res = _merge(tmp_path, _slices_yaml(src, ranges))
    assert res.returncode == 0, res.stderr
    out = str(tmp_path / "out")
    sources = [layer for a, b in ranges for layer in range(a, b)]  # output layer k <- source layer sources[k]
    src_cfg = T.AutoConfig.from_pretrained(src)
    got_cfg = T.AutoConfig.from_pretrained(out)
    assert got_cfg.num_hidden_layers == len(sources)
    assert got_cfg.layer_types == [src_cfg.layer_types[layer] for layer in sources]
    model, info = T.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    src_w, out_w = load_model(src), load_model(out)
    for k, layer in enumerate(sources):
        for name, w in src_w.items():
            if f".layers.{layer}." in name:
                assert torch.equal(out_w[name.replace(f".layers.{layer}.", f".layers.{k}.")], w), (k, name)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_a_stack_the_config_cannot_describe_is_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    src = str(tmp_path / "jamba")
    T.JambaForCausalLM(T.JambaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=64, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                                     expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4,
                                     mamba_dt_rank=4, mamba_expand=1)).save_pretrained(src)
    res = _merge(tmp_path, _slices_yaml(src, [(0, 4), (1, 3)]))  # attention layers 1, 3, 4: not periodic
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "cannot be described" in res.stderr
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
    res = _merge(tmp_path, _slices_yaml(src, [(0, 4), (0, 2)]))  # the period holds: fine
    assert res.returncode == 0, res.stderr
    model, info = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_hidden_layers == 6


# --- the per-layer rules, on raw configs -------------------------------------------------------------


def test_lists_index_lists_and_strings_follow_the_layers():
    donor = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "mlp_only_layers": [0, 3],
             "hybrid_override_pattern": "M*M-", "rope_scaling": {"long_factor": [1.0, 2.0, 3.0, 4.0]},
             "no_rope_layers": [1, 0, 1, 0]}
    out = relayer(donor, [(donor, 3), (donor, 0), (donor, 1), (donor, 3), (donor, 2)])
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["d", "a", "b", "d", "c"]
    assert out["mlp_only_layers"] == [0, 1, 3]
    assert out["hybrid_override_pattern"] == "-M*-M"
    assert out["no_rope_layers"] == [0, 1, 0, 0, 1]
    assert out["rope_scaling"] == donor["rope_scaling"]  # a list of the layer count's length, but not per layer
    other = dict(donor, layer_types=["w", "x", "y", "z"])
    assert relayer(donor, [(donor, 0), (other, 0)])["layer_types"] == ["a", "w"]  # from each layer's own model


def test_nested_text_config():
    donor = {"text_config": {"num_hidden_layers": 2, "layer_types": ["s", "f"]}, "vision_config": {"num_hidden_layers": 9}}
    out = relayer(donor, [(donor, 1), (donor, 1), (donor, 0)])
    assert out["text_config"] == {"num_hidden_layers": 3, "layer_types": ["f", "f", "s"]}
    assert out["vision_config"] == {"num_hidden_layers": 9}


def test_moe_patterns():
    ds = {"num_hidden_layers": 4, "first_k_dense_replace": 2}
    assert relayer(ds, [(ds, 0), (ds, 1), (ds, 1), (ds, 3)])["first_k_dense_replace"] == 3  # re-set: still a prefix
    with pytest.raises(UsageError, match="first_k_dense_replace"):
        relayer(ds, [(ds, 3), (ds, 0)])  # a dense layer after a MoE layer
    qw = {"num_hidden_layers": 4, "decoder_sparse_step": 2}
    relayer(qw, [(qw, 0), (qw, 1), (qw, 0), (qw, 1)])
    with pytest.raises(UsageError, match="decoder_sparse_step"):
        relayer(qw, [(qw, 1), (qw, 0)])
    with pytest.raises(UsageError, match="layer_types"):
        relayer({"num_hidden_layers": 2, "layer_types": ["a", "b"]}, [({"num_hidden_layers": 2}, 0)])


def test_config_json_of_a_slice_merge(tmp_path):
    """The synthetic Llama set has no per-layer lists: only the layer count changes."""
    from dppa_stream.synthetic import LlamaShape, write_llama_set

    base = write_llama_set(str(tmp_path / "m"), LlamaShape(hidden=16, intermediate=24, layers=3, vocab=32), 0)[0]
    res = _merge(tmp_path, _slices_yaml(base, [(0, 3), (2, 3)]))
    assert res.returncode == 0, res.stderr
    with open(os.path.join(base, "config.json")) as f:
        want = dict(json.load(f), num_hidden_layers=4)
    with open(tmp_path / "out" / "config.json") as f:
        got = json.load(f)
    assert got == dict(want, torch_dtype=got["torch_dtype"])
