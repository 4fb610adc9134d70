import os

import pytest
import torch

from dppa_stream.synthetic import LlamaShape, write_llama_set

# Odd sizes so row ranges, shards and sub-chunks never line up by accident.
SMALL = LlamaShape(hidden=40, intermediate=72, layers=3, vocab=97, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Cached small checkpoint sets: ckpts(dtype, finetunes, sharded) -> [base, ft1, ...]."""
    root = tmp_path_factory.mktemp("ckpts")
    cache = {}

    def make(dtype=torch.bfloat16, finetunes=2, sharded=False, shape=SMALL, drift=1e-3):
        key = (dtype, finetunes, sharded, shape, drift)
        if key not in cache:
            folder = os.path.join(root, f"set{len(cache)}")
            cache[key] = write_llama_set(folder, shape, finetunes, dtype, seed=len(cache),
                                         shard_size=20_000 if sharded else 5_000_000_000, drift=drift)
        return cache[key]

    return make
