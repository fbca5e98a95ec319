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
