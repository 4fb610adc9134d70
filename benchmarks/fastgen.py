"""Fast synthetic Llama-shaped checkpoint sets for the memory and scaling benchmarks.

`dppa_stream.synthetic.write_llama_set` draws a fresh Student-t sample per element (df + 2 normal
draws each): about 9 M elements/s on one core here, i.e. ~6 min per 6 GB fine-tune. This module
writes the same kind of data (same tensor names, shapes, HF `config.json`, sharding, base
N(0, 0.02) weights, norms ~ 1 + N(0, 0.05), fine-tune = base + depth-scaled heavy-tailed delta
with ~5 % exact zeros, rounded to the checkpoint dtype) ~20-40x faster:

- noise comes from fixed pools drawn once per process (one N(0,1) pool, one Student-t pool per
  degrees-of-freedom value with its ~5 % zeros already in place), each 3x a row block; every row
  block reads a window of each pool at an offset derived from a hash of (seed, model, tensor, row).
  Values therefore repeat across blocks (harmless for merging benchmarks: bf16 has only 65536
  values anyway), but the output is deterministic and every model differs from the others;
- one pass over the tensors writes all models at once (the base block is computed once and each
  fine-tune adds its own delta), straight to pre-laid-out shards with `ShardLayout`/`write_rows`
  -- no tensor is ever whole in memory (peak ~ pools (~0.4 GB) + one 4 M-element block).

Sets are cached under benchmarks/data/ by a name that encodes every parameter, with a marker
written last (like `common.dataset`).

    python benchmarks/fastgen.py --scale 6 --finetunes 4      # generate (or find) a set, print paths
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import COMPLETE_MARK, DATA_DIR  # noqa: E402

from dppa_stream.checkpoint import ShardLayout, write_rows  # noqa: E402
from dppa_stream.checkpoint.format import NAME_OF_TORCH_DTYPE  # noqa: E402
from dppa_stream.synthetic import LlamaShape, _layer_of  # noqa: E402

BLOCK_ELEMS = 1 << 22  # elements per row block (as write_llama_set)
POOL_ELEMS = 3 * BLOCK_ELEMS  # every block reads a window of each pool
GEN_VERSION = 2  # bump when the generated values change (part of the cache key)

# Llama-3-8B widths (hidden 4096, MLP 14336, GQA 32/8, vocab 128256): 2 x 1.05 GB of embed_tokens +
# lm_head in bf16, + 0.436 GB per block. Below ~2.5 GB per checkpoint that family cannot shrink, so
# smaller scales use TinyLlama-1.1B widths (2048, 5632, 32/4, vocab 32000): 0.26 GB + 0.088 GB/block.
LLAMA3_8B = dict(hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8)
TINYLLAMA = dict(hidden=2048, intermediate=5632, vocab=32000, heads=32, kv_heads=4)


def shape_for(gb: float, dtype_bytes: int = 2) -> LlamaShape:
    """The Llama shape whose checkpoint is closest to (and at least) `gb` GB (1e9 bytes)."""
    family = LLAMA3_8B if gb >= 2.5 else TINYLLAMA
    one = LlamaShape(layers=1, **family)
    zero = LlamaShape(layers=0, **family)
    per_layer = (one.numel() - zero.numel()) * dtype_bytes
    fixed = zero.numel() * dtype_bytes
    layers = max(1, -(-int(gb * 1e9 - fixed) // per_layer))
    return LlamaShape(layers=layers, **family)


def _h(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class Pools:
    def __init__(self, seed: int):
        self.seed = seed
        g = torch.Generator().manual_seed(_h("pool", seed, "normal") >> 1)
        self.normal = torch.randn(POOL_ELEMS, generator=g)
        self._t: dict[int, torch.Tensor] = {}

    def t(self, df: int) -> torch.Tensor:
        if df not in self._t:
            g = torch.Generator().manual_seed(_h("pool", self.seed, "t", df) >> 1)
            z = torch.randn(POOL_ELEMS, generator=g)
            chi2 = torch.zeros(POOL_ELEMS)
            for _ in range(df):
                chi2.add_(torch.randn(POOL_ELEMS, generator=g).square_())
            t = z.div_(chi2.div_(df).sqrt_())
            t[torch.rand(POOL_ELEMS, generator=g) < 0.05] = 0.0  # untouched weights (~5 %)
            self._t[df] = t
        return self._t[df]

    @staticmethod
    def window(pool: torch.Tensor, n: int, *key) -> torch.Tensor:
        off = _h(*key) % (pool.numel() - n + 1)
        return pool[off:off + n]


def _delta_params(name: str, layers: int, ft: int, drift: float) -> tuple[float, int]:
    """Scale and tail (Student-t df) of fine-tune `ft`'s delta, as in dppa_stream.synthetic."""
    layer = _layer_of(name)
    depth = 0.5 + 1.5 * (layer + 1) / max(1, layers) if layer >= 0 else 0.7
    kind = 1.6 if "mlp" in name else 1.0
    scale = drift * depth * kind * (1.0 + 0.3 * ft)
    df = 3 + (4 if layer < 0 else round(6 * (1 - (layer + 1) / max(1, layers)))) + (1 if "mlp" in name else 0)
    return scale, df


