"""A tree whose K/V live on the GPU (`ContextTree.kv_to`) yields exactly the memory of the same
tree in host memory: the GPU path for hot documents changes where the gather runs, not what it reads.
(CUDA only: on the CPU `kv_to` is the identity, so the comparison could not fail.)"""

from __future__ import annotations

import pytest
import torch

from model.testing import make_shared, random_transformer, tiny_config


def _memories(device: str):
    torch.manual_seed(0)
    shared = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0))
    tree = shared.encode_tree(torch.randint(0, 128, (700,)))  # a short last chunk
    query = shared.query_vector(torch.randint(0, 128, (9,)))
    host = shared.build_memory([tree, tree], query)
    moved = tree.kv_to(device)
    assert moved.levels[0].keys.device.type == torch.device(device).type
    assert moved.levels[0].vectors.device.type == "cpu"  # the search reads small host tensors
    return host, shared.build_memory([moved, tree], query)


def _assert_same(a, b):
    assert torch.equal(a.keys.cpu(), b.keys.cpu()) and torch.equal(a.values.cpu(), b.values.cpu())
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        assert torch.equal(a.mask.cpu(), b.mask.cpu())
    assert torch.equal(a.spans, b.spans) and torch.equal(a.chunk_index, b.chunk_index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_resident_tree_gives_the_same_memory():
    _assert_same(*_memories("cuda"))
