"""DeepSeek-V3-shaped checkpoint sets with the full tensor count, at a small width, fast.

The shape is DeepSeek-V3's as shipped (config `deepseek_v3`): 61 decoder layers, the first 3 dense
and 58 MoE, each MoE layer with 256 routed experts and 1 shared expert (gate/up/down each), a
router (`mlp.gate.weight` and its `e_score_correction_bias`), MLA attention (`q_a_proj`,
`q_a_layernorm`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`) and
two norms per layer, plus embeddings, final norm and `lm_head`: 45,395 tensors in bf16 (the FP8
release adds one scale tensor per weight, ~92k). Only the widths shrink (hidden 64, expert MLP 32,
...), so a model is ~190 MB and every expert matrix 4 KiB; the checkpoint is cut into as many
shards as the real one (163).

`--fused` writes the same numbers with each layer's routed experts stacked into 3-D
`[experts, out, in]` tensors (`mlp.experts.gate_proj`, `up_proj`, `down_proj`): expert e of the
fused tensor holds exactly the values of `mlp.experts.e.<name>` of the unfused set, so the two
layouts differ in nothing but the tensor count (1,025 tensors).

`--as-shipped` writes the FP8 release's layout instead: the multi-token-prediction layer it ships
as layer 61 (its own embedding, `enorm`, `hnorm`, `eh_proj`, shared head and norm, then an MoE
layer), every attention and MLP projection as F8_E4M3 codes with a float32 `weight_scale_inv` per
128 x 128 block (one block per matrix at these widths), the router, embeddings, heads, `eh_proj`
and norms bf16: 45,808 FP8 weights + their 45,808 scales + 375 others = 91,991 tensors, the count
of the release's index (unfused only; the merge sees each weight and its scale as one tensor).

Values as `fastgen.py` makes them (base N(0, 0.02), norms 1 + N(0, 0.05), fine-tune = base +
depth-scaled Student-t delta with ~5 % zeros, windows of fixed pools at hashed offsets), keyed by
the unfused name. Sets are cached under benchmarks/data/ by a name holding every parameter.

    python benchmarks/moegen.py                 # base + 2 fine-tunes, unfused and fused; prints paths
    python benchmarks/moegen.py --as-shipped    # the FP8 release's 91,991 tensors (~110 MB per model, ~90 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import COMPLETE_MARK, DATA_DIR  # noqa: E402
from fastgen import Pools, _delta_params  # noqa: E402

from dppa_stream.checkpoint import ShardLayout  # noqa: E402

GEN_VERSION = 1
SHIPPED_SHARDS = 163  # model-000NN-of-000163.safetensors in deepseek-ai/DeepSeek-V3


@dataclass(frozen=True)
class MoeShape:
    """DeepSeek-V3's architecture with scaled-down widths (the real widths in comments)."""

    hidden: int = 64  # 7168
    intermediate: int = 128  # 18432, dense layers
    moe_intermediate: int = 32  # 2048
    experts: int = 256
    shared_experts: int = 1
    layers: int = 61
    dense_layers: int = 3  # first_k_dense_replace
    heads: int = 4  # 128
    q_lora_rank: int = 48  # 1536
    kv_lora_rank: int = 32  # 512
    qk_nope_head_dim: int = 16  # 128
    qk_rope_head_dim: int = 8  # 64
    v_head_dim: int = 16  # 128
    vocab: int = 4096  # 129280
    fused: bool = False
    mtp: bool = False  # the multi-token-prediction layer the release ships as layer 61 (num_nextn_predict_layers 1)
    fp8: bool = False  # the release's format: linear weights F8_E4M3 with F32 `weight_scale_inv` per 128 x 128 block

    def matrices(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the unfused layout, in model order."""
        h, qk = self.hidden, self.qk_nope_head_dim + self.qk_rope_head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers + (1 if self.mtp else 0)):
            p = f"model.layers.{n}."
            if n == self.layers:  # the MTP layer: its own embedding, norms, projection and head, then an MoE layer
                out += [(p + "embed_tokens.weight", (self.vocab, h)), (p + "enorm.weight", (h,)),
                        (p + "hnorm.weight", (h,)), (p + "eh_proj.weight", (h, 2 * h)),
                        (p + "shared_head.norm.weight", (h,)), (p + "shared_head.head.weight", (self.vocab, h))]
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_a_proj.weight", (self.q_lora_rank, h)),
                (p + "self_attn.q_a_layernorm.weight", (self.q_lora_rank,)),
                (p + "self_attn.q_b_proj.weight", (self.heads * qk, self.q_lora_rank)),
                (p + "self_attn.kv_a_proj_with_mqa.weight", (self.kv_lora_rank + self.qk_rope_head_dim, h)),
                (p + "self_attn.kv_a_layernorm.weight", (self.kv_lora_rank,)),
                (p + "self_attn.kv_b_proj.weight",
                 (self.heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)),
                (p + "self_attn.o_proj.weight", (h, self.heads * self.v_head_dim)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
            if n < self.dense_layers:
                out += _mlp(p + "mlp.", h, self.intermediate)
                continue
            out += [(p + "mlp.gate.weight", (self.experts, h)), (p + "mlp.gate.e_score_correction_bias", (self.experts,))]
            for e in range(self.experts):
                out += _mlp(f"{p}mlp.experts.{e}.", h, self.moe_intermediate)
            out += _mlp(p + "mlp.shared_experts.", h, self.moe_intermediate * self.shared_experts)
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def tensors(self) -> list[tuple[str, tuple[int, ...], list[str]]]:
        """(name, shape, the unfused matrices it stacks) of every tensor of this layout."""
        if not self.fused:
            return [(n, s, [n]) for n, s in self.matrices()]
        out, experts = [], {}
        for name, shape in self.matrices():
            if ".mlp.experts." not in name:
                out.append((name, shape, [name]))
                continue
            prefix, rest = name.split(".mlp.experts.")
            proj = rest.split(".", 1)[1].removesuffix(".weight")
            key = f"{prefix}.mlp.experts.{proj}"
            if key not in experts:
                experts[key] = (key, (self.experts, *shape), [])
                out.append(experts[key])
            experts[key][2].append(name)
        return out

    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every stored tensor, in file order: bf16, or with `fp8` the
        release's split (attention and MLP projections F8_E4M3, each followed by its F32 scale;
        router, embeddings, heads, `eh_proj` and norms bf16)."""
        out = []
        for name, shape, _ in self.tensors():
            if self.fp8 and is_fp8(name):
                out += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", scale_shape(shape))]
            else:
                out.append((name, "BF16", shape))
        return out

    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.matrices())

    def hf_config(self) -> dict:
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "moe_intermediate_size": self.moe_intermediate,
            "num_hidden_layers": self.layers, "first_k_dense_replace": self.dense_layers,
            "n_routed_experts": self.experts, "n_shared_experts": self.shared_experts, "num_experts_per_tok": 8,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim, "vocab_size": self.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu", "moe_layer_freq": 1,
            "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
            "norm_topk_prob": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 1 if self.mtp else 0,
            **({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}} if self.fp8 else {}),
        }


