"""Query-aware search on constructed vectors, memory size/order, multi-document and top-k."""

from __future__ import annotations

import torch

from model.memory import build_memory
from model.search import cosine, preselect_chunks, select_nodes
from model.testing import make_shared, random_ids


def _tree(shared, n_tokens, seed=0):
    return shared.encode_tree(random_ids(n_tokens, seed=seed))


def test_selected_child_is_the_more_similar_one_at_every_level(tiny_shared):
    tree = _tree(tiny_shared, 64 * 5)
    gen = torch.Generator().manual_seed(1)
    for lv in tree.levels:
        lv.vectors = torch.randn(lv.vectors.shape, generator=gen)
    query = torch.randn(64, generator=gen)
    preserved = select_nodes(tree, query)
    for c in range(tree.n_chunks):
        current = 0
        for level in (1, 2):
            left, right = 2 * current, 2 * current + 1
            sims = cosine(query, tree.levels[level - 1].vectors[c])
            chosen = right if sims[right] > sims[left] else left
            other = left if chosen == right else right
            assert preserved[level - 1][c].tolist() == [other]
            current = chosen
        assert preserved[2][c].tolist() == [2 * current, 2 * current + 1]


def test_language_modelling_policy_always_selects_the_right_child(tiny_shared):
    tree = _tree(tiny_shared, 64 * 2)
    preserved = select_nodes(tree, None)
    assert preserved[0][:, 0].tolist() == [0, 0]  # right selected at level 1 -> left preserved
    assert preserved[1][:, 0].tolist() == [2, 2]  # node 1's children are 2, 3: right (3) selected
    assert preserved[2].tolist() == [[6, 7], [6, 7]]


def test_memory_holds_L_over_8_positions_per_full_chunk_in_chunk_order(tiny_shared):
    tree = _tree(tiny_shared, 64 * 6)
    query = torch.randn(64)
    memory = tiny_shared.build_memory([tree], query)
    assert memory.n_positions == 6 * 64 // 8 and memory.mask is None and memory.n_chunks == 6
    assert memory.chunk_index.tolist() == sorted(memory.chunk_index.tolist())
    starts = memory.spans[:, 0]
    assert torch.all(starts[1:] >= starts[:-1])  # document order within and across chunks
    assert memory.keys.shape == (2, 1, 2, 6 * 8, 16)


def test_several_documents_concatenate_in_a_stable_order(tiny_shared):
    a, b = _tree(tiny_shared, 64 * 2, seed=1), _tree(tiny_shared, 64 * 3 + 10, seed=2)
    query = torch.randn(64)
    memory = tiny_shared.build_memory([a, b], query)
    assert memory.doc_index.tolist() == [0] * 16 + [1] * (memory.n_positions - 16)
    assert memory.n_chunks == 6 and memory.mask is not None  # b's short last chunk has empty slots
    again = tiny_shared.build_memory([a, b], query)
    assert torch.equal(memory.keys, again.keys)


def test_keys_are_rotated_by_chunk_position_only(tiny_shared):
    """Two identical chunks give the same stored keys; after gathering, chunk 1's keys are chunk 0's
    rotated by exactly one position."""
    ids = random_ids(64)
    tree = tiny_shared.encode_tree(torch.cat([ids, ids]))
    memory = tiny_shared.build_memory([tree], None)
    from model.rope import apply_rope, rope_angles

    k0, k1 = memory.keys[:, :, :, :8], memory.keys[:, :, :, 8:16]
    cos, sin = rope_angles(tiny_shared.base.inv_freq, torch.tensor([1]), k0.dtype)
    torch.testing.assert_close(apply_rope(k0, cos, sin), k1, rtol=1e-4, atol=1e-5)


