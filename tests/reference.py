"""Independent in-memory reference merges, written from docs/merge-methods.md and
docs/dppa-algorithm.md with whole tensors and plain sorts (no histograms, no chunking, no Dask).
The streaming engine must reproduce these bit for bit."""

from __future__ import annotations

import glob
import math
import os

import torch
from safetensors.torch import load_file


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


def reference_merge(method: str, base_path: str | None, model_paths: list[str], weights, densities=None,
                    normalize=None, lam=1.0, out_dtype=None, seed=0, rescale=None) -> dict[str, torch.Tensor]:
    from dppa_stream import rng  # the mask *definition* (seed, model, tensor, index) -> draw

    models = [load_model(p) for p in model_paths]
    base = load_model(base_path) if base_path else None
    ref = base or models[0]
    out = {}
    for name, b0 in ref.items():
        odt = out_dtype or b0.dtype
        if not b0.is_floating_point():
            out[name] = b0.clone()
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
        elif method == "magnitude":
            deltas = [prune_le(d, 1 - dens) for d, dens in zip(deltas, densities)]
        elif method in ("dare_linear", "dare_ties"):
            new = []
            for i, (d, dens) in enumerate(zip(deltas, densities)):
                if dens >= 1:
                    new.append(d)
                    continue
                key = rng.stream_key(seed, i, name)
                mask = rng.keep_mask(key, 0, d.numel(), dens).reshape(d.shape)
                kept = d * mask
                if rescale is not False:
                    before = math.fsum(d.abs().reshape(-1).double().tolist())
                    after = math.fsum(kept.abs().reshape(-1).double().tolist())
                    if before >= 1e-7 and after >= 1e-7:
                        kept = kept * (before / after)
                new.append(kept)
            deltas = new
        consensus = method in ("ties", "dare_ties")
        norm = normalize if normalize is not None else (method == "ties")
        out[name] = gta(b, deltas, weights, consensus, norm, lam).to(odt)
    return out
