"""The tiny Llama, its training loop, the checkpoint cache, and delta statistics.

Checkpoints are written with `save_pretrained` (safetensors, float32, Llama tensor names) under
benchmarks/quality/cache/ (git-ignored), in a folder named by a hash of everything that
determines the weights: model shape, training recipe, seed, the parent checkpoint's key and a
code version. A marker file written last makes an interrupted training re-run instead of being
reused half-written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from . import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, "cache")
CODE_VERSION = 1  # bump when tasks or training change in a way the config does not capture
DONE = "training.json"


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 32


@dataclass(frozen=True)
class TrainRecipe:
    """One training run: the task mixture, optimisation settings and length."""

    name: str  # "base" or "<domain>-<regime>"
    mixture: tuple  # ((task, level, weight), ...)
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20
    weight_decay: float = 0.0


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tasks.VOCAB), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tasks.BOS_ID, eos_token_id=tasks.EOS_ID, pad_token_id=tasks.PAD_ID,
        attn_implementation="sdpa",
    )


def new_model(shape: ModelShape, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape)).float()


def batch_tensors(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 everywhere but the answer and </s>)."""
    seqs, labs = [], []
    for p, a in examples:
        prompt = [tasks.BOS_ID] + tasks.encode(p)
        ans = tasks.encode(a) + [tasks.EOS_ID]
        seqs.append(prompt + ans)
        labs.append([-100] * len(prompt) + ans)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tasks.PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
    return ids, labels


def train(model, recipe: TrainRecipe, seed: int, exclude: set[str], log=None) -> dict:
    """AdamW with linear warm-up and cosine decay to 10 %; returns a small training log."""
    mixture = {(t, lv): w for t, lv, w in recipe.mixture}
    sampler = tasks.Sampler(mixture, seed, exclude)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)

    def lr_at(step):
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, labels = batch_tensors([sampler() for _ in range(recipe.batch)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, recipe.steps // 4) == 0:
            log(f"  {recipe.name}: step {step + 1}/{recipe.steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    tail = losses[-20:]
    return {"final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}


def cache_key(shape: ModelShape, recipe: TrainRecipe, seed: int, parent: str | None, extra: dict) -> str:
    blob = json.dumps({"shape": asdict(shape), "recipe": asdict(recipe), "seed": seed, "parent": parent,
                       "extra": extra, "code": CODE_VERSION, "vocab": tasks.VOCAB}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def trained(shape: ModelShape, recipe: TrainRecipe, seed: int, parent: str | None, exclude: set[str],
            cache_dir: str = CACHE_DIR, extra: dict | None = None, log=print) -> tuple[str, dict]:
    """Path of the checkpoint trained by `recipe` from `parent` (a checkpoint folder) or from
    scratch; trained and saved on first use, then read from the cache. Returns (path, info)."""
    parent_key = None
    if parent:
        with open(os.path.join(parent, DONE)) as f:
            parent_key = json.load(f)["key"]
    key = cache_key(shape, recipe, seed, parent_key, extra or {})
    folder = os.path.join(cache_dir, f"{recipe.name}-s{seed}-{key}")
    done = os.path.join(folder, DONE)
    if os.path.isfile(done):
        with open(done) as f:
            return folder, json.load(f)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    if parent:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(parent, dtype=torch.float32)
    else:
        model = new_model(shape, seed)
    log(f"training {recipe.name} (seed {seed}, {recipe.steps} steps, lr {recipe.lr:g})")
    info = train(model, recipe, seed, exclude, log)
    model.save_pretrained(folder)
    info.update(key=key, recipe=asdict(recipe), seed=seed, parent=parent_key, shape=asdict(shape))
    with open(done, "w") as f:
        json.dump(info, f, indent=2)
    return folder, info


# ---------------------------------------------------------------------------------------------
# Delta statistics


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def delta_stats(base: str, finetuned: str) -> dict:
    """Per decoder block: mean |delta| / mean |theta_0| over its linear weights; plus overall figures."""
    import re

    b, f = load_weights(base), load_weights(finetuned)
    per_layer: dict[int, list[float]] = {}
    tot_d = tot_b = 0.0
    n = 0
    for name, w0 in b.items():
        d = (f[name].float() - w0.float()).abs()
        m = re.search(r"layers\.(\d+)\.", name)
        if m and w0.dim() == 2:
            acc = per_layer.setdefault(int(m.group(1)), [0.0, 0.0])
            acc[0] += float(d.sum())
            acc[1] += float(w0.float().abs().sum())
            tot_d += float(d.sum())
            tot_b += float(w0.float().abs().sum())
            n += d.numel()
    layers = {k: v[0] / v[1] for k, v in sorted(per_layer.items())}
    return {"per_layer": layers, "overall": tot_d / tot_b, "mean_abs_delta": tot_d / n}
