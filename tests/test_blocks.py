"""dppa_stream.blocks: which tensors are DP's block linears, on tiny checkpoints of many Hugging Face
architectures written by `save_pretrained` (names and shapes read back from the files), on the
in-memory (transformers v5) names, and on hand-written name lists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from math import prod

import pytest

from dppa_stream.blocks import KINDS, find_blocks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

T = transformers


def _dec(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, **kw)


_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
_QWEN2VL_VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3)

BUILDERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_dec())),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_dec())),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_dec())),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_dec(pad_token_id=0))),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_dec(head_dim=8))),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**_dec(num_local_experts=4, num_experts_per_tok=2))),
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(**_dec(num_local_experts=4, num_experts_per_tok=2,
                                                                 head_dim=8))),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_dec(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32))),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)),
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=64, max_position_embeddings=32)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                          num_decoder_layers=2, num_heads=4, vocab_size=64)),
    "llava": lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=_CLIP, text_config=dict(model_type="llama", **_dec()), image_token_index=63)),
    "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
        vision_config=_QWEN2VL_VISION,
        text_config=_dec(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}))),
}

_ATTN = {"q", "k", "v", "o"}
_GLU = {"gate", "up", "down"}
# arch -> ({stack: linears per block}, router suffixes, kinds in the blocks), for the names
# save_pretrained writes. Each stack has blocks [0, 1].
SAVED = {
    "llama": ({"model.layers": 7}, [], _ATTN | _GLU),
    "qwen2": ({"model.layers": 7}, [], _ATTN | _GLU),
    "mistral": ({"model.layers": 7}, [], _ATTN | _GLU),
    "phi3": ({"model.layers": 4}, [], {"qkv", "o", "gate_up", "down"}),
    "gemma2": ({"model.layers": 7}, [], _ATTN | _GLU),
    # this transformers writes Mixtral's experts one by one (experts.N.w1/w2/w3)
    "mixtral": ({"model.layers": 4 + 3 * 4}, ["block_sparse_moe.gate.weight"],
                _ATTN | {"expert_gate_up", "expert_down"}),
    # GPT-OSS: 3-D fused experts, 2-D expert biases (left dense)
    "gpt_oss": ({"model.layers": 4 + 2 * 4}, ["mlp.router.weight"], _ATTN | {"expert_gate_up", "expert_down"}),
    "qwen2_moe": ({"model.layers": 4 + 3 * 4 + 3}, ["mlp.gate.weight", "mlp.shared_expert_gate.weight"],
                  _ATTN | _GLU | {"expert_gate_up", "expert_down"}),
    "gpt2": ({"transformer.h": 4}, [], {"qkv", "o", "fc_in", "fc_out"}),
    "bert": ({"encoder.layer": 6}, [], _ATTN | {"fc_in", "fc_out"}),
    "t5": ({"decoder.block": 4 + 4 + 2, "encoder.block": 4 + 2}, [], _ATTN | {"fc_in", "fc_out"}),
    "llava": ({"language_model.model.layers": 7, "vision_tower.encoder.layers": 6}, [],
              _ATTN | _GLU | {"fc_in", "fc_out"}),
    "qwen2_vl": ({"model.layers": 7, "visual.blocks": 4}, [], _ATTN | _GLU | {"qkv", "fc_in", "fc_out"}),
}
# The names of the in-memory state dict (transformers v5's own layout), where they differ.
IN_MEMORY = {
    "mixtral": ({"model.layers": 4 + 2 * 4}, ["mlp.gate.weight"], _ATTN | {"expert_gate_up", "expert_down"}),
    "gpt_oss": SAVED["gpt_oss"],
    "qwen2_moe": ({"model.layers": 4 + 2 * 4 + 3}, ["mlp.gate.weight", "mlp.shared_expert_gate.weight"],
                  _ATTN | _GLU | {"expert_gate_up", "expert_down"}),
    "llava": ({"model.language_model.layers": 7, "model.vision_tower.encoder.layers": 6}, [],
              _ATTN | _GLU | {"fc_in", "fc_out"}),
    "qwen2_vl": ({"model.language_model.layers": 7, "model.visual.blocks": 4}, [],
                 _ATTN | _GLU | {"qkv", "fc_in", "fc_out"}),
}
# Never pruned: biases, norms, embedding tables (T5's relative_attention_bias too).
_DENSE = re.compile(r"bias$|norm|(?:^|\.)ln_|embed|relative_attention_bias")
# Outside every block; must stay dense.
_OUTSIDE = re.compile(r"embed|lm_head|pooler|projector|merger|patch|(?:^|\.)shared\.|wte|wpe|(?:^|\.)norm\.")


def _build(arch: str):
    try:
        torch.manual_seed(0)
        return BUILDERS[arch]()
    except AttributeError as e:  # an architecture this transformers does not have
        pytest.skip(f"{arch}: {e}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(arch) -> (tensor name -> shape in file order, config.json), written by save_pretrained."""
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = root / arch
            _build(arch).save_pretrained(folder)  # safetensors by default
            tensors = {}
            for f in sorted(os.listdir(folder)):
                if f.endswith(".safetensors"):
                    with safe_open(str(folder / f), framework="pt") as s:
                        for n in s.keys():
                            tensors[n] = tuple(s.get_slice(n).get_shape())
            with open(folder / "config.json") as f:
                cache[arch] = (tensors, json.load(f))
        return cache[arch]

    return get


