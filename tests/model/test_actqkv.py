"""ActQKV: the exactness anchor against `full`, retrieval and budget arithmetic on constructed vectors,
the persisted state's round trip, and the memory path on streams longer than the local window."""

from __future__ import annotations

import math

import pytest
import torch

from model.actqkv import ActQKVRunner, BlockMemory, local_start
from model.actqkv_encode import encode_stream, representatives
from model.block_retrieval import (
    ActQKVConfig,
    RunningStats,
    allocate_budget,
    block_scores,
    normalised_entropy,
    probe_query,
    top_blocks,
)
from model.block_state import BlockState
from model.config import ConfigError
from model.generate import GenerationSettings, generate_tokens
from model.testing import random_ids

SMALL = dict(block_size=16, n_init=16, exec_block=32, budget=4, min_blocks=1, max_blocks=8, state_dtype="float32")


def _answer_logits(base, state_list, suffix, pinned=None):
    memory = BlockMemory(base, state_list, pinned)
    cache = base.new_cache(1, 2048)
    prefix = memory.local_prefix()
    for layer, k, v in zip(cache, prefix.k, prefix.v, strict=True):
        layer.load_prefix(k, v)
    w = prefix.length
    pos = torch.arange(w, w + len(suffix))
    return ActQKVRunner(base)(torch.tensor([suffix]), pos, memory=memory, cache=cache)[0], memory


def test_a_stream_within_the_local_window_gives_the_logits_and_tokens_of_full(tiny_base):
    cfg = ActQKVConfig(**{**SMALL, "n_local": 512})
    ids, suffix = random_ids(300, seed=1).tolist(), random_ids(12, seed=2).tolist()
    state = encode_stream(tiny_base, ids, cfg, doc_offset=4)
    assert local_start(len(ids), cfg) == 0  # everything local: the anchor case
    logits, memory = _answer_logits(tiny_base, [state], suffix)
    full = tiny_base(torch.tensor([ids + suffix]))[0, -len(suffix):]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    settings = GenerationSettings(max_new_tokens=24)
    reference = list(generate_tokens(tiny_base, ids + suffix, None, settings))
    memory = BlockMemory(tiny_base, [state])
    ours = list(generate_tokens(ActQKVRunner(tiny_base), memory.local_ids() + suffix, memory, settings,
                                prefix=memory.local_prefix()))
    assert ours == reference


def test_the_real_default_model_matches_full_on_a_short_document(default_model):
    base = default_model.model.base
    cfg = ActQKVConfig(n_local=1024, state_dtype="float32")
    ids = default_model.tokenize("The delivery address is 14 Quay Street, Ghent. " * 20)
    suffix = default_model.tokenize(" Where is the delivery address?")
    state = encode_stream(base, ids, cfg)
    logits, _ = _answer_logits(base, [state], suffix)
    full = base(torch.tensor([ids + suffix]), last_only=False)[0, -len(suffix):]
    assert (logits - full).abs().max() < 2e-3
    assert torch.equal(logits.argmax(-1), full.argmax(-1))


def test_long_streams_retrieve_within_the_budget_and_a_full_budget_takes_every_block(tiny_base):
    cfg = ActQKVConfig(**{**SMALL, "n_local": 64})
    ids = random_ids(700, seed=3).tolist()
    state = encode_stream(tiny_base, ids, cfg, doc_offset=4)
    assert state.n_blocks == math.ceil(700 / 16) and all(r.shape == (state.n_blocks, 2, 16) for r in state.reprs)
    logits, memory = _answer_logits(tiny_base, [state], random_ids(5, seed=4).tolist())
    assert torch.isfinite(logits).all()
    pool = len(memory.pool)
    assert pool == memory.w0 // 16 - 1  # blocks between the init block and the local window
    shares = [int(s.numel()) for s in memory.selected]
    assert all(1 <= s <= 8 for s in shares) and sum(shares) == 4 * len(shares)
    wide = ActQKVConfig(**{**SMALL, "n_local": 64, "budget": 64, "max_blocks": 64})
    state = encode_stream(tiny_base, ids, wide)
    _, memory = _answer_logits(tiny_base, [state], [1, 2, 3])
    assert all(torch.equal(s, torch.arange(len(memory.pool))) for s in memory.selected)


