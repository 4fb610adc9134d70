"""Independent in-memory reference for quantized checkpoints, written from the format descriptions
in docs/quantized.md with whole tensors and plain torch (it does not import dppa_stream):
dequantize FP8 with scales and MXFP4, requantize merged float32 values with fresh scales, the
requantization loss, and writers for tiny quantized checkpoints (sharded, scales anywhere)."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

FP8 = {"F8_E4M3": (torch.float8_e4m3fn, 448.0), "F8_E5M2": (torch.float8_e5m2, 57344.0)}
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


# --- FP8 with scales ------------------------------------------------------------------------------

def scale_grid(shape, scale_shape, block):
    """(b0, b1, per_slice) of a weight's scale tensor: one scale per tensor, per row, or per
    b0 x b1 block of each leading slice (the last two axes)."""
    R, C = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    if math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
        return R, C, False
    if tuple(scale_shape[-2:]) == (R, 1) or tuple(scale_shape) == tuple(shape[:-1]):
        return 1, C, True
    return block[0], block[1], True


def expand_scales(shape, scales: torch.Tensor, block) -> torch.Tensor:
    """The float32 scale of every element of a weight of `shape` (as transformers dequantizes)."""
    b0, b1, per_slice = scale_grid(shape, tuple(scales.shape), block)
    s = scales.float()
    if not per_slice:
        return s.reshape(()).expand(shape)
    lead = tuple(shape[:-2])
    R, C = shape[-2], shape[-1]
    s = s.reshape(*lead, -(-R // b0), -(-C // b1))
    return s.repeat_interleave(b0, dim=-2)[..., :R, :].repeat_interleave(b1, dim=-1)[..., :C]


def dequant_fp8(codes: torch.Tensor, scales: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """w = float(code) * scale, in float32."""
    return codes.float() * expand_scales(tuple(codes.shape), scales, block)


def quant_fp8(x: torch.Tensor, scale_shape, block, fp8="F8_E4M3", scale_dtype=torch.float32):
    """Codes and fresh scales of float32 x: per scale, s = amax(|finite x|) / max rounded to the
    scale dtype (1 for an all-zero block, the dtype's smallest positive value when it would round
    to 0); codes = x / s clamped to ±max, rounded to nearest even (torch's cast)."""
    dtype, fmax = FP8[fp8]
    shape = tuple(x.shape)
    b0, b1, per_slice = scale_grid(shape, tuple(scale_shape), block)
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))
    if not per_slice:
        amax = finite.max().reshape(1)
    else:
        lead = shape[:-2]
        R, C = shape[-2], shape[-1]
        SR, SC = -(-R // b0), -(-C // b1)
        pad = torch.zeros(*lead, SR * b0, SC * b1)
        pad[..., :R, :C] = finite
        amax = pad.reshape(*lead, SR, b0, SC, b1).amax(dim=(-3, -1))
    s = (amax / fmax).to(scale_dtype)
    tiny = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[scale_dtype]
    s = torch.where(amax == 0, torch.ones_like(s), torch.where(s.float() == 0, torch.full_like(s, tiny), s))
    s = s.reshape(scale_shape)
    codes = (x / expand_scales(shape, s, block)).clamp(-fmax, fmax).to(dtype)
    return codes, s


# --- MXFP4 ------------------------------------------------------------------------------------------

def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Logical [E, 32 G, R] float32 of blocks [E, R, G, 16] (two E2M1 codes a byte, low nibble
    first) and E8M0 scales [E, R, G] (2 ** (s - 127)): transformers' orientation."""
    E, R, G, _ = blocks.shape
    b = blocks.to(torch.int64)
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(E, R, G, 32)
    vals = E2M1[codes] * torch.exp2(scales.to(torch.float64) - 127).float()[..., None]
    return vals.reshape(E, R, G * 32).transpose(1, 2).contiguous()


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each float, ties to the even code, saturating at ±6."""
    grid = E2M1[:8].double()
    a = y.abs().double().clamp(max=6.0)
    dist = (a[..., None] - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    even = torch.arange(8) % 2 == 0
    pick = torch.where(tied.sum(-1) > 1, (tied & even).float().argmax(-1), dist.argmin(-1))
    return pick + 8 * torch.signbit(y).to(torch.int64)


def quant_mxfp4(x: torch.Tensor, rule: str = "best"):
    """blocks [E, R, G, 16] and scales [E, R, G] of logical float32 [E, 32 G, R]. Shared exponent
    per group of 32: the OCP MX v1.0 X = floor(log2 amax) - 2 (clamped to [-127, 127]); with
    rule "best", X + 1 instead when its squared error (float64, summed in element order) is smaller."""
    E, C, R = x.shape
    G = C // 32
    v = x.transpose(1, 2).reshape(E, R, G, 32)
    amax = v.abs().amax(-1)
    x0 = torch.where(amax == 0, torch.full_like(amax, -127), torch.floor(torch.log2(amax.double())).float() - 2)
    x0 = x0.clamp(-127, 127).to(torch.int64)

    def encode(X):
        y = v * torch.exp2(-X.double()).float()[..., None]
        c = e2m1_codes(y)
        d = (E2M1[c] * torch.exp2(X.double()).float()[..., None]).double() - v.double()
        err = torch.zeros(d.shape[:-1], dtype=torch.float64)
        for t in range(32):  # summed in element order, in float64
            err = err + d[..., t] * d[..., t]
        return c, err

    c0, e0 = encode(x0)
    X = x0
    codes = c0
    if rule == "best":
        x1 = (x0 + 1).clamp(max=127)
        c1, e1 = encode(x1)
        better = (e1 < e0) & (x1 != x0) & (amax != 0)
        X = torch.where(better, x1, x0)
        codes = torch.where(better[..., None], c1, c0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (X + 127).to(torch.uint8)


# --- what requantization lost -------------------------------------------------------------------------

def loss(merged: torch.Tensor, requant: torch.Tensor, ref: torch.Tensor, changed_by: torch.Tensor | None = None):
    """Over the elements of `changed_by` (all when None) of tensors given as rows [rows, C]:
    elements, changed (merged != ref), vanished (changed but requant == ref), Σ (requant - merged)²
    and Σ (merged - ref)². The float32 differences are squared in float64; each row sums them as
    eight partial sums over the columns c = 0..7 (mod 8) in column order, added as
    ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)); the rows' sums are added exactly (Fractions)."""
    from fractions import Fraction

    sel = torch.ones_like(merged, dtype=torch.bool) if changed_by is None else changed_by
    changed = sel & (merged != ref)
    vanished = changed & (requant == ref)
    sums = []
    for v in ((requant - merged).double() ** 2, (merged - ref).double() ** 2):
        v = torch.where(sel, v, torch.zeros_like(v))
        p = torch.zeros(8, v.shape[0], dtype=torch.float64)
        for c in range(v.shape[1]):  # column order, every row at once
            p[c % 8] += v[:, c]
        rows = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
        sums.append(sum((Fraction(x) for x in rows.tolist()), Fraction(0)))
    return int(sel.sum()), int(changed.sum()), int(vanished.sum()), sums[0], sums[1]


# --- writing tiny quantized checkpoints ---------------------------------------------------------------

def save_checkpoint(folder: str, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None,
                    place=None) -> str:
    """Write tensors as HF safetensors (sharded with an index when shards > 1; `place(name)` picks
    a tensor's shard, by default round-robin in name order) and config.json."""
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
                  {"format": "pt"})
        return folder
    groups: dict[int, dict] = {}
    for i, name in enumerate(sorted(tensors)):
        groups.setdefault(place(name) if place else i % shards, {})[name] = tensors[name].contiguous()
    wmap = {}
    for k, group in sorted(groups.items()):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(group, os.path.join(folder, fname), {"format": "pt"})
        wmap.update({n: fname for n in group})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
    return folder
