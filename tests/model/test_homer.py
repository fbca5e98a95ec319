"""HOMER: the exactness anchor against `full`, the reduction (exact counts, affixes never dropped,
GQA significance), merging, the schedule and chunking, the stored leaves against leaves computed on
the spot, the depth-first peak, the persisted state's round trip and the calibration arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ConfigError
from model.generate import GenerationSettings, generate_tokens
from model.attention import eager_attention
from model.homer import Chunk, HomerConfig, Schedule, count_merges, keep_mask, merge, pieces, renumber, run_layers, significance
from model.homer_attention import piece_attention, position_attention
from model.homer_calibration import _logits_by_distance, calibrate
from model.homer_memory import HomerMemory
from model.homer_state import HomerState, answer_prefix, encode_document
from model.testing import random_ids, random_transformer, tiny_config

PREFIX, SUFFIX = random_ids(10, seed=3).tolist(), random_ids(8, seed=2).tolist()


@pytest.fixture(scope="module")
def base8():
    """8 layers (2 warm-up, 6 to merge in: trees up to height 5), GQA 4 query / 2 KV heads."""
    return random_transformer(tiny_config(vocab_size=128, n_layer=8, max_position=1024), seed=0)


def config(base, **overrides):
    values = dict(chunk_tokens=256, suffix_reserve=16, warmup_layers=2, state_dtype="float32")
    values.update(overrides)
    return HomerConfig(**values).resolve(base.config)


def homer_tokens(base, cfg, states, suffix, settings, bias=None):
    result = answer_prefix(base, cfg, states, suffix, bias)
    memory = HomerMemory(base, result.doc, result.tok, [st.doc_offset for st in states])
    return list(generate_tokens(memory.runner(), result.prompt_ids, memory, settings, prefix=result.prefix)), result


def test_one_chunk_gives_the_tokens_and_logits_of_full(base8):
    cfg = config(base8)
    ctx = random_ids(150, seed=1).tolist()
    state = encode_document(base8, cfg, PREFIX, ctx, 3)
    assert len(state.ranges) == 1  # prefix + context + suffix within a chunk: no merging, no reduction
    assert state.hidden[0][8].shape == (len(ctx), 0)  # nothing runs above one leaf: no top state stored
    from safetensors.torch import load, save

    state = HomerState.from_tensors(load(save(state.to_tensors())), state.config)  # as the store reads it
    settings = GenerationSettings(max_new_tokens=16)
    reference = list(generate_tokens(base8, PREFIX + ctx + SUFFIX, None, settings))
    bias = torch.randn(8, 300)  # a calibration changes nothing when nothing is dropped
    ours, result = homer_tokens(base8, cfg, [state], SUFFIX, settings, bias)
    assert ours == reference and result.prefix.length == len(PREFIX + ctx + SUFFIX) - 1
    # the merged cache is the ordinary prompt cache: the last prompt token's logits agree with full's
    cache = base8.new_cache(1, 400)
    for layer, k, v in zip(cache, result.prefix.k, result.prefix.v, strict=True):
        layer.load_prefix(k, v, result.prefix.next_position)
    pos = torch.tensor([result.prefix.next_position])
    logits = base8(torch.tensor([SUFFIX[-1:]]), pos, cache=cache)[0, -1]
    torch.testing.assert_close(logits, base8(torch.tensor([PREFIX + ctx + SUFFIX]))[0, -1], atol=1e-4, rtol=1e-4)


def test_the_reduction_keeps_exactly_the_target_and_never_an_affix():
    sig = torch.tensor([-9.0, -8.0, 5.0, 1.0, 4.0, 0.0, 3.0, -7.0, -6.0])  # 2 prefix, 2 suffix tokens
    keep = keep_mask(sig, prefix=2, suffix=2, target=7)
    assert keep.tolist() == [True, True, True, False, True, False, True, True, True]  # the two lowest go
    assert keep_mask(sig, 2, 2, target=3).tolist() == [True, True] + [False] * 5 + [True, True]  # affixes stay
    assert keep_mask(sig, 2, 2, target=20).all()


def test_a_keep_window_keeps_a_salient_tokens_neighbours_and_the_exact_count():
    sig = torch.zeros(12)
    sig[6] = 5.0  # one salient context token between low ones; 1 prefix, 1 suffix token
    sig[1:5] = torch.tensor([1.0, 0.9, 0.8, 0.7])
    own = keep_mask(sig, prefix=1, suffix=1, target=5)
    pooled = keep_mask(sig, prefix=1, suffix=1, target=5, window=1)
    assert own[1] and own[2] and own[6] and not own[5] and not own[7]  # HOMER: each token its own score
    assert pooled[5] and pooled[6] and pooled[7]  # the salient token's neighbours come with it
    assert int(own.sum()) == int(pooled.sum()) == 5 and pooled[0] and pooled[-1]


def test_significance_is_the_max_over_query_heads_with_keys_shared_by_gqa_groups():
    torch.manual_seed(0)
    nh, nkv, hd, t = 4, 2, 8, 12
    q, k = torch.randn(nh, hd), torch.randn(nkv, t, hd)
    pos = torch.arange(t)
    expected = (q[:, None, :] * k.repeat_interleave(nh // nkv, 0)).sum(-1).amax(0) / math.sqrt(hd)
    torch.testing.assert_close(significance(q, k, pos, None), expected)
    # a key that only the last query head (of the second KV group) points at is found
    k2 = torch.zeros(nkv, t, hd)
    k2[1, 5] = q[3] / q[3].norm() * 10
    assert int(significance(q, k2, pos, None).argmax()) == 5
    # the bias is subtracted by distance from the last position (clamped beyond its end)
    bias = torch.arange(4, dtype=torch.float32)
    got = significance(q, k, pos, bias)
    dist = (pos[-1] - pos).clamp(max=3)
    torch.testing.assert_close(got, expected - bias[dist])


def _chunk(n_ctx, value, prefix=2, suffix=2, layers=1):
    t = prefix + n_ctx + suffix
    hidden = torch.full((t, 3), float(value))
    kv = [torch.full((2, t, 4), float(value)) for _ in range(layers)]
    doc = torch.tensor([-1] * prefix + [0] * n_ctx + [-1] * suffix)
    return Chunk(hidden, torch.arange(t), kv, [x.clone() for x in kv], doc, torch.arange(t), prefix, suffix)


def test_merging_averages_the_affixes_and_concatenates_the_contexts():
    left, right = _chunk(3, 1.0), _chunk(4, 3.0)
    m = merge(left, right)
    assert m.length == 2 + 3 + 4 + 2 and (m.prefix, m.suffix) == (2, 2)
    assert m.hidden[:, 0].tolist() == [2, 2, 1, 1, 1, 3, 3, 3, 3, 2, 2]
    assert m.k[0][0, :, 0].tolist() == m.hidden[:, 0].tolist()
    assert m.pos.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]  # left prefix, both contexts, right suffix


def test_the_schedule_runs_every_layer_once_in_order():
    for n_layer, warmup in ((24, 9), (32, 12), (8, 2)):
        for height in range(0, n_layer - warmup):
            s = Schedule(n_layer, warmup, height)
            order = list(range(s.leaf_end)) + [i for h in range(1, height + 1) for i in s.level_layers(h)]
            assert order == list(range(n_layer))
        with pytest.raises(ConfigError, match="longer chunks"):
            Schedule(n_layer, warmup, n_layer - warmup)


def test_pieces_are_a_power_of_two_of_equal_size_covering_the_context():
    for n, max_piece in ((10, 100), (1000, 100), (1025, 256), (5, 2)):
        ranges, size = pieces(n, max_piece)
        count = 2 ** math.ceil(math.log2(math.ceil(n / max_piece)))
        assert size <= max_piece and size == math.ceil(n / count)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) <= count
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_protected_tokens_are_dropped_last_and_the_count_stays_exact():
    sig = torch.tensor([-9.0, -8.0, 5.0, 1.0, 4.0, 0.0, 3.0, -7.0, -6.0])  # 2 prefix, 2 suffix tokens
    protect = torch.tensor([False, False, False, True, False, True, False, False, False])
    keep = keep_mask(sig, 2, 2, target=7, protect=protect)
    assert keep.tolist() == [True, True, True, True, False, True, False, True, True]  # 4.0 and 3.0 go instead
    # fewer places than protected tokens: the protected ones' own order decides, the affixes still stay
    assert keep_mask(sig, 2, 2, target=5, protect=protect).tolist() == [True, True, False, True, False, False,
                                                                          False, True, True]


def test_protected_blocks_survive_every_reduction_of_a_long_document(base8):
    from model.homer import LEXICAL_BLOCK

    cfg = config(base8, target_tokens=200)
    ctx = random_ids(900, seed=5).tolist()
    state = encode_document(base8, cfg, PREFIX, ctx, 0)
    blocks = [(0, 3), (0, 11)]  # tokens 192-255 and 704-767: in the second and the fourth leaf
    result = answer_prefix(base8, cfg, [state], SUFFIX, torch.zeros(8, 64), protected=blocks)
    kept = set(result.tok[result.doc == 0].tolist())
    wanted = {t for _, j in blocks for t in range(j * LEXICAL_BLOCK, (j + 1) * LEXICAL_BLOCK)}
    assert wanted <= kept and result.prefix.length + 1 == 200  # the same target, the blocks inside it
    plain = answer_prefix(base8, cfg, [state], SUFFIX, torch.zeros(8, 64))
    assert not wanted <= set(plain.tok[plain.doc == 0].tolist())  # without protection some of them go


def test_a_long_document_is_reduced_to_the_target_with_every_affix_token_kept(base8):
    cfg = config(base8, target_tokens=200)
    ctx = random_ids(900, seed=5).tolist()
    state = encode_document(base8, cfg, PREFIX, ctx, 0)
    assert len(state.ranges) == 4
    result = answer_prefix(base8, cfg, [state], SUFFIX, torch.zeros(8, 64))
    assert result.prefix.length + 1 == 200 and result.input_tokens == len(PREFIX + ctx + SUFFIX)
    affix = (result.doc == -1).sum().item() + 1  # the final suffix token is prefilled by generation
    assert affix == len(PREFIX) + len(SUFFIX)
    assert all(k.shape[2] == result.prefix.length for k in result.prefix.k)  # refined in every layer
    kept = result.tok[result.doc >= 0]
    assert kept.unique().numel() == kept.numel() and kept.min() >= 0 and kept.max() < len(ctx)
    assert result.prompt_ids[: len(PREFIX)] == PREFIX and result.prompt_ids[-len(SUFFIX):] == SUFFIX


def test_stored_leaves_give_the_merge_of_leaves_computed_on_the_spot(base8):
    """The partial persistence is exact: a tree taller than a document's stored heights computes its
    leaves per question, and gives the same cache as leaves read from the stored state."""
    ctx_a, ctx_b = random_ids(600, seed=6).tolist(), random_ids(500, seed=7).tolist()
    stored = [encode_document(base8, config(base8), PREFIX, c, 0) for c in (ctx_a, ctx_b)]
    bare = [encode_document(base8, config(base8, extra_heights=0), PREFIX, c, 0) for c in (ctx_a, ctx_b)]
    bias = torch.randn(8, 128) * 0.1
    a = answer_prefix(base8, config(base8), stored, SUFFIX, bias)
    b = answer_prefix(base8, config(base8, extra_heights=0), bare, SUFFIX, bias)
    assert a.leaves_computed == 0 and b.leaves_computed == len(bare[0].ranges) + len(bare[1].ranges)
    assert torch.equal(a.tok, b.tok) and torch.equal(a.doc, b.doc) and set(a.doc.tolist()) == {-1, 0, 1}
    for ka, kb in zip(a.prefix.k, b.prefix.k, strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)


def _hidden_chunk(hidden, pos, prefix=4, suffix=3):
    n = hidden.shape[0]
    return Chunk(hidden.clone(), pos.clone(), [], [], torch.zeros(n, dtype=torch.long),
                 torch.arange(n), prefix, suffix)


def test_renumbering_rotates_the_keys_as_if_computed_at_the_new_positions(base8):
    """A uniform shift keeps every relative position, so renumbering a chunk that ran at positions
    100.. must give exactly the keys (and the next layers' outputs) of the same chunk run from 0."""
    hidden = torch.randn(40, base8.config.dim)
    shifted = run_layers(base8, _hidden_chunk(hidden, torch.arange(100, 140)), range(0, 3), 10**6, None)
    at_zero = run_layers(base8, _hidden_chunk(hidden, torch.arange(40)), range(0, 3), 10**6, None)
    renumber(base8, shifted)
    assert torch.equal(shifted.pos, torch.arange(40))
    for a, b in zip(shifted.k, at_zero.k, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    run_layers(base8, shifted, range(3, 5), 10**6, None)
    run_layers(base8, at_zero, range(3, 5), 10**6, None)
    torch.testing.assert_close(shifted.hidden, at_zero.hidden, atol=1e-4, rtol=1e-4)


def test_sequential_positions_give_the_merged_cache_one_order_within_the_window(base8):
    cfg_homer, cfg_seq = config(base8), config(base8, positions="sequential")
    state = encode_document(base8, cfg_homer, PREFIX, random_ids(900, seed=5).tolist(), 0)
    overlapping = answer_prefix(base8, cfg_homer, [state], SUFFIX, None)
    ordered = answer_prefix(base8, cfg_seq, [state], SUFFIX, None)
    # HOMER's pieces are each positioned from the prefix on: merged, their tokens share positions
    assert overlapping.prefix.next_position < overlapping.prefix.length
    # renumbered: the cache is positions 0..T-2 and generation continues right after it
    assert ordered.prefix.next_position == ordered.prefix.length <= cfg_seq.chunk_tokens
    assert ordered.doc.shape == overlapping.doc.shape  # the same tokens survive the reductions' counts
    with pytest.raises(ConfigError, match="positions"):
        HomerConfig(positions="absolute")


def test_piece_attention_reads_each_piece_alone_and_the_suffix_everything():
    torch.manual_seed(0)
    prefix, lengths, suffix = 3, [5, 4], 2
    t = prefix + sum(lengths) + suffix
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    out = piece_attention(eager_attention, q, k, v, prefix, suffix, lengths)
    everything = eager_attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, :, :prefix], everything[:, :, :prefix])  # the prefix: itself
    torch.testing.assert_close(out[:, :, prefix + 5:prefix + 9],  # the second piece: prefix + itself
                               eager_attention(q[:, :, prefix + 5:prefix + 9], torch.cat([k[:, :, :prefix], k[:, :, prefix + 5:prefix + 9]], 2),
                                               torch.cat([v[:, :, :prefix], v[:, :, prefix + 5:prefix + 9]], 2), causal=True))
    torch.testing.assert_close(out[:, :, prefix:prefix + 5], everything[:, :, prefix:prefix + 5])  # first: as causal
    torch.testing.assert_close(out[:, :, -suffix:], everything[:, :, -suffix:])  # the suffix reads every piece
    assert not torch.allclose(out[:, :, prefix + 5:prefix + 9], everything[:, :, prefix + 5:prefix + 9])