def _check(tensors: dict, config: dict | None, spec) -> None:
    stacks, router_suffixes, kinds = spec
    bm = find_blocks(tensors, config)

    # stacks: each its own, in order of first appearance, blocks 0 and 1
    assert sorted(s.name for s in bm.stacks) == sorted(stacks)
    first = {s: min(i for i, n in enumerate(tensors) if n.startswith(s + ".")) for s in stacks}
    assert [s.name for s in bm.stacks] == sorted(stacks, key=first.get)
    assert all(s.blocks == [0, 1] for s in bm.stacks)

    # routers
    routers = [n for n in tensors if any(n.endswith("." + r) for r in router_suffixes)]
    assert len(routers) == 2 * len(router_suffixes)
    assert bm.routers == routers

    # exactly the block weights with >= 2 dims, minus biases / norms / embeddings / routers
    expected = {n for n, sh in tensors.items()
                if len(sh) >= 2 and any(n.startswith(s + ".") for s in stacks)
                and not _DENSE.search(n) and n not in routers}
    by_tensor = bm.by_tensor()
    assert set(by_tensor) == expected
    assert not [n for n in by_tensor if _OUTSIDE.search(n)]

    # linears per block, kinds, and spans tiling each tensor exactly (fused experts: one per expert)
    counts = {(s, b): 0 for s in stacks for b in (0, 1)}
    for lin in bm.linears:
        counts[bm.block_key(lin)] += 1
        assert lin.kind in KINDS
        assert lin.tensor.startswith(f"{lin.stack}.{lin.block}.")
    assert counts == {(s, b): n for s in stacks for b in (0, 1) for n in [stacks[s]]}
    assert {lin.kind for lin in bm.linears} == kinds
    for name, lins in by_tensor.items():
        shape = tensors[name]
        assert lins[0].span[0] == 0 and lins[-1].span[1] == prod(shape)
        assert all(a.span[1] == b.span[0] for a, b in zip(lins, lins[1:]))
        assert all(prod(lin.shape) == lin.numel for lin in lins)
        if len(shape) == 3:
            assert len(lins) == shape[0] and all(lin.shape == shape[1:] for lin in lins)
            assert [lin.label[-3:] for lin in lins] == [f"[{e}]" for e in range(shape[0])]
        else:
            assert len(lins) == 1 and lins[0].shape == shape
    # deterministic order: stack, block, tensor order, expert
    order = {s.name: i for i, s in enumerate(bm.stacks)}
    names = list(tensors)
    keys = [(order[lin.stack], lin.block, names.index(lin.tensor), lin.span[0]) for lin in bm.linears]
    assert keys == sorted(keys)


@pytest.mark.parametrize("arch", list(SAVED))
def test_saved_checkpoint(arch, saved):
    tensors, config = saved(arch)
    _check(tensors, config, SAVED[arch])


