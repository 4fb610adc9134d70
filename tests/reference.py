"""Independent in-memory reference merges, written from mergekit 0.1.5's method definitions
(docs/mergekit.md) and DPPA as docs/dppa.md describes it, with whole tensors and plain sorts (no
histograms, no chunking, no Dask).
The streaming engine must reproduce these bit for bit."""

from __future__ import annotations

import glob
import hashlib
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file

from . import reference_kernels as rk


# DARE's random numbers, from the specification in docs/mergekit.md (written here, not imported, so
# that a mistake in the engine's generator cannot hide behind the same mistake in the check):
# stream key = first 8 bytes (little-endian) of blake2b("{seed}\0{model}\0{tensor}");
# element i is kept when the top 24 bits of SplitMix64-finalise(i * 0x9E3779B97F4A7C15 + key)
# are below floor(density * 2**24).
def stream_key(seed: int, model: int, tensor: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{model}\0{tensor}".encode(), digest_size=8).digest(), "little")


def keep_mask(key: int, start: int, count: int, density: float) -> np.ndarray:
    mask64 = (1 << 64) - 1
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key & mask64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)) < np.uint64(int(density * (1 << 24)))


def load_model(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def topk_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly max(1, int(d*n)) largest |delta|; ties at the threshold -> lowest index."""
    flat = delta.reshape(-1)
    n = flat.numel()
    if density >= 1:
        return delta.clone()
    k = max(1, int(density * n))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return (flat * mask).reshape(delta.shape)


def prune_le(delta: torch.Tensor, sparsity: float) -> torch.Tensor:
    """DPPA reference magnitude pruning: t = sorted|d|[int(n*s)] (0-based), prune |d| <= t."""
    flat = delta.reshape(-1)
    n = flat.numel()
    t = torch.sort(flat.abs()).values[min(int(n * sparsity), n - 1)]
    return torch.where(flat.abs() <= t, torch.zeros_like(flat), flat).reshape(delta.shape)


def gta(base, deltas, weights, consensus, normalize, lam):
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).reshape((-1,) + (1,) * base.dim())
    wd = stacked * w
    if consensus:
        maj = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = wd.sign() == maj
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def sce(base: torch.Tensor, deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE (docs/mergekit.md): keep the k = int(float32(nnz) * float32(select_topk)) elements of
    largest variance across models (ties: lowest index); weight each model by the mean square of
    its kept delta (exact, float64), normalised by their sum (uniform below 1e-6); elect signs and
    take the weighted disjoint mean."""
    n = base.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if select_topk < 1:
        var = rk.variance([d.reshape(-1) for d in deltas])
        k = int(np.float32(int(torch.count_nonzero(var))) * np.float32(select_topk)) if select_topk > 0 else 0
        keep = rk.top_k_keep(var, k) if k > 0 else torch.zeros(n, dtype=torch.bool)
    flat = [d.reshape(-1) for d in deltas]
    omega = [float(rk.exact_dot(d * keep, d * keep)) / n for d in flat]
    total = sum(omega)
    omega = [1.0 / len(flat)] * len(flat) if abs(total) < 1e-6 else [w / total for w in omega]
    return rk.sce_merge(base.reshape(-1), flat, keep, omega).reshape(base.shape)


def arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Arcee fusion (docs/mergekit.md): keep the changes whose importance |x - base| * KL(row) reaches
    median + 1.5 (q3 - q1) of the importance, quantiles exact (sorted)."""
    row_len = base.shape[-1] if base.dim() else 1
    imp = rk.arcee_importance(base.reshape(-1), x.reshape(-1), row_len)
    return rk.arcee_merge(base.reshape(-1), x.reshape(-1), imp, rk.arcee_threshold(imp)).reshape(base.shape)


def reference_merge(method: str, base_path: str | None, model_paths: list[str], weights, densities=None,
                    normalize=None, lam=1.0, out_dtype=None, seed=0, rescale=None, gamma=0.01,
                    select_topk=1.0) -> dict[str, torch.Tensor]:
    models = [load_model(p) for p in model_paths]
    base = load_model(base_path) if base_path else None
    ref = base or models[0]
    out = {}
    for name, b0 in ref.items():
        odt = out_dtype or b0.dtype
        if not b0.is_floating_point():
            out[name] = b0.clone()
            continue
        if method in ("sce", "arcee_fusion"):
            b = b0.float()
            merged = (sce(b, [m[name].float() - b for m in models], select_topk) if method == "sce"
                      else arcee_fusion(b, models[0][name].float()))
            out[name] = merged.to(odt)
            continue
        if method == "linear":
            xs = torch.stack([m[name].float() for m in models])
            w = torch.tensor(weights, dtype=torch.float32).reshape((-1,) + (1,) * b0.dim())
            r = (w * xs).sum(0)
            if normalize is not False:
                r = r / w.sum(0)
            out[name] = r.to(odt)
            continue
        b = b0.float()
        deltas = [m[name].float() - b for m in models]
        if method in ("ties",):
            deltas = [topk_keep(d, dens) for d, dens in zip(deltas, densities)]
        elif method in ("breadcrumbs", "breadcrumbs_ties"):
            deltas = [d * rk.breadcrumbs_keep(d.reshape(-1), dens, gamma).reshape(d.shape) if dens < 1 else d
                      for d, dens in zip(deltas, densities)]
        elif method == "magnitude":
            deltas = [prune_le(d, 1 - dens) for d, dens in zip(deltas, densities)]
        elif method in ("dare_linear", "dare_ties"):
            new = []
            for i, (d, dens) in enumerate(zip(deltas, densities)):
                if dens >= 1:
                    new.append(d)
                    continue
                mask = torch.from_numpy(keep_mask(stream_key(seed, i, name), 0, d.numel(), dens)).reshape(d.shape)
                kept = d * mask
                if rescale is not False:
                    before = math.fsum(d.abs().reshape(-1).double().tolist())
                    after = math.fsum(kept.abs().reshape(-1).double().tolist())
                    if before >= 1e-7 and after >= 1e-7:
                        kept = kept * (before / after)
                new.append(kept)
            deltas = new
        consensus = method in ("ties", "dare_ties", "breadcrumbs_ties")
        norm = normalize if normalize is not None else (method == "ties")
        out[name] = gta(b, deltas, weights, consensus, norm, lam).to(odt)
    return out
