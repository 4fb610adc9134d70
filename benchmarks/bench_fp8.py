"""Merging block-FP8 checkpoints as DeepSeek-V3 ships them: straight from FP8, against the I/O floor
and against "dequantize to bf16 with a script, then merge", side by side in one run.

The set: base + 2 fine-tunes, DeepSeek-V3 shaped at real widths (hidden 7168; MLA attention with
q_lora 1536, kv_lora 512, 128 heads; one dense layer with intermediate 18432 and two MoE layers of
6 routed experts + 1 shared expert with intermediate 2048; vocabulary cut to 8192), every linear
F8_E4M3 with float32 `weight_scale_inv` per 128 x 128 block (`kv_a_proj_with_mqa` has 576 rows: not
a multiple of the block), norms, router and embeddings bf16; ~1.6 B parameters, 2 GB per model,
1 GB shards. Fine-tunes move a quarter of the codes by one step and rescale a tenth of the blocks.

Measured (DPPA, rates [0.9, 0.8], amplification [1.8, 1.0], --memory-limit 3GiB, threads:2, inputs
in the page cache):
- the I/O floor: read the FP8 inputs twice, write the FP8 output once and fsync it;
- FP8 -> FP8 (the reference's format, fresh scales) and FP8 -> bf16 (`out_dtype: bfloat16`);
- the dequantize-first route: a script (below) writes bf16 copies of the three models, block by
  block as DeepSeek's own fp8_cast_bf16.py does, then the same merge on them, bf16 -> bf16. Its
  merge is also what "as fast as bf16" is measured against.

    python benchmarks/bench_fp8.py [--snapshot HEAD]   # ~6 GB generated once under benchmarks/data/ (+ 11 GB
                                                       # of bf16 copies made and removed again); ~25 min on 2 busy cores

`--snapshot REV` runs dppa_stream exported at git REV (common.snapshot) while the tree is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (DATA_DIR, check_snapshot_import, code_version, fmt_mib, input_bytes, ours_env,  # noqa: E402
                    run_measured, save_result, snapshot, two_pass_floor, write_config)

HIDDEN, Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V_HEAD = 7168, 1536, 512, 128, 128, 64, 128
DENSE_INTER, MOE_INTER, EXPERTS, VOCAB, LAYERS, BLOCK = 18432, 2048, 6, 8192, 3, 128
SHARD = 1_000_000_000
KEY = f"fp8_dsv3_h{HIDDEN}_l{LAYERS}_e{EXPERTS}_v{VOCAB}"


def tensors() -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, "fp8" | dtype, shape) in DeepSeek-V3's order; an fp8 tensor also has its scale."""
    out = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (HIDDEN,)),
                (p + "self_attn.q_a_proj.weight", "fp8", (Q_LORA, HIDDEN)),
                (p + "self_attn.q_a_layernorm.weight", "BF16", (Q_LORA,)),
                (p + "self_attn.q_b_proj.weight", "fp8", (HEADS * (NOPE + ROPE), Q_LORA)),
                (p + "self_attn.kv_a_proj_with_mqa.weight", "fp8", (KV_LORA + ROPE, HIDDEN)),
                (p + "self_attn.kv_a_layernorm.weight", "BF16", (KV_LORA,)),
                (p + "self_attn.kv_b_proj.weight", "fp8", (HEADS * (NOPE + V_HEAD), KV_LORA)),
                (p + "self_attn.o_proj.weight", "fp8", (HIDDEN, HEADS * V_HEAD)),
                (p + "post_attention_layernorm.weight", "BF16", (HIDDEN,))]
        mlps = [p + "mlp."] if i == 0 else [p + f"mlp.experts.{e}." for e in range(EXPERTS)] + [p + "mlp.shared_experts."]
        inter = DENSE_INTER if i == 0 else MOE_INTER
        if i:
            out += [(p + "mlp.gate.weight", "BF16", (EXPERTS, HIDDEN)), (p + "mlp.gate.e_score_correction_bias", "F32", (EXPERTS,))]
        for m in mlps:
            out += [(m + "gate_proj.weight", "fp8", (inter, HIDDEN)), (m + "up_proj.weight", "fp8", (inter, HIDDEN)),
                    (m + "down_proj.weight", "fp8", (HIDDEN, inter))]
    return out + [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]