@pytest.mark.parametrize("arch", list(IN_MEMORY))
@pytest.mark.parametrize("with_config", [True, False])
def test_in_memory_names(arch, with_config):
    """transformers v5's own layout (3-D fused experts for Mixtral and Qwen2-MoE, model.language_model /
    model.vision_tower), with config.json's expert count and from the names alone."""
    model = _build(arch)
    tensors = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    _check(tensors, model.config.to_dict() if with_config else None, IN_MEMORY[arch])


def test_t5_stacks_and_labels(saved):
    tensors, config = saved("t5")
    bm = find_blocks(tensors, config)
    wi = next(lin for lin in bm.linears if lin.tensor == "encoder.block.1.layer.1.DenseReluDense.wi.weight")
    assert (wi.stack, wi.block, wi.label, wi.kind) == ("encoder.block", 1, "layer.1.DenseReluDense.wi", "fc_in")
    assert {bm.block_key(lin) for lin in bm.linears} == {(s, b) for s in ("encoder.block", "decoder.block")
                                                          for b in (0, 1)}


def test_gpt_oss_labels(saved):
    tensors, config = saved("gpt_oss")
    lins = find_blocks(tensors, config).by_tensor()["model.layers.1.mlp.experts.gate_up_proj"]
    e, a, b = tensors["model.layers.1.mlp.experts.gate_up_proj"]
    assert [lin.label for lin in lins] == [f"mlp.experts.gate_up_proj[{i}]" for i in range(e)]
    assert [lin.span for lin in lins] == [(i * a * b, (i + 1) * a * b) for i in range(e)]
    assert all(lin.kind == "expert_gate_up" for lin in lins)


# -- linear_filter ------------------------------------------------------------------------------

def _t5_names() -> dict:
    t = {}
    for side in ("encoder", "decoder"):
        for b in range(2):
            p = f"{side}.block.{b}.layer."
            for x in "qkvo":
                t[p + f"0.SelfAttention.{x}.weight"] = (8, 8)
            if b == 0:
                t[p + "0.SelfAttention.relative_attention_bias.weight"] = (32, 2)
            t[p + "0.layer_norm.weight"] = (8,)
            t[p + "1.DenseReluDense.wi.weight"] = (16, 8)
            t[p + "1.DenseReluDense.wo.weight"] = (8, 16)
    t["shared.weight"] = (64, 8)
    return t


def test_filter_keeps_stacks_apart_and_is_literal():
    t = _t5_names()
    bm = find_blocks(t, linear_filter=r"(?:^|\.)block\.(\d+)\.")
    assert [(s.name, s.blocks) for s in bm.stacks] == [("encoder.block", [0, 1]), ("decoder.block", [0, 1])]
    # the filter is taken literally: every >= 2-D match is a linear, the relative bias table included
    assert set(bm.by_tensor()) == {n for n, sh in t.items() if len(sh) == 2 and n != "shared.weight"}
    lin = bm.by_tensor()["decoder.block.1.layer.1.DenseReluDense.wo.weight"][0]
    assert (lin.stack, lin.block, lin.label, lin.kind) == ("decoder.block", 1, "layer.1.DenseReluDense.wo", "fc_out")
    # detection alone leaves the relative bias table dense
    assert len(find_blocks(t).by_tensor()) == len(bm.by_tensor()) - 2


def test_filter_without_group_uses_detected_block_or_block_0():
    t = {"model.layers.0.mlp.up_proj.weight": (8, 4), "model.layers.3.self_attn.q_proj.weight": (4, 4),
         "model.layers.3.mlp.up_proj.weight": (8, 4), "lm_head.weight": (10, 4), "model.norm.weight": (4,)}
    bm = find_blocks(t, linear_filter=r"up_proj|lm_head")
    assert [(lin.tensor, lin.stack, lin.block) for lin in bm.linears] == [
        ("model.layers.0.mlp.up_proj.weight", "model.layers", 0),
        ("model.layers.3.mlp.up_proj.weight", "model.layers", 3),
        ("lm_head.weight", "up_proj|lm_head", 0)]
    assert [(s.name, s.blocks) for s in bm.stacks] == [("model.layers", [0, 3]), ("up_proj|lm_head", [0])]


