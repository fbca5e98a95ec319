"""One tiered tree cache on the question path: the library serves repeat questions from it (no file
read), never across owners, and drops entries of deleted or re-encoded trees. The device tier is
exercised on the CPU here (which device types it takes is a parameter); on CUDA it holds GPU tensors."""

from __future__ import annotations

import pytest
import torch

from app.services.errors import NotFound
from app.tree_cache import TreeCache


def test_repeat_questions_read_the_cache_not_the_file(ctx, two_users, make_doc, monkeypatch):
    alice, bob = two_users
    a = make_doc(alice.id, "a.pdf")
    b = make_doc(alice.id, "b.pdf", ["Another document entirely. The deposit is 3,000 dollars."] * 2)
    fp = ctx.model().fingerprint
    docs = ctx.documents
    first, other = docs.load_for_qa(alice.id, [a, b], fp)
    room = max(first.tree.nbytes(), other.tree.nbytes())
    cache = TreeCache(host_entries=0, device_bytes=room, device=lambda: torch.device("cpu"), device_types=("cpu",))
    monkeypatch.setattr(docs, "_trees", cache)  # room for one tree on the "device", none in host memory
    reads = []
    real = docs._tensors.load
    monkeypatch.setattr(docs._tensors, "load", lambda *args: reads.append(args[0]) or real(*args))
    [cold] = docs.load_for_qa(alice.id, [a], fp)
    [warm] = docs.load_for_qa(alice.id, [a], fp)
    assert len(reads) == 1 and warm.tree is cold.tree and warm.token_ids == first.token_ids
    assert torch.equal(warm.tree.levels[0].keys, first.tree.levels[0].keys)
    with pytest.raises(NotFound):  # a warm cache changes nothing for another user
        docs.load_for_qa(bob.id, [a], fp)
    docs.load_for_qa(alice.id, [b], fp)  # evicts a
    assert cache.sizes() == (0, 1)
    docs.load_for_qa(alice.id, [a], fp)
    assert len(reads) == 3
    docs.delete(alice.id, a)
    assert cache.sizes() == (0, 0) and cache.bytes_on_device == 0


def test_device_tier_only_for_a_device_of_its_types_with_a_budget():
    class Tree:
        moved = False

        def nbytes(self):
            return 10

        def kv_to(self, device):
            self.moved = True
            return self

    cpu = TreeCache(host_entries=4, device_bytes=100, device=lambda: torch.device("cpu"))
    tree = Tree()
    cpu.put("1/t", "x", tree, None)
    assert not tree.moved and cpu.sizes() == (1, 0)  # a CPU model: the memory map serves it
    no_budget = TreeCache(device_bytes=0, device=lambda: torch.device("cuda"))
    no_budget.put("1/t", "x", Tree(), None)
    assert no_budget.sizes() == (1, 0)


def test_discard_keeps_the_current_version_of_a_path_in_both_tiers():
    class Tree:
        def nbytes(self):
            return 10

        def kv_to(self, device):
            return self

    cache = TreeCache(host_entries=4, device_bytes=15, device=lambda: "meta", device_types=("meta",))
    cache.put("1/t", "old", Tree(), None)  # on the device
    big = Tree()
    big.nbytes = lambda: 1000
    cache.put("2/t", "x", big, None)  # larger than the device budget: host memory
    cache.put("1/t", "new", Tree(), None)  # replaces the old version
    assert cache.get("1/t", "old") is None and cache.get("1/t", "new") is not None
    assert cache.sizes() == (1, 1) and cache.bytes_on_device == 10
    cache.discard("2/t")
    assert cache.get("2/t", "x") is None and cache.sizes() == (0, 1)
