"""Chunking, node splitting, down-sampling, encoding and the exact round trip of stored trees."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, SharedLLMConfig
from model.testing import make_shared, random_ids
from model.tree import ContextTree, keep_indices, lower_forward, split_lengths


def test_split_lengths_cover_the_chunk_at_every_level():
    levels = split_lengths(512, 3)
    assert levels == [[256] * 2, [128] * 4, [64] * 8]
    short = split_lengths(37, 3)
    assert all(sum(level) == 37 for level in short) and all(n >= 0 for level in short for n in level)


def test_training_noise_moves_split_points_but_keeps_coverage():
    gen = torch.Generator().manual_seed(0)
    noisy = [split_lengths(512, 3, noise=0.1, generator=gen) for _ in range(20)]
    assert any(levels[0] != [256, 256] for levels in noisy)
    for levels in noisy:
        assert all(sum(level) == 512 and min(level) >= 1 for level in levels)


def test_keep_indices_take_the_last_token_of_equal_segments():
    assert keep_indices(256, 16, 1 / 16) == [15 + 16 * j for j in range(16)]
    assert keep_indices(10, 16, 1 / 16) == [9]  # short node: at least one position
    assert keep_indices(0, 16, 1 / 16) == []


def test_config_validation_and_fingerprint():
    cfg = SharedLLMConfig(n_inject_layers=15)
    assert [cfg.slots(level) for level in (1, 2, 3)] == [16, 16, 16]
    assert cfg.memory_slots_per_chunk() == 512 // 8
    assert cfg.fingerprint("abc") == SharedLLMConfig(n_inject_layers=15).fingerprint("abc")
    assert cfg.fingerprint("abc") != cfg.replace(chunk_len=256).fingerprint("abc")
    assert cfg.fingerprint("abc") != cfg.fingerprint("abd")
    assert cfg.fingerprint("abc") == cfg.replace(init_mode="zero").fingerprint("abc")  # reading, not making
    assert SharedLLMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError):
        SharedLLMConfig(n_inject_layers=2, keep_rates=(0.5,))
    with pytest.raises(ConfigError):
        SharedLLMConfig(n_inject_layers=2, chunk_len=100)
    with pytest.raises(ConfigError, match="unknown"):
        SharedLLMConfig.from_json('{"n_inject_layers": 2, "bogus": 1}')


def test_encoded_tree_shapes_and_short_last_chunk(tiny_shared):
    n = 64 * 3 + 20
    tree = tiny_shared.encode_tree(random_ids(n))
    assert tree.n_chunks == 4 and tree.n_tokens == n and tree.height == 3
    for level, lv in enumerate(tree.levels, start=1):
        assert lv.keys.shape == (4, 2**level, 2, 2, 64 // 32, 16)
        assert (lv.positions[:3] >= 0).all()  # full chunks fill every slot
        last_valid = (lv.positions[3] >= 0).sum().item()
        assert 0 < last_valid < lv.positions[3].numel()  # short chunk: fewer slots, the rest empty
        assert lv.keys[3].permute(0, 3, 1, 2, 4)[lv.positions[3] < 0].abs().sum() == 0  # empty slots: zeros
    spans = tree.levels[0].spans
    assert spans[0, 0, 0, 0] == 0 and spans[3, 1][tree.levels[0].positions[3, 1] >= 0][-1, 1] == n


def test_every_node_is_encoded_on_its_own(tiny_shared):
    """The stored K/V of a node equal a lone forward of that node's tokens (padding changes nothing)."""
    ids = random_ids(64 * 2)
    tree = tiny_shared.encode_tree(ids)
    chunk, node = 1, 1  # level-1 right half of chunk 1: tokens 96..127
    keys, values, _ = lower_forward(tiny_shared.base, ids[96:128][None], n_layers=2)
    kept = tree.levels[0].positions[chunk, node].long()
    torch.testing.assert_close(tree.levels[0].keys[chunk, node], keys[0][:, :, kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree.levels[0].values[chunk, node], values[0][:, :, kept], rtol=1e-5, atol=1e-5)


def test_stored_tree_round_trips_exactly_through_safetensors(tiny_base, tmp_path):
    shared = make_shared(tiny_base, tree_dtype="bfloat16")
    tree = shared.encode_tree(random_ids(150))
    path = tmp_path / "tree.safetensors"
    save_file(tree.to_tensors(), str(path))
    back = ContextTree.from_tensors(load_file(str(path)))
    assert (back.n_tokens, back.chunk_len, back.n_chunks) == (tree.n_tokens, tree.chunk_len, tree.n_chunks)
    for a, b in zip(tree.levels, back.levels):
        for name in ("keys", "values", "positions", "spans", "vectors"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_progress_reports_reach_the_total(tiny_shared):
    seen = []
    tiny_shared.encode_tree(random_ids(200), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))


def test_empty_document_is_rejected(tiny_shared):
    with pytest.raises(ValueError, match="empty"):
        tiny_shared.encode_tree([])


def test_bf16_encoding_is_close_to_fp32_and_changes_the_fingerprint(tiny_base):
    exact = make_shared(tiny_base, encode_dtype="float32")
    fast = make_shared(tiny_base, encode_dtype="bfloat16")
    ids = random_ids(128)
    a, b = exact.encode_tree(ids), fast.encode_tree(ids)
    rel = (a.levels[0].keys - b.levels[0].keys).norm() / a.levels[0].keys.norm()
    assert 0 < rel < 0.05
    assert exact.config.fingerprint("x") != fast.config.fingerprint("x")
