"""Counter-based random numbers: the draw for element i depends only on (seed, model, tensor, i).

DARE's masks must not depend on chunking, worker count or scheduling, so there is no generator
state: each element's draw is the SplitMix64 finaliser applied to a key-derived counter. We
hand-write this (a dozen numpy lines) because numpy's Philox cannot cheaply start at an arbitrary
element index, and torch lacks unsigned 64-bit shifts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def stream_key(seed: int, model: int, tensor: str) -> int:
    """A 64-bit key naming one (seed, model, tensor) stream."""
    h = hashlib.blake2b(f"{seed}\0{model}\0{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keep_mask(key: int, start: int, count: int, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask for flat elements [start, start+count) of one stream.

    P(keep) = floor(density * 2**24) / 2**24, from the top 24 bits of each element's hash.
    """
    with np.errstate(over="ignore"):
        idx = np.arange(start, start + count, dtype=np.uint64)
        z = _mix(idx * _GOLDEN + np.uint64(key))
    limit = np.uint64(int(density * (1 << 24)))
    return torch.from_numpy((z >> np.uint64(40)) < limit)
