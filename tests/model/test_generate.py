"""The streaming text iterator: pieces, stop strings, budgets, timings, chat template."""

from __future__ import annotations

import pytest

from model.generate import GenerationSettings, _safe_prefix
from model.testing import tiny_loaded_model

MESSAGES = [{"role": "user", "content": "Summarise the agreement."}]


@pytest.fixture(scope="module")
def tiny_lm(data_dir):
    return tiny_loaded_model(data_dir)


def test_pieces_join_to_the_final_text_and_timings_are_reported(tiny_lm):
    stream = tiny_lm.generate(MESSAGES, settings=GenerationSettings(max_new_tokens=24))
    pieces = list(stream)
    result = stream.result
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert result.new_tokens == 24 and result.finish_reason == "length"
    assert 0 < result.ttft_s <= result.total_s and result.tokens_per_s > 0
    assert result.prompt_tokens == len(tiny_lm.chat_ids(MESSAGES))


def test_stop_string_truncates_the_answer(tiny_lm):
    full = tiny_lm.generate(MESSAGES, settings=GenerationSettings(max_new_tokens=40))
    text = "".join(full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the random model produced too little text to pick a stop string"
    stream = tiny_lm.generate(MESSAGES, settings=GenerationSettings(max_new_tokens=40, stop=(stop,)))
    got = "".join(stream)
    assert got == text[: text.index(stop)] and stream.result.finish_reason == "stop"


def test_generation_with_a_document_memory_reports_attribution(tiny_lm):
    ids = tiny_lm.tokenize("The notice period is ninety days. " * 40)
    tree = tiny_lm.encode_tree(ids)
    memory = tiny_lm.build_memory([tree], "What is the notice period?")
    stream = tiny_lm.generate(MESSAGES, memory=memory, settings=GenerationSettings(max_new_tokens=8))
    list(stream)
    attribution = stream.result.attribution
    assert attribution and 0 < sum(a.mass for a in attribution) <= 1 + 1e-6
    assert all(0 <= a.token_start < a.token_end <= len(ids) for a in attribution)


def test_held_back_text_never_shows_a_partial_stop_string():
    assert _safe_prefix("Answer: 42 <|e", ("<|end|>",)) == "Answer: 42 "
    assert _safe_prefix("caf\ufffd", ()) == "caf"


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0)


def _prompt(n: int = 40) -> list[int]:
    import torch

    return torch.randint(5, 120, (n,), generator=torch.Generator().manual_seed(9)).tolist()


def test_cache_is_preallocated_and_written_in_place(tiny_base):
    import torch

    from model.generate import decode_one_token, prefill

    cache = tiny_base.new_cache(1, 64)
    pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in cache]
    logits = prefill(tiny_base, torch.tensor([_prompt()]), None, cache)
    pos = torch.tensor([40])
    for _ in range(5):
        logits = decode_one_token(tiny_base, logits.argmax().view(1, 1), pos, None, cache)
        pos = pos + 1
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in cache] == pointers and cache[0].length == 45
    with pytest.raises(ValueError, match="input_pos must continue it"):
        decode_one_token(tiny_base, torch.tensor([[1]]), torch.tensor([50]), None, cache)


def test_cached_decoding_equals_recomputing_the_whole_sequence(tiny_base):
    """Cached = uncached: each step's logits with the KV cache (dynamic and static shapes) equal a
    fresh forward over the whole sequence so far."""
    import torch

    from model.generate import decode_one_token, prefill

    for static in (False, True):
        ids = _prompt()
        cache = tiny_base.new_cache(1, 60, static=static)
        logits = prefill(tiny_base, torch.tensor([ids]), None, cache)
        for _ in range(8):
            with torch.no_grad():
                full = tiny_base(torch.tensor([ids]))[0, -1]
            assert (full - logits).abs().max().item() < 1e-4
            token = int(logits.argmax())
            ids.append(token)
            logits = decode_one_token(tiny_base, torch.tensor([[token]]), torch.tensor([len(ids) - 1]), None, cache)


def test_generation_from_a_persisted_prefix_gives_the_same_tokens(tiny_base):
    from model.generate import PrefixState, generate_tokens

    ids = _prompt(48)
    settings = GenerationSettings(max_new_tokens=16)
    captured = []
    plain = list(generate_tokens(tiny_base, ids, None, settings, on_prefix=captured.append))
    k, v = zip(*(layer.prefix(30) for layer in captured[0]), strict=True)
    prefix = PrefixState([t.clone() for t in k], [t.clone() for t in v])
    assert prefix.length == 30
    assert list(generate_tokens(tiny_base, ids, None, settings, prefix=prefix)) == plain
    with pytest.raises(ValueError, match="leaves nothing to prefill"):
        list(generate_tokens(tiny_base, ids[:30], None, settings, prefix=prefix))


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    import torch

    from model.generate import sample

    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    draws = {int(sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {0, 1}
    a = [int(sample(logits, 1.0, 1.0, torch.Generator().manual_seed(3))) for _ in range(2)]
    assert a[0] == a[1] and int(sample(logits, 0.0, 1.0, None)) == 0


@pytest.mark.timeout(300)
def test_compiled_decode_step_over_a_static_cache_matches_eager(tiny_base):
    """The CUDA-graph path's shape discipline, checked on CPU with inductor: torch.compile of
    decode_one_token over a static cache gives the eager logits step after step."""
    import torch

    from model.generate import compiled_decode_step, decode_one_token, prefill

    ids = torch.tensor([_prompt()])

    def run(step, static):
        cache = tiny_base.new_cache(1, 64, static=static)
        logits = prefill(tiny_base, ids, None, cache)
        pos, out = torch.tensor([ids.shape[1]]), []
        for _ in range(6):
            logits = step(tiny_base, logits.argmax().view(1, 1), pos, None, cache)
            out.append(logits.clone())
            pos = pos + 1
        return torch.stack(out)

    eager = run(decode_one_token, False)
    assert (run(compiled_decode_step("default"), True) - eager).abs().max().item() < 1e-4
