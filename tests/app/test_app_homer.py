"""`homer` through the QA service: its calibration computed once per model and stored, each
document's leaves built on first use and persisted, reused by later questions, answers cited to the
document's pages, documents beyond the layers refused, the chat's statuses. What it shares with
`actqkv` (several documents, deletion, built at ingestion): test_app_engine_states.py."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select

from app.config import Settings
from app.services.context import AppContext
from app.services.qa import Answer, AnswerSettings
from model.homer import HomerConfig
from storage import ContextTreeRecord

SETTINGS = AnswerSettings(max_new_tokens=8)
PAGES = [
    f"Page {n}. Clause {n}: the supplier delivers lot {n} of {40 + n} units to the buyer's warehouse "
    f"in Ghent within {n + 3} business days; late delivery costs {n * 15} euros a day. " * 5
    for n in range(1, 5)
]
# short chunks, so these pages are cut into several leaves and merged; a small calibration
SMALL = HomerConfig(chunk_tokens=512, warmup_layers=0, suffix_reserve=64, calibration_tokens=256,
                    calibration_windows=1, calibration_queries=16)


@pytest.fixture
def small_ctx(settings, tiny_model):
    context = AppContext(settings, model=dataclasses.replace(tiny_model, homer=SMALL))
    yield context
    context.close()


def ask(ctx, owner, question, docs, conversation=None):
    items = list(ctx.qa.answer(owner, question, docs, conversation, "homer", SETTINGS))
    assert isinstance(items[-1], Answer)
    return items[-1]


def state_rows(ctx):
    with ctx.sessions() as s:
        rows = s.scalars(select(ContextTreeRecord)).all()
        return [(r.document_id, r.path, r.sha256) for r in rows if r.fingerprint.startswith("homer-")]


def test_leaves_and_calibration_are_built_once_and_answers_cite_pages(small_ctx, two_users, make_doc, monkeypatch):
    ctx = small_ctx
    alice, _ = two_users
    doc = make_doc(alice.id, pages=PAGES)
    lm = ctx.model()
    calls = {"encode": 0, "calibrate": 0}
    encode, calibrate = lm.encode_homer, lm.calibrate_homer

    def counted(name, fn):
        return lambda self, *a, **k: (calls.__setitem__(name, calls[name] + 1), fn(*a, **k))[1]

    monkeypatch.setattr(type(lm), "encode_homer", counted("encode", encode))
    monkeypatch.setattr(type(lm), "calibrate_homer", counted("calibrate", calibrate))
    stages = []
    first = list(ctx.qa.answer(alice.id, "How many units are in lot 2?", [doc], None, "homer", SETTINGS,
                               progress=lambda stage, done, total: stages.append(stage)))[-1]
    assert calls == {"encode": 1, "calibrate": 1} and {"calibration", "homer"} <= set(stages)
    assert first.engine == "homer" and first.timings["new_tokens"] >= 1
    assert first.notes["homer_input_tokens"] > SMALL.chunk_tokens >= first.notes["homer_cache_tokens"]
    [(owner_doc, path, sha)] = state_rows(ctx)
    assert owner_doc == doc
    ctx.tensors.verify(path, sha)
    follow = ask(ctx, alice.id, "And the late fee of lot 3?", [], first.conversation)
    assert calls == {"encode": 1, "calibrate": 1} and state_rows(ctx) == [(doc, path, sha)]  # loaded
    assert follow.timings["cached_prompt_tokens"] > 0  # the merged cache
    for c in first.citations + follow.citations:
        assert c["document"] == doc and 1 <= c["page"] <= len(PAGES) and c["text"]
    assert first.citations
    again = ask(ctx, alice.id, "How many units are in lot 2?", [doc])
    assert again.answer == first.answer  # the same question on the loaded leaves: the same tokens
    # a new process (another context on the same data dir) loads the stored calibration
    lm.homer_bias = None
    second = AppContext(ctx.settings, model=lm)
    ask(second, alice.id, "How many units are in lot 2?", [doc])
    assert calls == {"encode": 1, "calibrate": 1}
    second.close()


def test_homer_settings_are_validated_and_reach_the_engine():
    from app.config import ConfigError

    settings = Settings.load({}, environ={"SHAREDLLM_HOMER": '{"chunk_tokens": 8192, "warmup_layers": 6}'})
    assert settings.homer_config() == HomerConfig(chunk_tokens=8192, warmup_layers=6)
    for bad in ('{"state_dtype": "int4"}', '{"nope": 1}', "[1]", "not json"):
        with pytest.raises(ConfigError, match="SHAREDLLM_HOMER"):
            Settings.load({}, environ={"SHAREDLLM_HOMER": bad})
    assert Settings.load({}, environ={}).homer_config() == HomerConfig()


def test_a_document_beyond_what_the_layers_can_merge_is_refused_clearly(settings, tiny_model, two_users, make_doc):
    from app.services.errors import BadRequest

    # 4 layers, 2 of them warm-up: trees of height 1 at most, so 2 leaves of 512 tokens
    lm = dataclasses.replace(tiny_model, homer=dataclasses.replace(SMALL, warmup_layers=2))
    ctx = AppContext(settings, model=lm)
    alice, _ = two_users
    doc = make_doc(alice.id, pages=PAGES * 3)
    with pytest.raises(BadRequest, match="chunk_tokens"):
        ask(ctx, alice.id, "How many units are in lot 2?", [doc])
    assert state_rows(ctx) == []  # nothing half-written
    ctx.close()


def test_the_chat_shows_the_calibration_and_the_leaves_while_they_are_built(small_ctx, make_doc):
    from types import SimpleNamespace

    from app.ui.access import ExportLinks
    from app.ui.chat_page import ChatPage

    ctx = small_ctx
    owner = ctx.auth.local_user().id
    doc = make_doc(owner, pages=PAGES)
    chat = ChatPage(ctx, ExportLinks(ctx.conversations.transcript))
    request = SimpleNamespace(username=None, session_hash="page-1")
    chat.take_question("How many units are in lot 2?", request)
    statuses = [str(f[4]) for f in chat.ask(None, [doc], "homer", 8, 0.0, request)]
    assert any("Calibrating homer" in s for s in statuses) and any("Merging the documents" in s for s in statuses)
    reading = [s for s in statuses if "stored leaves" in s]
    done, total = reading[-1].rsplit(": ", 1)[1].split()[0].split("/")
    assert done == total and int(total) > 1  # per piece, to the end
    merging = [s for s in statuses if "merges done" in s]  # then the question's merges, one line each
    assert merging and [m.split(": ")[1] for m in merging] == [f"{i} of {len(merging)} merges done…"
                                                               for i in range(1, len(merging) + 1)]
    chat.take_question("And lot 3?", request)
    again = [str(f[4]) for f in chat.ask(None, [doc], "homer", 8, 0.0, request)]
    assert not [s for s in again if "stored leaves" in s or "Calibrating" in s]  # both stored: no second build


def test_lexical_blocks_keep_the_questions_passage_through_every_reduction(tiny_model):
    """The blocks whose words best match the question (BM25, as actqkv's) are dropped by no merge,
    however small the final cache; without them the same merge loses part of the passage."""
    from app.services.lexical import lexical_windows
    from model.homer import LEXICAL_BLOCK

    lm = dataclasses.replace(tiny_model, homer=dataclasses.replace(SMALL, target_tokens=300, lexical_blocks=2))
    words = [f"filler{i % 7} text" for i in range(900)]
    words[600] = "The warehouse in Ghent keeps lot"
    ids = lm.tokenize(" ".join(words))
    state = lm.encode_homer(lm.tokenize("Read this."), ids, 0)
    assert len(state.ranges) >= 4  # merged over two levels at least
    question = "Which lot does the Ghent warehouse keep?"
    blocks = lexical_windows(lm, [state.token_ids], LEXICAL_BLOCK, question, 2)
    assert blocks and "Ghent" in lm.tokenizer.decode(ids[blocks[0][1] * LEXICAL_BLOCK:(blocks[0][1] + 2) * LEXICAL_BLOCK])
    suffix = lm.tokenize(question)
    kept, _ = lm.homer_prefix([state], suffix, None, blocks)
    plain, _ = lm.homer_prefix([state], suffix)
    wanted = {t for _, j in blocks for t in range(j * LEXICAL_BLOCK, min((j + 1) * LEXICAL_BLOCK, len(ids)))}
    assert wanted <= set(kept.tok.tolist()) and kept.prefix.length == plain.prefix.length
    assert not wanted <= set(plain.tok.tolist())
