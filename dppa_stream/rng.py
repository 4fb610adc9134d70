"""Counter-based random numbers: the draw for element i depends only on (seed, model, tensor, i).

DARE's masks must not depend on chunking, worker count or scheduling, so there is no generator
state: each element's draw is the SplitMix64 finaliser applied to a key-derived counter
(`kernels.keep_draw`). This module names the streams. We hand-write the generator (a few lines)
because numpy's Philox cannot cheaply start at an arbitrary element index inside a compiled loop.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stream_key(seed: int, model: int, tensor: str) -> int:
    """A 64-bit key naming one (seed, model, tensor) stream: the first 8 bytes (little-endian) of
    blake2b("{seed}\\0{model}\\0{tensor}")."""
    h = hashlib.blake2b(f"{seed}\0{model}\0{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def stream_keys(seed: int, model: int, tensors) -> np.ndarray:
    """`stream_key` of each of `tensors` (uint64): the hash of the shared prefix is copied, not
    recomputed, and the digests are read as one array (a batch holds thousands of tensors)."""
    prefix = hashlib.blake2b(f"{seed}\0{model}\0".encode(), digest_size=8)

    def digest(tensor: str) -> bytes:
        h = prefix.copy()
        h.update(tensor.encode())
        return h.digest()

    return np.frombuffer(b"".join(map(digest, tensors)), "<u8").astype(np.uint64)
