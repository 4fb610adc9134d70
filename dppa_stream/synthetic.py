"""Synthetic Llama-shaped checkpoints, generated straight to disk (never whole in memory).

Used by the demo, the tests and the benchmarks. Fine-tunes are base + a heavy-tailed delta
(Student-t, 3 degrees of freedom) whose scale varies by layer and by tensor, with a fraction of
exact zeros, rounded to the checkpoint dtype, so magnitude statistics have ties, zeros and
outliers as real fine-tunes do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch

from .checkpoint import ShardLayout, write_rows
from .checkpoint.format import NAME_OF_TORCH_DTYPE

ROW_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    vocab: int = 1024
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden * self.kv_heads // self.heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _gen(seed: int, name: str, block: int) -> torch.Generator:
    h = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def _base_block(name: str, shape, rows: tuple[int, int], seed: int) -> torch.Tensor:
    row_numel = 1
    for d in shape[1:]:
        row_numel *= d
    n = (rows[1] - rows[0]) * row_numel
    if "norm" in name:
        return torch.ones(n) + 0.05 * torch.randn(n, generator=_gen(seed, name, rows[0]))
    return 0.02 * torch.randn(n, generator=_gen(seed, name, rows[0]))


def _delta_block(name: str, shape, rows: tuple[int, int], seed: int, ft: int, layers: int, drift: float) -> torch.Tensor:
    g = _gen(seed * 1000 + ft + 1, name, rows[0])
    row_numel = 1
    for d in shape[1:]:
        row_numel *= d
    n = (rows[1] - rows[0]) * row_numel
    layer = _layer_of(name)
    # scale grows with depth and differs per tensor kind and per fine-tune: layer-level structure
    depth = 0.5 + 1.5 * (layer + 1) / max(1, layers) if layer >= 0 else 0.7
    kind = 1.6 if "mlp" in name else 1.0
    scale = drift * depth * kind * (1.0 + 0.3 * ft)
    # tails get heavier with depth (and differ between attention and MLP), as DP's signals expect
    df = 3 + (4 if layer < 0 else round(6 * (1 - (layer + 1) / max(1, layers)))) + (1 if "mlp" in name else 0)
    t = _student_t(n, g, df)
    d = scale * t
    d[torch.rand(n, generator=g) < 0.05] = 0.0  # untouched weights
    return d


def _student_t(n: int, g: torch.Generator, df: int = 3) -> torch.Tensor:
    z = torch.randn(n, generator=g)
    chi2 = torch.zeros(n)
    for _ in range(df):
        chi2 += torch.randn(n, generator=g) ** 2
    return z / torch.sqrt(chi2 / df)


def write_llama_set(folder: str, shape: LlamaShape = LlamaShape(), finetunes: int = 2, dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, shard_size: int = 5_000_000_000, drift: float = 1e-3) -> list[str]:
    """Write base/ and ft1/..ftK/ HF folders under `folder`; returns their paths (base first)."""
    names = ["base"] + [f"ft{k + 1}" for k in range(finetunes)]
    specs = [(n, NAME_OF_TORCH_DTYPE[dtype], s) for n, s in shape.tensors()]
    paths = []
    for ft, model in enumerate(names):
        out = os.path.join(folder, model)
        os.makedirs(out, exist_ok=True)
        layout = ShardLayout(specs, shard_size)
        layout.preallocate(out)
        for name, tshape in shape.tensors():
            rows = tshape[0]
            row_numel = 1
            for d in tshape[1:]:
                row_numel *= d
            step = max(1, ROW_BLOCK_ELEMS // row_numel)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                x = _base_block(name, tshape, (r0, r1), seed)
                if ft > 0:
                    x = x + _delta_block(name, tshape, (r0, r1), seed, ft - 1, shape.layers, drift)
                x = x.to(dtype).reshape((r1 - r0,) + tuple(tshape[1:]))
                write_rows(out, layout.placements[name], r0 * row_numel, x)
        layout.finish(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(shape.hf_config(dtype), f, indent=2)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
        paths.append(out)
    return paths