def _scale_shape(shape):
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def hf_config(quantized: bool) -> dict:
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
           "intermediate_size": DENSE_INTER, "moe_intermediate_size": MOE_INTER, "n_routed_experts": EXPERTS,
           "n_shared_experts": 1, "num_hidden_layers": LAYERS, "first_k_dense_replace": 1, "q_lora_rank": Q_LORA,
           "kv_lora_rank": KV_LORA, "num_attention_heads": HEADS, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
           "v_head_dim": V_HEAD, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    if quantized:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]}
    return cfg


def generate(folder: str, ft: int) -> None:
    """One model (ft 0: the base). Codes: sign-magnitude with small magnitudes more likely; a fine-tune
    moves a quarter of them by one step and rescales a tenth of the blocks by up to ±2 %."""
    from dppa_stream.checkpoint import ShardLayout, write_rows

    specs = []
    for name, kind, shape in tensors():
        if kind == "fp8":
            specs += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", _scale_shape(shape))]
        else:
            specs.append((name, kind, shape))
    os.makedirs(folder, exist_ok=True)
    layout = ShardLayout(specs, SHARD)
    layout.preallocate(folder)
    for i, (name, kind, shape) in enumerate(tensors()):
        rng = np.random.default_rng([i, 0])
        n = int(np.prod(shape))
        if kind == "fp8":
            mag = np.minimum(rng.integers(0, 120, n, dtype=np.uint8), rng.integers(0, 120, n, dtype=np.uint8))
            codes = mag | (rng.integers(0, 2, n, dtype=np.uint8) << 7)
            scales = rng.uniform(2e-5, 1e-4, _scale_shape(shape)).astype(np.float32)
            if ft:
                frng = np.random.default_rng([i, ft])
                move = frng.random(n) < 0.25
                step = np.where(frng.random(n) < 0.5, 1, -1).astype(np.int16)
                mag2 = np.clip((codes & 0x7F).astype(np.int16) + np.where(move, step, 0), 0, 120).astype(np.uint8)
                codes = mag2 | (codes & 0x80)
                scales = scales * np.where(frng.random(scales.shape) < 0.1, frng.uniform(0.98, 1.02, scales.shape), 1.0
                                           ).astype(np.float32)
            write_rows(folder, layout.placements[name], 0, codes.reshape(shape))
            write_rows(folder, layout.placements[name + "_scale_inv"], 0, scales)
        else:
            x = rng.standard_normal(n, dtype=np.float32) * (0.02 if "embed" in name or "head" in name else 1.0)
            if ft:
                x = x + np.random.default_rng([i, ft]).standard_normal(n, dtype=np.float32) * 1e-3
            data = x if kind == "F32" else (x.view(np.uint32) >> 16).astype(np.uint16)
            write_rows(folder, layout.placements[name], 0, data.reshape(shape))
    layout.finish(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(True), f, indent=2)


def dataset() -> list[str]:
    root = os.path.join(DATA_DIR, KEY)
    paths = [os.path.join(root, m) for m in ("base", "ft1", "ft2")]
    mark = os.path.join(root, ".complete")
    if not os.path.exists(mark):
        shutil.rmtree(root, ignore_errors=True)
        for ft, p in enumerate(paths):
            print(f"generating {p}", flush=True)
            generate(p, ft)
        open(mark, "w").close()
    return paths