def test_pinned_blocks_are_read_by_every_layer_before_the_scored_ones(tiny_base):
    cfg = ActQKVConfig(**{**SMALL, "n_local": 64, "min_blocks": 2, "lexical_blocks": 2})
    state = encode_stream(tiny_base, random_ids(700, seed=3).tolist(), cfg, doc_offset=4)
    _, plain = _answer_logits(tiny_base, [state], [5, 6, 7])
    # two blocks no layer chose by attention alone (the init block and the local window's are not in the pool)
    chosen = set().union(*(set(s.tolist()) for s in plain.selected))
    unread = [j for p, (_, j) in enumerate(plain.pool) if p not in chosen][:2]
    assert len(unread) == 2
    pins = [(0, unread[0]), (0, 0), (0, unread[1]), (0, unread[0])]  # an init block and a repeat: ignored
    _, pinned = _answer_logits(tiny_base, [state], [5, 6, 7], pinned=pins)
    for selected in pinned.selected:
        read = {pinned.pool[int(p)][1] for p in selected}
        assert set(unread) <= read and len(selected) >= 2  # within the layer's share, not beside it
    assert [s.numel() for s in pinned.selected] == [s.numel() for s in plain.selected]


def test_several_documents_form_one_memory_and_citations_name_document_tokens(tiny_base):
    cfg = ActQKVConfig(**{**SMALL, "n_local": 64})
    a = encode_stream(tiny_base, random_ids(200, seed=5).tolist(), cfg, doc_offset=10)
    b = encode_stream(tiny_base, random_ids(300, seed=6).tolist(), cfg, doc_offset=10)
    memory = BlockMemory(tiny_base, [a, b])
    assert {d for d, _ in memory.pool} == {0, 1}
    assert all(j >= 1 for d, j in memory.pool if d == 0)  # the first document's init block is always read
    mass = torch.zeros(memory.n_positions)  # the generation's own account
    out = list(generate_tokens(ActQKVRunner(tiny_base), memory.local_ids() + [7, 8], memory,
                               GenerationSettings(max_new_tokens=6), prefix=memory.local_prefix(),
                               attention_mass=mass))
    assert len(out) == 6 and mass.sum() > 0
    cited = memory.attribution(mass)
    assert cited and abs(sum(c.mass for c in cited) - 1) < 1e-4 or len(cited) == 16
    for c in cited:
        length = (a, b)[c.doc_index].length - 10
        assert 0 <= c.token_start < c.token_end <= length  # document tokens, never the template header


def test_the_state_round_trips_through_tensors_exactly(tiny_base, tmp_path):
    from storage import TensorStore

    cfg = ActQKVConfig(**{**SMALL, "n_local": 64, "state_dtype": "bfloat16"})
    state = encode_stream(tiny_base, random_ids(400, seed=7).tolist(), cfg, doc_offset=3)
    store = TensorStore(tmp_path)
    saved = store.save(1, "fp", state.to_tensors())
    back = BlockState.from_tensors(store.load(saved.path, saved.sha256), cfg)
    assert back.token_ids == state.token_ids and back.doc_offset == 3
    pairs = [(x.data, y.data) for x, y in zip([*state.k, *state.v], [*back.k, *back.v], strict=True)]
    for x, y in pairs + list(zip(state.reprs, back.reprs, strict=True)):
        assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y)
    for s, t in zip(state.stats, back.stats, strict=True):
        assert s.count == t.count and torch.equal(s.mean, t.mean) and torch.equal(s.m2, t.m2)
    suffix = [5, 6, 7]
    torch.testing.assert_close(_answer_logits(tiny_base, [state], suffix)[0],
                               _answer_logits(tiny_base, [back], suffix)[0], atol=0, rtol=0)