def test_topk_preselection_keeps_document_and_chunk_order(tiny_shared):
    a, b = _tree(tiny_shared, 64 * 4, seed=3), _tree(tiny_shared, 64 * 4, seed=4)
    query = torch.randn(64)
    kept = preselect_chunks([a, b], query, top_k=3)
    assert sum(len(k) for k in kept) == 3
    assert all(k.tolist() == sorted(k.tolist()) for k in kept)
    scores = torch.cat([cosine(query, t.levels[0].vectors).max(1).values for t in (a, b)])
    best = set(scores.topk(3).indices.tolist())
    assert {int(c) for c in kept[0]} | {4 + int(c) for c in kept[1]} == best
    memory = tiny_shared.build_memory([a, b], query, top_k_chunks=3)
    assert memory.n_chunks == 3 and memory.n_positions == 3 * 8


def test_build_memory_casts_to_compute_dtype(tiny_base):
    shared = make_shared(tiny_base, tree_dtype="bfloat16")
    tree = shared.encode_tree(random_ids(128))
    assert tree.levels[0].keys.dtype == torch.bfloat16
    memory = build_memory([tree], None, shared.config, tiny_base.inv_freq, torch.device("cpu"), torch.float32)
    assert memory.keys.dtype == torch.float32


def _naive_memory(trees, query, chunk_sets, inv_freq, node_rotation):
    """The memory written out slot by slot: for every chunk, the preserved nodes' slots sorted by
    document position (empty slots last), keys rotated by the chunk's index in the memory."""
    from model.rope import apply_rope, rope_angles

    ks, vs, ps, ss, angles = [], [], [], [], []
    g = 0
    for tree, chunks in zip(trees, chunk_sets):
        preserved = select_nodes(tree, query, chunks)
        for row, c in enumerate(chunks.tolist()):
            slots = []
            for level, nodes in zip(tree.levels, preserved):
                for node in nodes[row].tolist():
                    for s in range(level.positions.shape[2]):
                        slots.append((level, node, s))
            valid = [t for t in slots if t[0].positions[c, t[1], t[2]] >= 0]
            empty = [t for t in slots if t[0].positions[c, t[1], t[2]] < 0]
            for level, node, s in sorted(valid, key=lambda t: int(t[0].spans[c, t[1], t[2], 0])) + empty:
                ks.append(level.keys[c, node, :, :, s])
                vs.append(level.values[c, node, :, :, s])
                ps.append(int(level.positions[c, node, s]))
                ss.append(level.spans[c, node, s].tolist())
                angles.append(g + (max(ps[-1], 0) if node_rotation else 0))
            g += 1
    keys, values = torch.stack(ks, dim=2).float(), torch.stack(vs, dim=2).float()  # (M, nkv, P, hd)
    cos, sin = rope_angles(inv_freq, torch.tensor(angles), torch.float32)
    return apply_rope(keys, cos, sin), values, torch.tensor(ps), torch.tensor(ss)


def test_build_memory_equals_the_slot_by_slot_definition(tiny_base):
    """The vectorised gather (one copy per level into final slots, in-place RoPE) against the
    definition, with two documents, a short last chunk, top-k pre-selection and both rotations."""
    for rotation in ("chunk", "node_and_chunk"):
        shared = make_shared(tiny_base, key_rotation=rotation)
        a, b = _tree(shared, 64 * 3, seed=5), _tree(shared, 64 * 2 + 21, seed=6)
        query = torch.randn(64, generator=torch.Generator().manual_seed(7))
        for top_k in (None, 3):
            memory = shared.build_memory([a, b], query, top_k_chunks=top_k)
            sets = preselect_chunks([a, b], query, top_k) if top_k else [torch.arange(3), torch.arange(3)]
            keys, values, positions, spans = _naive_memory([a, b], query, sets, tiny_base.inv_freq,
                                                           rotation == "node_and_chunk")
            torch.testing.assert_close(memory.keys[:, 0], keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(memory.values[:, 0], values, rtol=0, atol=0)
            assert torch.equal(memory.spans, spans.long())
            expected_mask = positions >= 0
            if bool(expected_mask.all()):
                assert memory.mask is None
            else:
                assert torch.equal(memory.mask.flatten(), expected_mask)