def dequantize(src: str, dst: str) -> None:
    """The dequantize-first route, as a user would script it: every FP8 weight times its block
    scales, to bf16, shard by shard (safetensors + torch), with config.json's quantization_config
    removed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        wmap = json.load(f)["weight_map"]
    handles = {}

    def get(name):
        fname = wmap[name]
        if fname not in handles:
            handles[fname] = safe_open(os.path.join(src, fname), "pt")
        return handles[fname].get_tensor(name)

    os.makedirs(dst, exist_ok=True)
    out_map = {}
    for fname in sorted(set(wmap.values())):
        part = {}
        for name in sorted(n for n, f in wmap.items() if f == fname and not n.endswith("_scale_inv")):
            w = get(name)
            if w.dtype == torch.float8_e4m3fn:
                s = get(name + "_scale_inv")
                R, C = w.shape
                s = s.repeat_interleave(BLOCK, 0)[:R].repeat_interleave(BLOCK, 1)[:, :C]
                w = (w.float() * s).to(torch.bfloat16)
            part[name] = w
        save_file(part, os.path.join(dst, fname), {"format": "pt"})
        out_map.update({n: fname for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": out_map}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config(False), f)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--dequantize":
        dequantize(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", default=None, metavar="REV")
    args = ap.parse_args()
    snap = snapshot(args.snapshot) if args.snapshot else None
    if snap:
        check_snapshot_import(snap)
    paths = dataset()
    params = sum(int(np.prod(s)) for _, _, s in tensors())
    work = os.path.join(DATA_DIR, "bench_fp8")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bf16 = [os.path.join(work, f"bf16-{i}") for i in range(3)]
    limit = ["--memory-limit", "3GiB", "--scheduler", "threads:2"]
    rows = []

    def config(name, models, extra=None):
        path = os.path.join(work, name + ".yml")
        write_config(path, "dppa", models[0], [(p, {}) for p in models[1:]], {"amplification": [1.8, 1.0]},
                     dtype=None, out_dtype=extra)
        return path

    def merge(label, cfg):
        out = os.path.join(work, "out-" + label.split()[0])
        shutil.rmtree(out, ignore_errors=True)
        js = os.path.join(work, label.split()[0] + ".json")
        m = run_measured([os.path.join(os.path.dirname(sys.executable), "dppa-stream"), "merge", cfg, out, "-q",
                          "--json", js, *limit], env=ours_env(snap), cwd=work)
        if m.rc:
            print(m.stderr_tail, file=sys.stderr)
            raise SystemExit(1)
        with open(js) as f:
            res = json.load(f)
        size = input_bytes([out])
        shutil.rmtree(out)
        return m, res, size

    def record(label, m, out_bytes=None, note=""):
        row = {"run": label, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes,
               "cpu_ns_per_param_ft": m.cpu_s / (params * 2) * 1e9, "out_bytes": out_bytes, "note": note}
        rows.append(row)
        print(f"{label:34s} wall {m.wall_s:7.1f}s  cpu {m.cpu_s:7.1f}s  {row['cpu_ns_per_param_ft']:5.1f} ns/param/ft  "
              f"peak {fmt_mib(m.peak_anon_bytes)} MiB {note}", flush=True)

    fp8_cfg, fp8_bf16_cfg, bf16_cfg = config("fp8", paths), config("fp8_bf16", paths, "bfloat16"), config("bf16", bf16)
    merge("warm-up", fp8_cfg)  # numba compiles on first use (once per machine); reads the inputs into the cache
    floor = two_pass_floor(paths, input_bytes([paths[0]]), work, cold=False)
    print(f"I/O floor (read twice, write once): {floor['seconds']:.1f}s", flush=True)
    m, res, size = merge("fp8 -> fp8", fp8_cfg)
    record("fp8 -> fp8", m, size, f"ratio to floor {m.wall_s / floor['seconds']:.2f}x")
    loss = res["requantization"]
    m, _, size = merge("fp8 -> bf16", fp8_bf16_cfg)
    record("fp8 -> bf16 (out_dtype)", m, size)
    deq = [run_measured([sys.executable, os.path.abspath(__file__), "--dequantize", p, q]) for p, q in zip(paths, bf16)]
    if any(d.rc for d in deq):
        print(deq[0].stderr_tail, file=sys.stderr)
        return 1
    d = deq[0]
    d.wall_s, d.cpu_s, d.peak_anon_bytes = sum(x.wall_s for x in deq), sum(x.cpu_s for x in deq), max(x.peak_anon_bytes for x in deq)
    record("dequantize 3 models to bf16", d, input_bytes(bf16))
    m, _, size = merge("bf16 -> bf16", bf16_cfg)
    record("bf16 -> bf16 merge", m, size)
    total = {"wall_s": d.wall_s + m.wall_s, "cpu_s": d.cpu_s + m.cpu_s}
    print(f"{'dequantize-first total':34s} wall {total['wall_s']:7.1f}s  cpu {total['cpu_s']:7.1f}s", flush=True)
    print(f"requantization loss: {json.dumps(loss['all'])}", flush=True)
    shutil.rmtree(work)
    path = save_result("bench_fp8.json", {"code": code_version(), "snapshot": snap, "params": params, "input_bytes": input_bytes(paths),
                                          "floor": floor, "rows": rows, "dequantize_first_total": total,
                                          "requantization": loss})
    print("written", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