def test_int8_states_halve_the_bytes_and_round_trip_with_their_scales(tiny_base, tmp_path):
    from storage import TensorStore

    kw = {**SMALL, "n_local": 64, "budget": 64, "max_blocks": 64}  # every block read: the same selection
    ids = random_ids(400, seed=8).tolist()
    exact = encode_stream(tiny_base, ids, ActQKVConfig(**kw))
    bf16 = encode_stream(tiny_base, ids, ActQKVConfig(**{**kw, "state_dtype": "bfloat16"}))
    int8 = encode_stream(tiny_base, ids, ActQKVConfig(**{**kw, "state_dtype": "int8"}))
    kv_bytes = lambda st: sum(x.nbytes() for x in (*st.k, *st.v))  # noqa: E731
    assert kv_bytes(int8) < 0.55 * kv_bytes(bf16)
    for e, q in zip(exact.k, int8.k, strict=True):
        x, y = e.read(0, e.length), q.read(0, q.length)
        # half a step, plus the fp16 rounding of the scale (127 steps x 2^-11)
        assert q.data.dtype == torch.int8 and (x - y).abs().max() <= x.abs().max() / 127 * 0.57 + 1e-6
        assert torch.allclose(q.read(130, 170), y[:, 130:170])  # a read across blocks keeps their scales
    store = TensorStore(tmp_path)
    saved = store.save(1, "fp", int8.to_tensors())
    back = BlockState.from_tensors(store.load(saved.path, saved.sha256), int8.config)
    assert all(torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) for a, b in zip(int8.k, back.k, strict=True))
    suffix = [5, 6, 7]
    reference = _answer_logits(tiny_base, [exact], suffix)[0]
    quantised = _answer_logits(tiny_base, [back], suffix)[0]
    assert (reference - quantised).abs().max() < 0.05 * reference.abs().max()


# --- retrieval arithmetic on constructed vectors --------------------------------------------------
def test_block_scores_pick_the_blocks_aligned_with_the_probe_across_gqa_groups():
    reprs = torch.randn(10, 2, 8)  # N blocks, nkv, hd
    probe = reprs[[3, 7]].repeat_interleave(2, dim=1).flatten(1).sum(0)  # nh = 4: groups of 2
    scores = block_scores(probe, reprs, groups=2)
    assert top_blocks(scores, 2).tolist() == [3, 7]  # best two, in document order
    assert top_blocks(scores, 50).numel() == 10


def test_max_token_scores_take_a_blocks_best_token_averaged_or_best_over_heads():
    from model.block_retrieval import max_token_scores

    nkv, g, hd, B = 2, 2, 4, 4
    probe = torch.zeros(nkv * g * hd)
    probe[0] = 1.0  # only the first query head looks along key dimension 0
    keys = torch.zeros(nkv, 3 * B, hd)
    keys[0, 5, 0] = 8.0  # block 1: a token that head alone attends strongly
    keys[:, 9, :] = 1.0  # block 2: a token every head attends a little
    probe[g * hd:] = 1.0  # the second KV group's heads look along every dimension
    mean = max_token_scores(probe, keys, B)
    best = max_token_scores(probe, keys, B, per_head=True)
    assert int(mean.argmax()) == 2 and int(best.argmax()) == 1
    torch.testing.assert_close(best[1], torch.tensor(8.0 / hd**0.5))


def test_the_probe_weights_queries_by_their_deviation_from_the_statistics():
    stats = RunningStats(4)
    stats.update(torch.randn(1000, 4) * 0.1)
    usual, unusual = torch.zeros(4), torch.tensor([0.0, 3.0, 0.0, 0.0])
    probe = probe_query(torch.stack([usual, usual, usual, unusual]), stats)
    assert probe[1] > 2.9  # the deviating query dominates; the plain mean would give 0.75
    assert torch.allclose(probe_query(unusual[None], stats), unusual)


