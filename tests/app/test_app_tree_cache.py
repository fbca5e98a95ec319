"""GPU-resident trees on the question path: DocumentService serves repeat questions from the device
tree cache (no file read), never across owners, and drops entries of deleted or re-encoded trees.
The cache is exercised on the CPU here (its device is a parameter); on CUDA it holds GPU tensors."""

from __future__ import annotations

import pytest
import torch

from app.services.errors import NotFound
from app.tree_cache import DeviceTreeCache


def test_repeat_questions_read_the_device_cache_not_the_file(ctx, two_users, make_doc, monkeypatch):
    alice, bob = two_users
    a = make_doc(alice.id, "a.pdf")
    b = make_doc(alice.id, "b.pdf", ["Another document entirely. The deposit is 3,000 dollars."] * 2)
    fp = ctx.model().fingerprint
    docs = ctx.documents
    first, other = docs.load_for_qa(alice.id, [a, b], fp)
    room = max(first.tree.nbytes(), other.tree.nbytes())
    docs.device_trees = DeviceTreeCache(room, "cpu")  # room for one tree, not two
    docs._cache.clear()
    reads = []
    real = docs._tensors.load
    monkeypatch.setattr(docs._tensors, "load", lambda *args: reads.append(args[0]) or real(*args))
    [cold] = docs.load_for_qa(alice.id, [a], fp)
    [warm] = docs.load_for_qa(alice.id, [a], fp)
    assert len(reads) == 1 and warm.tree is cold.tree
    assert warm.token_ids == first.token_ids
    assert torch.equal(warm.tree.levels[0].keys, first.tree.levels[0].keys)
    assert not docs._cache  # resident trees are not also held by the host cache
    with pytest.raises(NotFound):  # a warm cache changes nothing for another user
        docs.load_for_qa(bob.id, [a], fp)
    docs.load_for_qa(alice.id, [b], fp)  # evicts a
    assert len(docs.device_trees) == 1
    docs.load_for_qa(alice.id, [a], fp)
    assert len(reads) == 3
    docs.delete(alice.id, a)
    assert len(docs.device_trees) == 0 and docs.device_trees.bytes == 0


def test_cache_is_only_made_for_a_cuda_model_with_a_budget(tiny_model):
    assert DeviceTreeCache.for_model(tiny_model, 8.0) is None  # CPU: the memory map serves it

    class OnCuda:
        device = torch.device("cuda")

    assert DeviceTreeCache.for_model(OnCuda(), 0.0) is None
    cache = DeviceTreeCache.for_model(OnCuda(), 0.5)
    assert cache is not None and cache.max_bytes == 2**29


def test_discard_keeps_the_current_version_of_a_path():
    class Tree:
        def nbytes(self):
            return 10

        def kv_to(self, device):
            return self

    cache = DeviceTreeCache(100, "cpu")
    cache.put("1/t.safetensors", "old", Tree(), None)
    cache.put("2/t.safetensors", "x", Tree(), None)
    cache.discard_path("1/t.safetensors", keep_sha256="new")
    assert cache.get("1/t.safetensors", "old") is None and cache.get("2/t.safetensors", "x") is not None
    assert cache.bytes == 10
    big = Tree()
    big.nbytes = lambda: 1000
    assert cache.put("3/t.safetensors", "y", big, None) is big and len(cache) == 1  # larger than the budget
