"""Brute-force DP / DPA written from the method as docs/dppa.md describes it (whole tensors, sorts, bf16 torch
arithmetic as the authors' code does it). Independent of dppa_stream's histogram-based code."""

from __future__ import annotations

import re

import numpy as np
import torch

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _bf16(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).to(torch.bfloat16)


def _norm(v: np.ndarray, w=None) -> np.ndarray:
    c = v.mean() if w is None else (v * w).sum() / w.sum()
    y = v - c
    m = np.abs(y).max()
    return y / m if m > 0 else np.zeros_like(y)


def dp_masks(base: dict, ft: dict, rates, lam=0.08, M=5.0, LM=3.0, semantics="reference"):
    """Per linear tensor: list (one per rate) of boolean keep masks, and the deltas used."""
    deltas, linears = {}, {}
    for name, b in base.items():
        d = ft[name].float() - b.float()
        if semantics == "reference":
            d = d.to(torch.bfloat16)
        deltas[name] = d
        m = LAYER.search(name)
        if m and b.dim() == 2:
            linears[name] = int(m.group(1))
    names = sorted(linears, key=lambda t: (linears[t], t))
    r = []
    for t in names:
        a = deltas[t].abs()
        if semantics == "reference":
            mu = _bf16(a.double().mean().item())
            thr = (mu.float() * M).to(torch.bfloat16)
            r.append(100.0 * int((a > thr).sum()) / a.numel())
        else:
            mu = a.double().mean().item()
            r.append(100.0 * int((a.double() > M * mu).sum()) / a.numel())
    blocks = sorted(set(linears.values()))
    D = []
    for b in blocks:
        A = torch.cat([deltas[t].abs().reshape(-1) for t in names if linears[t] == b])
        if semantics == "reference":
            mu = _bf16(A.double().mean().item())
            ratio = (A.float() / mu.float()).to(torch.bfloat16)
            D.append(100.0 * int((ratio.float() > LM).sum()) / A.numel())
        else:
            mu = A.double().mean().item()
            D.append(100.0 * int((A.double() > LM * mu).sum()) / A.numel())
    L = dict(zip(blocks, _norm(np.array(D))))
    r = np.array(r)
    n = np.array([deltas[t].numel() for t in names], dtype=np.float64)
    x = r / r.mean() if r.mean() > 0 else np.zeros_like(r)
    T = _norm(x, n)
    masks = {}
    for t, tscore in zip(names, T):
        a = deltas[t].abs().float().reshape(-1)
        nn = a.numel()
        per_rate = []
        for s in rates:
            d = (1 - s) + lam * L[linears[t]]
            d = d + lam * tscore
            d = min(1.0, max(1 / nn, d))
            if semantics == "reference":
                k = min(int(nn * (1 - d)), nn - 1)
                t_val = torch.sort(a).values[k]
                keep = a > t_val
            else:
                keep_n = nn - int(nn * (1 - d))
                order = torch.sort(a, descending=True, stable=True).indices
                keep = torch.zeros(nn, dtype=torch.bool)
                keep[order[:keep_n]] = True
            per_rate.append(keep.reshape(deltas[t].shape))
        masks[t] = per_rate
    return deltas, masks


def dppa_merge(base: dict, fts: list[dict], rates, alphas: list[list[float]], weights, lam=0.08, M=5.0, LM=3.0,
               semantics="reference", amplify_unpruned=True, out_dtype=None) -> dict:
    """theta0 + sum_t w_t * delta'_t with delta' from the DPA closed form (§4.2)."""
    merged = {name: torch.zeros_like(b, dtype=torch.float32) for name, b in base.items()}
    for ft, alpha, w in zip(fts, alphas, weights):
        deltas, masks = dp_masks(base, ft, rates, lam, M, LM, semantics)
        for name, d in deltas.items():
            d = d.float()
            if name in masks:
                factor = torch.zeros_like(d)
                for j in reversed(range(len(rates))):
                    factor[masks[name][j]] = max(alpha[j:])
                dd = d * factor
            else:
                dd = d * max(alpha) if amplify_unpruned else d
            merged[name] += w * dd if w != 1 else dd
    return {n: (base[n].float() + merged[n]).to(out_dtype or base[n].dtype) for n in base}