def test_running_statistics_pool_like_one_pass():
    x, y = torch.randn(50, 6), torch.randn(30, 6) + 2
    a, b, ab = RunningStats(6), RunningStats(6), RunningStats(6)
    a.update(x[:20])
    a.update(x[20:])
    b.update(y)
    ab.update(torch.cat([x, y]))
    pooled = RunningStats.pooled([a, b])
    assert torch.allclose(pooled.mean, ab.mean, atol=1e-5) and torch.allclose(pooled.var, ab.var, atol=1e-4)
    assert torch.allclose(a.var, x.var(0, unbiased=False), atol=1e-5)


def test_entropy_is_normalised_and_lower_for_a_peaked_score():
    assert normalised_entropy(torch.zeros(20), 0.1) == pytest.approx(1.0)
    peaked = torch.zeros(20)
    peaked[4] = 1.0
    assert normalised_entropy(peaked, 0.1) < 0.5
    assert normalised_entropy(torch.zeros(1), 0.1) == 1.0


@pytest.mark.parametrize("weights,total,lo,hi", [
    ([1, 1, 1, 1], 16, [1] * 4, [8] * 4),
    ([0.9, 0.1, 0.5, 0.5], 20, [2] * 4, [8] * 4),
    ([1, 0.01, 0.01, 0.01], 12, [2] * 4, [5] * 4),
    ([0.3, 0.7, 0.2], 7, [1, 1, 1], [2, 10, 10]),
])
def test_budget_shares_sum_to_the_budget_and_keep_their_clamps(weights, total, lo, hi):
    shares = allocate_budget(weights, total, lo, hi)
    assert sum(shares) == total
    assert all(a <= s <= b for s, a, b in zip(shares, lo, hi, strict=True))
    order = sorted(range(len(weights)), key=lambda i: weights[i])
    clamped = [min(max(s, 0), 10**6) for s in shares]
    assert clamped[order[0]] <= clamped[order[-1]]  # more density, at least as many blocks


def test_budget_shares_stop_at_the_bounds():
    assert allocate_budget([1, 2], 100, [1, 1], [3, 4]) == [3, 4]
    assert allocate_budget([1, 2], 1, [2, 2], [3, 4]) == [2, 2]
    assert allocate_budget([1, 1], 4, [8, 8], [1, 2]) == [1, 2]  # fewer blocks than the minimum exist


def test_representatives_are_the_mean_of_the_most_attended_keys():
    k = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)  # nkv, 2 blocks of 4, hd
    received = torch.zeros(2, 8)
    received[0, [1, 2, 5, 7]] = 1.0
    received[1, [0, 3, 4, 6]] = 1.0
    reps = representatives(k, received, block_size=4, topk=2)
    assert reps.shape == (2, 2, 3)
    assert torch.allclose(reps[0, 0], k[0, [1, 2]].mean(0)) and torch.allclose(reps[1, 1], k[1, [4, 6]].mean(0))
    short = representatives(k[:, :5], received[:, :5], block_size=4, topk=2)  # last block of one token
    assert torch.allclose(short[1, 0], k[0, 4])