def write_fast_set(folder: str, shape: LlamaShape, finetunes: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                   drift: float = 1e-3, shard_size: int = 5_000_000_000, progress: bool = True) -> list[str]:
    names = ["base"] + [f"ft{k + 1}" for k in range(finetunes)]
    outs = [os.path.join(folder, n) for n in names]
    specs = [(n, NAME_OF_TORCH_DTYPE[dtype], s) for n, s in shape.tensors()]
    layout = ShardLayout(specs, shard_size)
    for out in outs:
        os.makedirs(out, exist_ok=True)
        layout.preallocate(out)
    pools = Pools(seed)
    total = shape.numel()
    done, t0, last = 0, time.perf_counter(), 0.0
    for name, tshape in shape.tensors():
        rows = tshape[0]
        row_numel = 1
        for d in tshape[1:]:
            row_numel *= d
        step = max(1, BLOCK_ELEMS // row_numel)
        scale_df = [_delta_params(name, shape.layers, ft, drift) for ft in range(finetunes)]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * row_numel
            rshape = (r1 - r0,) + tuple(tshape[1:])
            w = Pools.window(pools.normal, n, seed, name, r0, "base")
            base = (w * 0.05 + 1.0) if "norm" in name else (w * 0.02)
            write_rows(outs[0], layout.placements[name], r0 * row_numel, base.to(dtype).reshape(rshape))
            for ft, (scale, df) in enumerate(scale_df):
                delta = Pools.window(pools.t(df), n, seed, name, r0, "delta", ft)
                write_rows(outs[ft + 1], layout.placements[name], r0 * row_numel,
                           torch.add(base, delta, alpha=scale).to(dtype).reshape(rshape))
            done += n
            now = time.perf_counter()
            if progress and now - last > 10:
                last = now
                print(f"  {done / total:6.1%}  {done * (finetunes + 1) * dtype.itemsize / (now - t0) / 1e6:.0f} MB/s",
                      flush=True)
    for out in outs:
        layout.finish(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(shape.hf_config(dtype), f, indent=2)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    return outs


def set_key(shape: LlamaShape, finetunes: int, dtype: torch.dtype, seed: int, drift: float) -> str:
    dname = str(dtype).removeprefix("torch.")
    return (f"fast{GEN_VERSION}_llama_h{shape.hidden}_i{shape.intermediate}_l{shape.layers}_v{shape.vocab}"
            f"_a{shape.heads}_kv{shape.kv_heads}{'_tied' if shape.tie_embeddings else ''}_{dname}_ft{finetunes}"
            f"_s{seed}_d{drift:g}")


def find_set(shape: LlamaShape, finetunes: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
             drift: float = 1e-3) -> str | None:
    """A cached complete set with at least `finetunes` fine-tunes (fine-tune k does not depend on
    how many were generated, so a set of 4 serves K = 1, 2, 3, 4)."""
    for k in range(finetunes, 9):
        folder = os.path.join(DATA_DIR, set_key(shape, k, dtype, seed, drift))
        if os.path.isfile(os.path.join(folder, COMPLETE_MARK)):
            return folder
    return None


def fast_dataset(shape: LlamaShape, finetunes: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 drift: float = 1e-3, log: list | None = None) -> list[str]:
    """Paths (base, ft1..ftK) of a cached fast set; generated on first use. Generation time and
    throughput are recorded in the set's marker file (and appended to `log`)."""
    folder = find_set(shape, finetunes, dtype, seed, drift)
    if folder is None:
        folder = os.path.join(DATA_DIR, set_key(shape, finetunes, dtype, seed, drift))
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        nbytes = shape.numel() * dtype.itemsize * (finetunes + 1)
        print(f"generating {os.path.basename(folder)} ({nbytes / 1e9:.1f} GB) ...", flush=True)
        t0 = time.perf_counter()
        write_fast_set(folder, shape, finetunes, dtype, seed, drift)
        dt = time.perf_counter() - t0
        with open(os.path.join(folder, COMPLETE_MARK), "w") as f:
            json.dump({"generator": f"benchmarks/fastgen.py v{GEN_VERSION}", "shape": asdict(shape),
                       "finetunes": finetunes, "dtype": str(dtype).removeprefix("torch."), "seed": seed, "drift": drift,
                       "numel": shape.numel(), "bytes": nbytes, "seconds": dt, "mb_per_s": nbytes / dt / 1e6}, f, indent=2)
        print(f"  done in {dt:.0f}s ({nbytes / dt / 1e6:.0f} MB/s)", flush=True)
    with open(os.path.join(folder, COMPLETE_MARK)) as f:
        info = json.load(f)
    if log is not None:
        log.append({"folder": folder, **info})
    return [os.path.join(folder, "base")] + [os.path.join(folder, f"ft{k + 1}") for k in range(finetunes)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=6.0, help="GB (1e9 bytes) per checkpoint, bf16")
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = shape_for(args.scale)
    print(shape, f"{shape.numel() * 2 / 1e9:.2f} GB per checkpoint")
    for p in fast_dataset(shape, args.finetunes, seed=args.seed):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
