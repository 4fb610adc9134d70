"""Merging fine-tunes whose vocabularies grew: what a tokenizer block costs in time and memory.

A Llama-3-sized vocabulary (128,256 tokens, hidden 768 by default; bf16) in a base and two
fine-tunes (benchmarks/fastgen.py), each with a 128k-token tokenizer built with the `tokenizers`
library. The same weights are merged three ways, side by side in one run, each as a CLI process
under `--memory-limit 1GiB`, its peak anonymous memory sampled over the process tree
(benchmarks/common.py `run_measured`):

- `same-vocab`: task_arithmetic of base + ft1 + ft2 with the base's vocabulary everywhere (the
  reference: no remap);
- `union`: the fine-tunes have 8 added special tokens each (4 shared: a mean row; 4 their own: a
  donor row), 8 more embedding and lm_head rows; `tokenizer_source: union` builds a vocabulary of
  128,268 tokens and every embedding/lm_head unit reads its rows through the row map;
- `union+pad`: the same with `pad_to_multiple_of: 64` (one extra read of every vocabulary tensor
  for the padding means).

Checks, per run: exit 0; the union outputs' tensors outside the vocabulary and their rows of the
base's tokens are byte-identical to the same-vocab output (every model has those tokens, so they
take their own rows), and the tokenizer written has 128,268 tokens.

    python benchmarks/bench_vocab.py              # ~2 GB of checkpoints under benchmarks/data/
    python benchmarks/bench_vocab.py --hidden 256 --vocab 32000    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import DATA_DIR, code_version, fmt_mib, run_measured, save_result, write_config  # noqa: E402
from fastgen import fast_dataset  # noqa: E402

from dppa_stream.checkpoint import Checkpoint, ShardLayout, read_rows, write_rows  # noqa: E402
from dppa_stream.synthetic import LlamaShape  # noqa: E402

ADDED = {"ft1": [f"<|chat_{k}|>" for k in range(4)] + [f"<|ft1_{k}|>" for k in range(4)],
         "ft2": [f"<|chat_{k}|>" for k in range(4)] + [f"<|ft2_{k}|>" for k in range(4)]}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
LIMIT = "1GiB"


def tokenizer(vocab: int, added=()):
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(vocab)}, merges=[]))
    for a in added:
        tok.add_tokens([AddedToken(a, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def link_model(src: str, dst: str, vocab: int, added=()) -> str:
    """`src`'s weights in `dst` (hard links: no copy), with its own tokenizer."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not os.path.exists(os.path.join(dst, f)):
            os.link(os.path.join(src, f), os.path.join(dst, f))
    tokenizer(vocab, added).save_pretrained(dst)
    return dst