def test_piece_merge_attention_runs_each_piece_as_if_alone_in_its_leaf(base8):
    """With merge_attention "piece" a merged chunk's pieces run the merge layers exactly as each
    would after the prefix alone (HOMER's "causal": a right piece also reads the left one, at
    positions ahead of its own); the suffix reads both either way."""
    torch.manual_seed(1)
    p, n1, n2, s = 3, 5, 4, 2
    hidden = torch.randn(p + n1 + n2 + s, base8.config.dim)
    pos = torch.cat([torch.arange(p + n1), torch.arange(p, p + n2), torch.arange(p + n1, p + n1 + s)])
    piece = torch.tensor([-1] * p + [0] * n1 + [1] * n2 + [-1] * s)

    def merged(attention):
        chunk = Chunk(hidden.clone(), pos.clone(), [], [], piece.clamp(max=0), torch.arange(len(pos)), p, s, piece)
        return run_layers(base8, chunk, range(0, 4), 10**6, None, attention=attention).hidden

    def alone(rows):
        ids = torch.tensor(rows)
        chunk = Chunk(hidden[ids].clone(), pos[ids].clone(), [], [], torch.zeros(len(rows), dtype=torch.long),
                      ids.clone(), p, 0)
        return run_layers(base8, chunk, range(0, 4), 10**6, None).hidden

    by_piece, causal = merged("piece"), merged("causal")
    second = list(range(p + n1, p + n1 + n2))
    torch.testing.assert_close(by_piece[:p + n1], alone(list(range(p + n1))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_piece[second], alone([*range(p), *second])[p:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal[:p + n1], by_piece[:p + n1], atol=1e-5, rtol=1e-5)  # the left piece: the same
    assert not torch.allclose(causal[second], by_piece[second], atol=1e-3)  # HOMER's right piece reads the left
    assert not torch.allclose(by_piece[-s:], alone([*range(p), *second, p + n1 + n2, p + n1 + n2 + 1])[-s:],
                              atol=1e-3)  # the suffix reads both pieces
    with pytest.raises(ConfigError, match="merge_attention"):
        HomerConfig(merge_attention="global")


def test_position_attention_reads_no_token_ahead_of_the_reader():
    """"position": a token reads an earlier token of the chunk only when that token's position is not
    ahead of its own; the mask goes in query blocks, so the block size changes nothing; with
    positions in order it is causal attention."""
    torch.manual_seed(4)
    p, n1, n2, s = 2, 6, 5, 3
    pos = torch.cat([torch.arange(p + n1), torch.arange(p, p + n2), torch.arange(p + n1, p + n1 + s)])
    t = len(pos)
    q, k, v = torch.randn(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    out = position_attention(eager_attention, q, k, v, pos, block=4)
    torch.testing.assert_close(out, position_attention(eager_attention, q, k, v, pos, block=1000))
    everything = eager_attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, :, :p + n1], everything[:, :, :p + n1])  # the first piece: causal
    torch.testing.assert_close(out[:, :, -s:], everything[:, :, -s:])  # the suffix reads every piece
    for j in range(n2):  # the second piece's j-th token: prefix, the first piece up to its position, itself
        row = p + n1 + j
        keys = [*range(p + j + 1), *range(p + n1, row + 1)]
        want = eager_attention(q[:, :, row:row + 1], k[:, :, keys], v[:, :, keys])
        torch.testing.assert_close(out[:, :, row:row + 1], want)
    in_order = torch.arange(t)
    torch.testing.assert_close(position_attention(eager_attention, q, k, v, in_order, block=3), everything)


def test_position_merge_attention_changes_only_the_pieces_that_share_positions(base8):
    """Through the merge layers, "position" runs the first piece as "causal" does and the right
    piece differently (it no longer reads the left piece's tokens ahead of it); a chunk whose
    positions never go backwards runs exactly as "causal"."""
    torch.manual_seed(2)
    p, n1, n2, s = 3, 5, 4, 2
    hidden = torch.randn(p + n1 + n2 + s, base8.config.dim)
    shared = torch.cat([torch.arange(p + n1), torch.arange(p, p + n2), torch.arange(p + n1, p + n1 + s)])

    def run(attention, pos):
        chunk = Chunk(hidden.clone(), pos.clone(), [], [], torch.zeros(len(pos), dtype=torch.long),
                      torch.arange(len(pos)), p, s)
        return run_layers(base8, chunk, range(0, 4), 10**6, None, attention=attention).hidden

    by_position, causal = run("position", shared), run("causal", shared)
    torch.testing.assert_close(by_position[:p + n1], causal[:p + n1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_position[p + n1:p + n1 + n2], causal[p + n1:p + n1 + n2], atol=1e-3)
    in_order = torch.arange(len(shared))
    assert torch.equal(run("position", in_order), run("causal", in_order))


def test_the_walk_is_depth_first_so_few_chunks_are_held_at_once(base8):
    cfg = config(base8)
    ctx = random_ids(3500, seed=8).tolist()
    state = encode_document(base8, cfg, PREFIX, ctx, 0)
    assert len(state.ranges) == 16
    reports = []
    result = answer_prefix(base8, cfg, [state], SUFFIX, None, progress=lambda *a: reports.append(a))
    assert reports == [(i, 15) for i in range(1, 16)]  # 16 leaves: 15 merges, each reported once
    # padding: a node whose right side is padding still runs its level over the left chunk
    assert count_merges([1, 2, 3, None]) == 3 and count_merges([1, 2, 3, 4, 5, None, None, None]) == 6
    # one reduced chunk per level below the current one, plus the one being built: about height
    # chunks, not the 16 leaves of a breadth-first walk
    assert result.peak_tokens <= (4 + 1) * cfg.chunk_tokens < result.input_tokens


def test_the_persisted_state_round_trips_exactly(base8):
    state = encode_document(base8, config(base8, state_dtype="bfloat16"), PREFIX, random_ids(700, seed=9).tolist(), 2)
    again = HomerState.from_tensors(state.to_tensors(), state.config)
    assert (again.prefix_ids, again.token_ids, again.doc_offset, again.piece, again.ranges) == \
        (state.prefix_ids, state.token_ids, state.doc_offset, state.piece, state.ranges)
    for j in range(len(state.ranges)):
        assert all(torch.equal(x, y) for x, y in zip(state.k[j], again.k[j], strict=True))
        assert state.hidden[j].keys() == again.hidden[j].keys()
        assert all(torch.equal(state.hidden[j][e], again.hidden[j][e]) for e in state.hidden[j])
    assert state.nbytes() == again.nbytes() and state.k[0][0].dtype == torch.bfloat16


def test_the_calibration_averages_logits_by_distance(base8):
    torch.manual_seed(1)
    q, k = torch.randn(4, 3, 8), torch.randn(2, 10, 8)  # 3 last queries of a 10-token window
    span = 10 - 3 + 1
    got = _logits_by_distance(q, k, span)
    logits = (q.reshape(2, 6, 8) @ k.transpose(1, 2)).reshape(2, 2, 3, 10).amax((0, 1)) / math.sqrt(8)
    expected = torch.zeros(span)
    for j in range(3):
        p = 7 + j
        for d in range(span):
            expected[d] += logits[j, p - d]
    torch.testing.assert_close(got, expected)
    windows = [random_ids(64, seed=s).tolist() for s in (1, 2)]
    bias = calibrate(base8, windows, n_queries=8)
    assert bias.shape == (8, 57) and torch.isfinite(bias).all()
    assert torch.equal(bias, calibrate(base8, windows, n_queries=8))  # deterministic


def test_the_config_is_validated_and_resolved_for_the_model(base8):
    cfg = HomerConfig().resolve(base8.config)
    assert (cfg.chunk_tokens, cfg.warmup_layers, cfg.target_tokens) == (768, 3, 768)  # window less answer room
    for bad in (dict(state_dtype="int8"), dict(suffix_reserve=0), dict(warmup_layers=-2), dict(extra_heights=-1),
                dict(lexical_blocks=-1)):
        with pytest.raises(ConfigError):
            HomerConfig(**bad)
    with pytest.raises(ConfigError, match="positions"):
        HomerConfig(chunk_tokens=4096).resolve(base8.config)
    with pytest.raises(ConfigError, match="warmup"):
        HomerConfig(warmup_layers=8).resolve(base8.config)
    assert HomerConfig(chunk_tokens=256).fingerprint("c", "l") != HomerConfig(chunk_tokens=512).fingerprint("c", "l")
    assert HomerConfig(target_tokens=100, lexical_blocks=4).fingerprint("c", "l") == HomerConfig().fingerprint("c", "l")
