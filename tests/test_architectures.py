"""DPPA with the default config on architectures beyond Llama: every block linear (each expert of a
fused expert tensor on its own) is pruned, nothing else is, every stack keeps its own blocks, and
`merge` reports the linears whose density DP had to clamp."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dppa_stream.blocks import find_blocks
from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.stats_report import collect_stats

from .reference import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
T = transformers


def _dec(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, **kw)


ARCHS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=32)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                          num_decoder_layers=3, num_heads=4, vocab_size=64)),
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(**_dec(num_local_experts=4, num_experts_per_tok=2, head_dim=8))),
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=64, max_position_embeddings=32)),
}


def _write_set(root, arch: str) -> list[str]:
    """A base saved by transformers and two fine-tunes: the base plus heavy-tailed noise."""
    torch.manual_seed(0)
    model = ARCHS[arch]()
    paths = []
    for i in range(3):
        folder = root / f"{arch}-{i}"
        model.save_pretrained(folder)
        paths.append(str(folder))
        if i == 0:
            base = {k: v.clone() for k, v in load_model(str(folder)).items()}
        g = torch.Generator().manual_seed(i + 1)
        sd = {}
        for k, v in base.items():
            noise = torch.randn(v.shape, generator=g) * torch.rand(v.shape, generator=g) ** 4 * 1e-2
            sd[k] = (v.float() + noise).to(v.dtype) if v.is_floating_point() else v
        if i > 0:
            from safetensors.torch import save_file

            for f in os.listdir(folder):
                if f.endswith(".safetensors"):
                    os.remove(folder / f)
            save_file(sd, str(folder / "model.safetensors"), {"format": "pt"})
    return paths


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_set(request, tmp_path_factory):
    return request.param, _write_set(tmp_path_factory.mktemp(request.param), request.param)


def test_default_config_prunes_every_block_linear(tmp_path, arch_set):
    arch, (base, ft1, ft2) = arch_set
    cfg = parse_config(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
                       "parameters: {amplification: [1.0, 1.0]}\nout_dtype: float32\n")
    res = merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))
    got, b = load_model(str(tmp_path / "out")), load_model(base)
    f1, f2 = load_model(ft1), load_model(ft2)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    found = find_blocks({k: tuple(v.shape) for k, v in b.items() if v.is_floating_point()}, config)
    assert found.linears
    spans = found.by_tensor()
    for name, t in got.items():
        if not t.is_floating_point():
            continue
        changed = (t - b[name].float()).reshape(-1) != 0
        moved = ((f1[name].float() - b[name].float()) != 0).reshape(-1) | ((f2[name].float() - b[name].float()) != 0).reshape(-1)
        if name in spans:  # each linear (each expert) pruned to about 20 % (rate 0.8 +- 2 lamda), union of two models
            for lin in spans[name]:
                share = float(changed[lin.span[0]:lin.span[1]].float().mean())
                assert share <= 2 * (0.2 + 0.16) + 0.02, (name, lin.label, share)
        else:  # not a DP linear: its dense delta is merged
            assert torch.equal(changed, moved) or int((changed != moved).sum()) <= 2, name
    # every stack's blocks are reported on their own
    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    assert {(b.stack, b.block) for b in rep.blocks} == {(s.name, i) for s in found.stacks for i in s.blocks}
    assert len(rep.tensors) == len(found.linears)
    assert res.dp is not None and res.dp["models"][0]["linears"] == len(found.linears)


def test_merge_reports_clamped_and_emptied_linears(tmp_path, arch_set):
    arch, (base, ft1, _) = arch_set
    cfg = parse_config(f"merge_method: dp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                       "parameters: {pruning_rate: 0.95, lamda: 0.4}\n")
    res = merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True))
    rep = collect_stats(cfg, MergeOptions(quiet=True)).models[0]
    clamped = [tr for tr in rep.tensors if any(tr.clamped)]
    assert clamped, "lamda 0.4 at rate 0.95 must push some densities below 1/n"
    assert res.dp["clamped"] == len(clamped)
    assert res.dp["emptied"] == sum(tr.kept[0] == 0 for tr in rep.tensors)
    line = res.summary_line()
    assert f"DP clamped the density of {len(clamped)} linear(s)" in line and "emptied" in line
