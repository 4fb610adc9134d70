"""LoRA adapters (issue 19): what applying an adapter as an input costs next to a plain input, and
what extraction costs per parameter next to mergekit-extract-lora, on the same model.

A synthetic Llama (benchmarks/common.py `dataset`, bf16) and PEFT adapters of rank 16 on every
linear module (random factors, written in peft's format: adapter_config.json and
adapter_model.safetensors with `base_model.model.<module>.lora_A/B.weight`). Every run is a CLI
process measured by `run_measured` (wall, CPU, peak anonymous memory of the process tree), side by
side in one invocation, alternating, `--rounds` times:

- `apply`: `linear` of the single input `base+adapter` against `linear` of the adapted model
  written out in full (made once, untimed, by the first): the same output bytes (checked), one
  reading the base and fusing B·A into each row range, the other reading a plain checkpoint;
- `ties`: TIES of two adapter inputs on the base against TIES of the two adapted models in full;
- `extract`: `dppa-stream extract-lora FT BASE OUT --rank 16` (exact SVDs: every tensor here is
  below --exact-below), the same with `--exact-below 0` (every tensor through the streamed
  randomized SVD), and `mergekit-extract-lora --max-rank 16` (mergekit 0.1.5's venv, CPU) on the
  same two models; ns per parameter of the decomposed tensors.

    python benchmarks/bench_lora.py                      # hidden 512, 8 layers (~60 M params)
    python benchmarks/bench_lora.py --hidden 256 --layers 2 --rounds 1   # quick check
    python benchmarks/bench_lora.py --hidden 1024 --intermediate 2816 --layers 16 --no-mergekit   # 0.25 B
    python benchmarks/bench_lora.py ... --only extract/randomized,extract/mergekit --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (DATA_DIR, DPPA_BIN, MK_VENV, dataset, folder_digest, mergekit_env, run_measured,  # noqa: E402
                    save_result)

from dppa_stream.synthetic import LlamaShape  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: str, shape: LlamaShape, rank: int, seed: int) -> str:
    """A PEFT LoRA adapter on every linear module of the synthetic Llama (random A and B)."""
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return folder
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in shape.tensors():
        module = name.removesuffix(".weight")
        if len(dims) == 2 and module.rsplit(".", 1)[-1] in LINEAR:
            out_f, in_f = dims
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.01 * torch.randn(out_f, rank, generator=g)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": list(LINEAR), "lora_dropout": 0.0, "bias": "none"}, f)
    return folder


def config(path: str, method: str, base: str | None, models: list[str], params: dict) -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: " + json.dumps(params)]
    lines.append("dtype: bfloat16")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def merge_cmd(cfg: str, out: str, limit: str) -> list[str]:
    return [DPPA_BIN, "merge", cfg, out, "--overwrite", "-q", "--memory-limit", limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--only", help="comma-separated run names to keep (e.g. extract/randomized,extract/mergekit)")
    args = ap.parse_args()

    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=8 if args.hidden % 8 == 0 else 4, kv_heads=4 if args.hidden % 8 == 0 else 2)
    base, ft = dataset(shape, 1, torch.bfloat16, tag="lora")
    root = os.path.dirname(base)
    work = os.path.join(DATA_DIR, "lora_work_" + os.path.basename(root))
    os.makedirs(work, exist_ok=True)
    adapters = [write_adapter(os.path.join(root, f"adapter{k}"), shape, args.rank, k) for k in (1, 2)]
    fulls = []
    for k, ad in enumerate(adapters, 1):  # the adapted models written in full (once, untimed)
        full = os.path.join(root, f"full{k}")
        if not os.path.isfile(os.path.join(full, "config.json")):
            cfg = config(os.path.join(work, f"make{k}.yml"), "linear", None, [f"{base}+{ad}"], {"weight": 1.0})
            m = run_measured(merge_cmd(cfg, full, args.memory_limit))
            assert m.rc == 0, m.stderr_tail
        fulls.append(full)
    linear_params = sum(torch.Size(d).numel() for n, d in shape.tensors()
                        if len(d) == 2 and n.removesuffix(".weight").rsplit(".", 1)[-1] in LINEAR)

    runs = {
        "apply/adapter": merge_cmd(config(os.path.join(work, "a.yml"), "linear", None, [f"{base}+{adapters[0]}"],
                                          {"weight": 1.0}), os.path.join(work, "out_a"), args.memory_limit),
        "apply/full": merge_cmd(config(os.path.join(work, "b.yml"), "linear", None, [fulls[0]], {"weight": 1.0}),
                                os.path.join(work, "out_b"), args.memory_limit),
        "ties/adapters": merge_cmd(config(os.path.join(work, "c.yml"), "ties", base, [f"{base}+{a}" for a in adapters],
                                          {"weight": 0.5, "density": 0.3}), os.path.join(work, "out_c"), args.memory_limit),
        "ties/full": merge_cmd(config(os.path.join(work, "d.yml"), "ties", base, fulls, {"weight": 0.5, "density": 0.3}),
                               os.path.join(work, "out_d"), args.memory_limit),
        "extract/exact": [DPPA_BIN, "extract-lora", ft, base, os.path.join(work, "ex_exact"), "--rank", str(args.rank),
                          "--overwrite", "-q", "--memory-limit", args.memory_limit],
        "extract/randomized": [DPPA_BIN, "extract-lora", ft, base, os.path.join(work, "ex_rand"), "--rank",
                               str(args.rank), "--exact-below", "0", "--overwrite", "-q", "--memory-limit",
                               args.memory_limit],
    }
    mk = os.path.join(MK_VENV, "bin", "mergekit-extract-lora")
    if not args.no_mergekit and os.access(mk, os.X_OK):
        runs["extract/mergekit"] = [mk, "--model", ft, "--base-model", base, "--out-path", os.path.join(work, "ex_mk"),
                                    "--max-rank", str(args.rank)]
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    results: dict[str, list] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, cmd in runs.items():
            env = mergekit_env() if name.endswith("mergekit") else None
            if name.endswith("mergekit"):
                import shutil

                shutil.rmtree(os.path.join(work, "ex_mk"), ignore_errors=True)
            m = run_measured(cmd, env=env)
            if m.rc != 0:
                raise SystemExit(f"{name} failed ({m.rc}): {m.stderr_tail}")
            results[name].append({"wall_s": m.wall_s, "cpu_s": m.cpu_s, "peak_anon_bytes": m.peak_anon_bytes})
            print(f"round {r + 1} {name:20s} wall {m.wall_s:7.2f} s  cpu {m.cpu_s:7.2f} s  "
                  f"peak {m.peak_anon_bytes / 2**20:7.0f} MiB", flush=True)
    best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in results.items()}
    cpu = {k: min(x["cpu_s"] for x in v) for k, v in results.items()}
    print(f"\nshape {shape}, rank {args.rank}, {linear_params / 1e6:.1f} M params in adapted/decomposed tensors")

    def ratio(a, b):
        return f"wall {best[a]['wall_s'] / best[b]['wall_s']:.2f}x, CPU {cpu[a] / cpu[b]:.2f}x"

    same = None
    if "apply/adapter" in best and "apply/full" in best:
        digests = [{k: v for k, v in folder_digest(os.path.join(work, o)).items() if k.endswith(".safetensors")}
                   for o in ("out_a", "out_b")]
        same = digests[0] == digests[1]  # the weights (the model card names the inputs)
        print(f"apply: adapter input / full input: {ratio('apply/adapter', 'apply/full')} (weights byte-identical: {same})")
    if "ties/adapters" in best and "ties/full" in best:
        print(f"ties:  adapter inputs / full inputs: {ratio('ties/adapters', 'ties/full')}")
    for k in ("extract/exact", "extract/randomized", "extract/mergekit"):
        if k in best:
            print(f"{k:20s} wall {best[k]['wall_s']:7.2f} s = {1e9 * best[k]['wall_s'] / linear_params:7.1f} ns/param, "
                  f"CPU {cpu[k]:7.2f} s = {1e9 * cpu[k] / linear_params:7.1f} ns/param, "
                  f"peak {best[k]['peak_anon_bytes'] / 2**20:.0f} MiB")
    tag = "_" + args.only.replace("/", "-").replace(",", "_") if args.only else ""
    save_result(f"bench_lora_h{shape.hidden}_l{shape.layers}{tag}.json",
                {"shape": shape.__dict__, "rank": args.rank, "params": linear_params, "runs": results,
                 "apply_identical": same})


if __name__ == "__main__":
    main()