FP8_BLOCK = 128


def is_fp8(name: str) -> bool:
    """Stored as FP8 in the release: every attention and MLP projection (experts, shared experts,
    dense MLPs), not the router (`mlp.gate.weight`) nor the MTP layer's `eh_proj`."""
    return "_proj" in name.split(".")[-2] and name.endswith(".weight") and (".self_attn." in name or ".mlp." in name)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-d // FP8_BLOCK) for d in shape)


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, float32 scale_inv per 128 x 128 block) of a 2-D float32 matrix: each block
    scaled so that its largest |value| is 448, as DeepSeek's quantizer does."""
    rows, cols = w.shape
    sr, sc = scale_shape(w.shape)
    pad = torch.zeros(sr * FP8_BLOCK, sc * FP8_BLOCK, dtype=torch.float32)
    pad[:rows, :cols] = w
    blocks = pad.view(sr, FP8_BLOCK, sc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = (amax / 448.0).to(torch.float32)
    codes = (blocks / scale[:, None, :, None]).view(sr * FP8_BLOCK, sc * FP8_BLOCK)[:rows, :cols]
    return codes.contiguous().to(torch.float8_e4m3fn), scale


def _mlp(prefix: str, hidden: int, inner: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (inner, hidden)), (prefix + "up_proj.weight", (inner, hidden)),
            (prefix + "down_proj.weight", (hidden, inner))]