def grow_model(src: str, dst: str, vocab: int, added: list[str], seed: int) -> str:
    """`src` with len(added) more rows in its vocabulary tensors (new random rows) and a tokenizer
    with those tokens added, written in blocks (no tensor whole in memory)."""
    if os.path.isfile(os.path.join(dst, "tokenizer.json")):
        return dst
    os.makedirs(dst, exist_ok=True)
    ck = Checkpoint.open(src)
    grow = len(added)
    specs = [(n, e.dtype, ((e.shape[0] + grow, *e.shape[1:]) if n in VOCAB_TENSORS else e.shape))
             for n, e in ck.tensors.items()]
    layout = ShardLayout(specs, 5_000_000_000)
    layout.preallocate(dst)
    g = torch.Generator().manual_seed(seed)
    for name, e in ck.tensors.items():
        step = max(1, (4 << 20) // max(1, e.row_numel))
        for r0 in range(0, e.rows, step):
            write_rows(dst, layout.placements[name], r0 * e.row_numel, read_rows(e, r0, min(e.rows, r0 + step)))
        if name in VOCAB_TENSORS:
            rows = (torch.randn((grow, *e.shape[1:]), generator=g) * 0.02).to(read_rows(e, 0, 1).dtype)
            write_rows(dst, layout.placements[name], e.rows * e.row_numel, rows)
    layout.finish(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(dict(cfg, vocab_size=vocab + grow), f, indent=2)
    tokenizer(vocab, added).save_pretrained(dst)
    return dst


def tensors_of(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    shape = LlamaShape(hidden=args.hidden, intermediate=args.hidden * 8 // 3 // 64 * 64, layers=args.layers,
                       vocab=args.vocab, heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 256))
    base, ft1, ft2 = fast_dataset(shape, 2, torch.bfloat16)
    root = os.path.join(DATA_DIR, f"vocab_{os.path.basename(os.path.dirname(base))}")
    same = {n: link_model(p, os.path.join(root, "same", n), args.vocab) for n, p in
            (("base", base), ("ft1", ft1), ("ft2", ft2))}
    grown = {n: grow_model(p, os.path.join(root, "grown", n), args.vocab, ADDED[n], seed=k + 1)
             for k, (n, p) in enumerate((("ft1", ft1), ("ft2", ft2)))}
    work = os.path.join(root, "runs")
    os.makedirs(work, exist_ok=True)
    weights = [{"weight": 0.5}, {"weight": 0.7}]
    runs = {
        "same-vocab": ("", [same["ft1"], same["ft2"]]),
        "union": ("tokenizer_source: union\n", [grown["ft1"], grown["ft2"]]),
        "union+pad": ("tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n", [grown["ft1"], grown["ft2"]]),
    }
    results, outs = {}, {}
    for name, (extra, fts) in runs.items():
        cfg = os.path.join(work, f"{name}.yml")
        write_config(cfg, "task_arithmetic", same["base"], list(zip(fts, weights)), dtype=None)
        with open(cfg, "a") as f:
            f.write(extra)
        outs[name] = os.path.join(work, name)
        js = os.path.join(work, f"{name}.json")
        m = run_measured([os.path.join(os.path.dirname(sys.executable), "dppa-stream"), "merge", cfg, outs[name],
                          "--overwrite", "-q", "--memory-limit", LIMIT, "--json", js])
        assert m.rc == 0, m.stderr_tail
        with open(js) as f:
            summary = json.load(f)
        results[name] = {"wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2),
                         "peak_anon_mib": round(m.peak_anon_bytes / 2**20, 1), "bytes_read": summary["bytes_read"],
                         "bytes_written": summary["bytes_written"], "samples": m.samples, "max_gap_ms": round(m.max_gap_ms, 1)}
        print(f"{name:11s} wall {m.wall_s:6.1f}s  cpu {m.cpu_s:6.1f}s  peak {fmt_mib(m.peak_anon_bytes)}  "
              f"read {summary['bytes_read'] / 1e9:.2f} GB", flush=True)
    ref = tensors_of(outs["same-vocab"])
    checks = {}
    for name in ("union", "union+pad"):
        got = tensors_of(outs[name])
        other = all(torch.equal(got[t], ref[t]) for t in ref if t not in VOCAB_TENSORS)
        rows = all(torch.equal(got[t][:args.vocab], ref[t]) for t in VOCAB_TENSORS)
        with open(os.path.join(outs[name], "tokenizer.json")) as f:
            tj = json.load(f)
        size = len(set(tj["model"]["vocab"]) | {t["content"] for t in tj["added_tokens"]})
        checks[name] = {"other_tensors_identical": other, "base_token_rows_identical": rows,
                        "vocab_rows": int(got[VOCAB_TENSORS[0]].shape[0]), "tokenizer_tokens": size}
        assert other and rows, (name, checks[name])
    base_ref = results["same-vocab"]
    for name in ("union", "union+pad"):
        for k in ("wall_s", "cpu_s", "peak_anon_mib"):
            results[name][f"{k}_ratio_to_same_vocab"] = round(results[name][k] / max(base_ref[k], 1e-9), 3)
    out = {"benchmark": "bench_vocab", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version(),
           "shape": vars(args), "checkpoint_bytes": sum(os.path.getsize(os.path.join(same["base"], f))
                                                          for f in os.listdir(same["base"]) if f.endswith(".safetensors")),
           "memory_limit": LIMIT, "runs": results, "checks": checks, "machine": {"cpus": os.cpu_count()},
           "note": "wall and CPU from run_measured (wait4 rusage of the process tree); peak anon = max of the "
                   "sum of RssAnon over the tree, sampled every 20 ms; runs are sequential in one invocation"}
    print(json.dumps(checks, indent=1))
    print("results:", save_result("bench_vocab.json", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