def test_filter_group_1_must_be_decimal():
    t = {"model.layers.first.mlp.up_proj.weight": (8, 4)}
    with pytest.raises(ValueError) as e:
        find_blocks(t, linear_filter=r"(?:^|\.)layers\.([^.]+)\.")
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.first.mlp.up_proj.weight" in msg and "'first'" in msg
    # an optional group 1 that did not take part falls back to detection
    t = {"model.layers.2.mlp.up_proj.weight": (8, 4)}
    assert find_blocks(t, linear_filter=r"(?:blocks\.(\d+)\.)?up_proj").linears[0].block == 2


def test_filter_reports_routers_and_splits_experts():
    t = {"model.layers.0.mlp.router.weight": (4, 8), "model.layers.0.mlp.experts.down_proj": (4, 16, 8)}
    bm = find_blocks(t, linear_filter=r"experts")
    assert bm.routers == ["model.layers.0.mlp.router.weight"]
    assert [lin.span for lin in bm.linears] == [(i * 128, (i + 1) * 128) for i in range(4)]


# -- nothing found -----------------------------------------------------------------------------

def test_nothing_found_names_tensors_and_suggests_a_filter():
    t = {"net.stem.weight": (8, 3, 3, 3), "net.stages.0.conv.weight": (8, 8), "net.stages.0.conv.bias": (8,),
         "net.stages.1.conv.weight": (8, 8), "net.stages.2.conv.weight": (8, 8), "net.stages.3.conv.weight": (8, 8),
         "head.weight": (10, 8)}
    with pytest.raises(ValueError) as e:
        find_blocks(t)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'net.stages.0.conv.weight', 'net.stages.1.conv.weight', 'net.stages.2.conv.weight'" in msg
    suggestion = re.search(r"e\.g\. linear_filter: '(.*)'$", msg).group(1)  # YAML: no escapes
    assert suggestion == r"(?:^|\.)stages\.(\d+)\."
    bm = find_blocks(t, linear_filter=suggestion)  # the suggestion works
    assert [(s.name, s.blocks) for s in bm.stacks] == [("net.stages", [0, 1, 2, 3])]

    with pytest.raises(ValueError, match=r"^no tensor with >= 2 dimensions matches linear_filter 'nope'; .*'net.stages.0.conv.weight'"):
        find_blocks(t, linear_filter="nope")
    with pytest.raises(ValueError, match="^no transformer-block linear found.*no tensor has >= 2 dimensions"):
        find_blocks({"a.weight": (3,)})
    # no indexed names at all: the examples and a filter that matches them
    with pytest.raises(ValueError) as e:
        find_blocks({"enc.a.weight": (4, 4), "enc.b.weight": (4, 4)})
    assert "'enc.a.weight', 'enc.b.weight'" in str(e.value) and r"'^enc\.'" in str(e.value)


# -- detection details on hand-written names -----------------------------------------------------

def test_outermost_stack_no_prefix_and_numeric_block_order():
    t = {"h.10.attn.c_attn.weight": (4, 12), "h.2.attn.c_attn.weight": (4, 12), "h.2.ln_1.weight": (4,),
         "encoder.block.3.layer.1.DenseReluDense.wi.weight": (16, 4),
         "vision.blocks.0.attn.qkv.weight": (12, 4), "text.layers.0.mlp.gate_proj.weight": (8, 4)}
    bm = find_blocks(t)
    assert [(s.name, s.blocks) for s in bm.stacks] == [("h", [2, 10]), ("encoder.block", [3]),
                                                       ("vision.blocks", [0]), ("text.layers", [0])]
    assert [lin.tensor for lin in bm.linears][:2] == ["h.2.attn.c_attn.weight", "h.10.attn.c_attn.weight"]