def write_moe_set(folder: str, shape: MoeShape, finetunes: int, seed: int = 0, drift: float = 1e-3,
                  shards: int = SHIPPED_SHARDS) -> list[str]:
    """Write base + `finetunes` models under `folder`; returns their paths (base first)."""
    names = ["base"] + [f"ft{k + 1}" for k in range(finetunes)]
    outs = [os.path.join(folder, n) for n in names]
    tensors = shape.tensors()
    if shape.fp8 and shape.fused:
        raise ValueError("fp8 sets are unfused (the release's layout)")
    shard_size = -(-sum(math.prod(sh) * (1 if dt == "F8_E4M3" else 4 if dt == "F32" else 2)
                        for _, dt, sh in shape.stored()) // shards)
    layout = ShardLayout(shape.stored(), shard_size)
    fds = {}
    for out in outs:
        os.makedirs(out, exist_ok=True)
        layout.preallocate(out)
        for f in layout.files:
            fds[(out, f)] = os.open(os.path.join(out, f), os.O_WRONLY)
    pools = Pools(seed)
    matrix_shape = dict(shape.matrices())
    try:
        for name, _, parts in tensors:
            models = [[] for _ in outs]
            for part in parts:
                n = 1
                for d in matrix_shape[part]:
                    n *= d
                w = Pools.window(pools.normal, n, seed, part, 0, "base")
                base = (w * 0.05 + 1.0) if "norm" in part else (w * 0.02)
                models[0].append(base.to(torch.bfloat16))
                for ft in range(finetunes):
                    scale, df = _delta_params(part, shape.layers, ft, drift)
                    delta = Pools.window(pools.t(df), n, seed, part, 0, "delta", ft)
                    models[ft + 1].append(torch.add(base, delta, alpha=scale).to(torch.bfloat16))
            place = layout.placements[name]
            for out, values in zip(outs, models):
                if shape.fp8 and is_fp8(name):
                    codes, scale = to_fp8(values[0].float().view(matrix_shape[name]))
                    sp = layout.placements[name + "_scale_inv"]
                    os.pwrite(fds[(out, sp.file)], scale.view(torch.uint8).numpy(), sp.offset)
                    os.pwrite(fds[(out, place.file)], codes.view(torch.uint8).numpy(), place.offset)
                    continue
                data = (values[0] if len(values) == 1 else torch.cat(values)).view(torch.uint8).numpy()
                os.pwrite(fds[(out, place.file)], data, place.offset)
    finally:
        for fd in fds.values():
            os.close(fd)
    for out in outs:
        layout.finish(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(shape.hf_config(), f, indent=2)
    return outs


def moe_dataset(shape: MoeShape, finetunes: int = 2, seed: int = 0, drift: float = 1e-3,
                shards: int = SHIPPED_SHARDS) -> list[str]:
    """Paths (base, ft1..ftK) of a cached set; generated on first use."""
    named = {k: v for k, v in asdict(replace(shape)).items() if v or k not in ("mtp", "fp8")}  # older sets keep their keys
    fields = "_".join(f"{v:g}" if isinstance(v, float) else str(int(v)) for v in named.values())
    key = f"moe{GEN_VERSION}_{fields}_ft{finetunes}_s{seed}_d{drift:g}_sh{shards}"
    folder = os.path.join(DATA_DIR, key)
    paths = [os.path.join(folder, "base")] + [os.path.join(folder, f"ft{k + 1}") for k in range(finetunes)]
    if os.path.isfile(os.path.join(folder, COMPLETE_MARK)):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    print(f"generating {key} ({len(shape.stored())} tensors x {finetunes + 1} models) ...", flush=True)
    t0 = time.perf_counter()
    write_moe_set(folder, shape, finetunes, seed, drift, shards)
    dt = time.perf_counter() - t0
    with open(os.path.join(folder, COMPLETE_MARK), "w") as f:
        json.dump({"generator": f"benchmarks/moegen.py v{GEN_VERSION}", "shape": asdict(shape), "finetunes": finetunes,
                   "seed": seed, "drift": drift, "shards": shards, "tensors": len(shape.stored()),
                   "numel": shape.numel(), "seconds": dt}, f, indent=2)
    print(f"  done in {dt:.0f}s", flush=True)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--as-shipped", action="store_true", help="the FP8 release's layout: FP8 linears with their "
                    "scales and the MTP layer (91,991 tensors with the defaults), unfused only")
    args = ap.parse_args()
    for fused in (False,) if args.as_shipped else (False, True):
        shape = MoeShape(experts=args.experts, layers=args.layers, fused=fused, mtp=args.as_shipped, fp8=args.as_shipped)
        for p in moe_dataset(shape, args.finetunes):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
