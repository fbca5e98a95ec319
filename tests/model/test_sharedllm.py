"""One weight copy, zero-init equivalence, cached decoding, save/load, attribution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.generate import GenerationSettings, generate_tokens
from model.sharedllm import SharedLLM
from model.testing import make_shared, random_ids


def _param_bytes(module: torch.nn.Module) -> int:
    unique = {id(p): p for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())


def test_parameter_memory_is_base_plus_cross_attention_only(tiny_base):
    shared = make_shared(tiny_base)
    assert _param_bytes(shared) == _param_bytes(tiny_base) + _param_bytes(shared.xattn)
    # the lower model is the base's own first M layers, not a copy
    assert all(layer is shared.base.layers[i] for i, layer in enumerate(tiny_base.layers))
    per_layer = sum(p.numel() for p in shared.xattn[0].parameters())
    d, q = tiny_base.config.dim, tiny_base.config.n_head * tiny_base.config.head_dim
    assert per_layer == d + d * q + q * d  # norm + q_proj + o_proj


def test_default_model_parameter_memory(default_model):
    shared = default_model.model
    assert _param_bytes(shared) == _param_bytes(shared.base) + _param_bytes(shared.xattn)


def test_zero_init_equals_base_model_exactly_whatever_the_context(tiny_base):
    shared = make_shared(tiny_base, init_mode="zero")
    ids = random_ids(30, seed=5)[None]
    with torch.no_grad():
        plain = tiny_base(ids)
        for seed in (1, 2):
            tree = shared.encode_tree(random_ids(64 * 3 + 7, seed=seed))
            memory = shared.build_memory([tree], torch.randn(64))
            assert torch.equal(shared(ids, memory=memory), plain)


def test_copy_init_makes_the_context_matter(tiny_base):
    shared = make_shared(tiny_base, init_mode="copy")
    ids = random_ids(10, seed=5)[None]
    with torch.no_grad():
        a = shared(ids, memory=shared.build_memory([shared.encode_tree(random_ids(128, seed=1))], None))
        b = shared(ids, memory=shared.build_memory([shared.encode_tree(random_ids(128, seed=2))], None))
    assert (a - b).abs().max() > 1e-3


def test_cached_generation_equals_uncached_recomputation(tiny_shared):
    tree = tiny_shared.encode_tree(random_ids(200, seed=3))
    memory = tiny_shared.build_memory([tree], torch.randn(64))
    prompt = random_ids(12, seed=4).tolist()
    cached = list(generate_tokens(tiny_shared, prompt, memory, GenerationSettings(max_new_tokens=20)))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(tiny_shared(torch.tensor([seq]), memory=memory)[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_sampling_is_reproducible_with_a_seed(tiny_shared):
    prompt = random_ids(8).tolist()
    run = lambda seed: list(generate_tokens(
        tiny_shared, prompt, None, GenerationSettings(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=seed)))
    assert run(1) == run(1) and run(1) != run(2)


def test_kv_cache_must_be_passed_with_positions(tiny_base):
    with pytest.raises(RuntimeError, match="new_cache"):
        tiny_base(random_ids(3)[None], torch.arange(3))
    cache = tiny_base.new_cache(1, 8)
    tiny_base(random_ids(3)[None], torch.arange(3), cache=cache)
    with pytest.raises(ValueError, match="must continue"):
        tiny_base(random_ids(2)[None], torch.arange(2), cache=cache)


def test_concurrent_generations_share_weights_not_state(tiny_shared):
    from concurrent.futures import ThreadPoolExecutor

    tree = tiny_shared.encode_tree(random_ids(200, seed=3))
    prompts = [random_ids(6 + i, seed=10 + i).tolist() for i in range(4)]

    def run(prompt):
        memory = tiny_shared.build_memory([tree], None)
        return list(generate_tokens(tiny_shared, prompt, memory, GenerationSettings(max_new_tokens=12)))

    sequential = [run(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, prompts)) == sequential


def test_save_and_load_round_trip(tiny_base, tmp_path):
    shared = make_shared(tiny_base)
    with torch.no_grad():
        for p in shared.xattn.parameters():
            p.add_(torch.randn_like(p))
    shared.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sharedllm_config.json", "xattn.safetensors"]
    loaded = SharedLLM.from_pretrained(tiny_base, tmp_path)
    assert loaded.config == shared.config
    for a, b in zip(shared.xattn.state_dict().values(), loaded.xattn.state_dict().values()):
        assert torch.equal(a, b)


def test_attribution_points_at_the_position_the_answer_attends(tiny_shared):
    from model.attribution import attribute
    from model.rope import apply_rope, rope_angles

    tree = tiny_shared.encode_tree(random_ids(64 * 4, seed=6))
    memory = tiny_shared.build_memory([tree], None)
    # every query of the tracked (last injected) layer becomes e0 rotated to position n; one memory
    # key is made parallel to it, so that position must receive nearly all the mass
    block, cfg = tiny_shared.xattn[-1], tiny_shared.base.config
    target = 21
    with torch.no_grad():
        block.q_proj.weight.zero_()
        block.q_proj.bias = torch.nn.Parameter(torch.zeros(block.q_proj.out_features))
        block.q_proj.bias[0:: cfg.head_dim] = 1.0
        cos, sin = rope_angles(tiny_shared.base.inv_freq, torch.tensor([memory.n_chunks]), torch.float32)
        e0 = torch.zeros(1, 1, 1, cfg.head_dim)
        e0[..., 0] = 1.0
        memory.keys[-1, 0, :, target] = 200 * apply_rope(e0, cos, sin)[0, 0]
    mass = torch.zeros(memory.n_positions)
    list(generate_tokens(tiny_shared, random_ids(5).tolist(), memory, GenerationSettings(max_new_tokens=4),
                         attention_mass=mass))
    top = attribute(memory, mass)[0]
    assert (top.chunk_index, top.token_start, top.token_end) == (
        int(memory.chunk_index[target]), int(memory.spans[target, 0]), int(memory.spans[target, 1]))
    assert top.mass > 0.9


def test_two_answers_on_one_memory_keep_their_own_citations(tiny_shared):
    """Issue 14: citations rode on the memory (`Memory.mass`/`tracking`, written in the forward pass),
    so two generations reading one memory (two threads) mixed their masses and the first to finish
    switched the other's tracking off. Each generation owns its attribution now."""
    from model.generate import TextStream

    tree = tiny_shared.encode_tree(random_ids(64 * 4, seed=7))
    memory = tiny_shared.build_memory([tree], None)
    tokenizer = SimpleNamespace(decode=lambda ids, **_: " ".join(map(str, ids)))

    def stream(prompt_seed, n):
        return TextStream(tiny_shared, tokenizer, random_ids(6, seed=prompt_seed).tolist(), memory,
                          GenerationSettings(max_new_tokens=n), eos_ids=())

    alone = stream(2, 12)
    list(alone)
    short, long = stream(1, 3), stream(2, 12)
    pieces = [iter(short), iter(long)]
    while pieces:  # interleaved step by step, as two threads would run them
        for it in list(pieces):
            if next(it, None) is None:
                pieces.remove(it)
    assert [(a.chunk_index, a.token_start) for a in long.result.attribution] == [
        (a.chunk_index, a.token_start) for a in alone.result.attribution]
    for a, b in zip(long.result.attribution, alone.result.attribution, strict=True):
        assert abs(a.mass - b.mass) < 1e-5