def test_routers_versus_gate_proj():
    base = {"model.layers.0.mlp.gate_proj.weight": (4, 8), "model.layers.0.mlp.gate.weight": (4, 8)}
    # no MoE anywhere: `mlp.gate` is a linear
    assert find_blocks(base).routers == []
    assert find_blocks(base, {"num_experts": 8}).routers == []  # wrong expert count: a linear
    # config.json's expert count decides, gate_proj stays a linear even with a matching first dim
    bm = find_blocks(base, {"text_config": {"num_local_experts": 4}})
    assert bm.routers == ["model.layers.0.mlp.gate.weight"]
    assert [lin.kind for lin in bm.linears] == ["gate"]
    # without config: a `gate` in a block that has experts
    moe = {**base, "model.layers.0.mlp.experts.0.w1.weight": (16, 8)}
    assert find_blocks(moe).routers == ["model.layers.0.mlp.gate.weight"]


def test_config_expert_count_splits_unnamed_and_2d_fused_experts():
    t = {"model.layers.0.mlp.w_in": (4, 8, 16), "model.layers.0.conv.weight": (8, 2, 3, 3)}
    assert len(find_blocks(t).linears) == 2  # one linear each without an expert count
    bm = find_blocks(t, {"num_experts": 4})
    assert [(lin.label, lin.span, lin.shape) for lin in bm.linears] == [
        *((f"mlp.w_in[{i}]", (i * 128, (i + 1) * 128), (8, 16)) for i in range(4)),
        ("conv", (0, 144), (8, 18))]
    # DBRX: experts stored 2-D as [E * ffn, d]; split when config.json gives E
    t = {"transformer.blocks.0.ffn.experts.mlp.w1": (4 * 6, 8), "transformer.blocks.0.ffn.router.layer.weight": (4, 8)}
    bm = find_blocks(t, {"ffn_config": {"moe_num_experts": 4}})
    assert bm.routers == ["transformer.blocks.0.ffn.router.layer.weight"]
    assert [(lin.span, lin.shape, lin.kind) for lin in bm.linears] == [
        ((i * 48, (i + 1) * 48), (6, 8), "expert_gate_up") for i in range(4)]


def test_fast_on_100k_names():
    t = {}
    for i in range(420):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = (64, 64)
        t[p + "mlp.gate.weight"] = (60, 64)
        for e in range(60):
            for w in ("gate_proj", "up_proj", "down_proj"):
                t[p + f"mlp.experts.{e}.{w}.weight"] = (32, 64)
            t[p + f"mlp.experts.{e}.down_proj.bias"] = (64,)
    assert len(t) > 100_000
    start = time.perf_counter()
    bm = find_blocks(t, {"num_experts": 60})
    assert time.perf_counter() - start < 10  # ~0.5 s on a slow 2-core machine
    assert len(bm.linears) == 420 * (4 + 180) and len(bm.routers) == 420


def test_does_not_import_torch():
    path = os.path.join(os.path.dirname(__file__), "..", "dppa_stream", "blocks.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('blocks', {path!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['blocks'] = m; spec.loader.exec_module(m)\n"
            "m.find_blocks({'model.layers.0.mlp.up_proj.weight': (4, 4)})\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_layer_heads_per_distinct_start_are_each_names_own():
    """`_heads` runs the head regex once per distinct start of a name: the same heads as a match
    per name (the reference), for names whose head lies past the first starts, names without
    one, newlines and names that are prefixes of one another."""
    import random

    from dppa_stream.blocks import _HEAD_RE, _heads

    rng = random.Random(1)
    parts = ["model", "layers", "h", "layer", "block", "blocks", "language_model", "x" * 30, "7", "123", "0", "",
             "a.b", "mlp", "experts", "w\n", "layers."]
    names = [f"model.language_model.layers.{i}.mlp.experts.{j}.w" for i in range(12) for j in range(40)]
    names += [f"{'p' * 40}.layers.{i}.w" for i in range(3)] + ["model.embed_tokens.weight", "lm_head.weight"]
    for _ in range(3000):
        name = ".".join(rng.choice(parts) if rng.random() < 0.8 else str(rng.randint(0, 300))
                        for _ in range(rng.randint(1, 9)))
        names += [name, name + ".weight"]
    assert _heads(names) == [_HEAD_RE.match(n).group() for n in names]