def test_the_config_is_validated_and_its_fingerprint_covers_the_encoding_knobs():
    with pytest.raises(ConfigError, match="multiple of block_size"):
        ActQKVConfig(n_init=10, block_size=16)
    with pytest.raises(ConfigError, match="min_blocks <= budget"):
        ActQKVConfig(budget=100)
    with pytest.raises(ConfigError, match="positions"):
        ActQKVConfig().check_window(2048)
    base = ActQKVConfig().fingerprint("ckpt", "v1")
    assert ActQKVConfig(block_size=32).fingerprint("ckpt", "v1") != base
    assert ActQKVConfig(retrieval_interval=1, probe="mean", lexical_blocks=0,
                        read_layout="sequence").fingerprint("ckpt", "v1") == base  # read-time
    with pytest.raises(ConfigError, match="read_layout"):
        ActQKVConfig(read_layout="shuffled")
    with pytest.raises(ConfigError, match="lexical_blocks"):
        ActQKVConfig(lexical_blocks=-1)
    assert ActQKVConfig(encode_probe="mean").fingerprint("ckpt", "v1") != base
    assert ActQKVConfig().fingerprint("other", "v1") != base and ActQKVConfig().fingerprint("ckpt", "v2") != base
    assert ActQKVConfig.from_dict(ActQKVConfig(budget=30).to_dict()) == ActQKVConfig(budget=30)


def test_spans_take_following_blocks_of_the_same_document_within_the_budget():
    scores = torch.tensor([0.0, 5.0, 0.0, 0.0, 4.0, 0.0])
    assert top_blocks(scores, 4, span=2).tolist() == [1, 2, 4, 5]
    follows = torch.tensor([True, False, True, True, True, False])  # block 2 starts another document
    assert top_blocks(scores, 3, span=2, follows=follows).tolist() == [1, 4, 5]
    assert top_blocks(scores, 2, span=3).tolist() == [1, 2]


def test_block_positions_keep_the_order_inside_retrieved_blocks(tiny_base):
    cfg = dict(SMALL, n_local=64)
    ids, suffix = random_ids(500, seed=9).tolist(), random_ids(4, seed=10).tolist()
    plain = encode_stream(tiny_base, ids, ActQKVConfig(**cfg))
    ordered = encode_stream(tiny_base, ids, ActQKVConfig(**cfg, memory_positions="block"))
    assert not torch.equal(plain.k[1].read(0, 500), ordered.k[1].read(0, 500))  # memory is read differently
    a = _answer_logits(tiny_base, [ordered], suffix)[0]
    assert torch.isfinite(a).all()


def test_the_sequence_layout_reads_memory_in_document_order_just_beyond_the_local_window(tiny_base):
    """Memory key i of m (init tokens, then the retrieved blocks in document order) sits at distance
    n_local + m - i from the question's queries: RoPE makes the score depend on that distance alone."""
    import dataclasses

    from model.rope import apply_rope

    cfg = ActQKVConfig(**dict(SMALL, n_local=64))
    ids, suffix = random_ids(500, seed=9).tolist(), random_ids(4, seed=10).tolist()
    state = encode_stream(tiny_base, ids, cfg)
    seq_state = dataclasses.replace(state, config=dataclasses.replace(cfg, read_layout="sequence"))
    seq_logits, memory = _answer_logits(tiny_base, [seq_state], suffix)
    plain_logits, _ = _answer_logits(tiny_base, [state], suffix)
    assert torch.isfinite(seq_logits).all() and not torch.allclose(seq_logits, plain_logits)
    layer, B = 1, cfg.block_size
    chosen = [memory.pool[int(p)] for p in memory.selected[layer]]
    assert [j for _, j in chosen] == sorted(j for _, j in chosen)  # document order
    raw = torch.cat([state.k[layer].read(0, cfg.n_init)] + [state.k[layer].read(j * B, (j + 1) * B) for _, j in chosen], 1)
    m = raw.shape[1]
    keys = memory._kv[layer][0]
    q = torch.randn(keys.shape[0], 1, keys.shape[2])
    cos_q, sin_q = tiny_base.rope(torch.tensor([cfg.n_local]), torch.float32)
    got = (apply_rope(q, cos_q, sin_q) * keys).sum(-1)  # (nkv, m)
    cos_d, sin_d = tiny_base.rope(cfg.n_local + m - torch.arange(m), torch.float32)
    want = (apply_rope(q.expand(-1, m, -1), cos_d, sin_d) * raw.float()).sum(-1)  # the distance on the query
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
