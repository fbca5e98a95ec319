"""`actqkv` through the QA service: its document state built on first use and persisted, reused by
later questions, re-encoded when damaged or made from other text, and answers cited to the
document's pages. What it shares with `homer` (several documents, deletion, built at ingestion):
test_app_engine_states.py."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select

from app.config import Settings
from app.services.context import AppContext
from app.services.qa import Answer, AnswerSettings
from model.block_retrieval import ActQKVConfig
from storage import ContextTreeRecord

SETTINGS = AnswerSettings(max_new_tokens=8)
PAGES = [
    f"Page {n}. Clause {n}: the supplier delivers lot {n} of {40 + n} units to the buyer's warehouse "
    f"in Ghent within {n + 3} business days; late delivery costs {n * 15} euros a day. " * 5
    for n in range(1, 5)
]
# small blocks and window so these short pages are read through the block memory, not all locally
SMALL = ActQKVConfig(block_size=16, n_init=16, n_local=64, exec_block=32, budget=4, min_blocks=1, max_blocks=8)


@pytest.fixture
def small_ctx(settings, tiny_model):
    lm = dataclasses.replace(tiny_model, actqkv=SMALL)
    context = AppContext(settings, model=lm)
    yield context
    context.close()


def ask(ctx, owner, question, docs, conversation=None):
    items = list(ctx.qa.answer(owner, question, docs, conversation, "actqkv", SETTINGS))
    assert isinstance(items[-1], Answer)
    return items[-1]


def state_rows(ctx):
    with ctx.sessions() as s:
        rows = s.scalars(select(ContextTreeRecord)).all()
        return [(r.document_id, r.path, r.sha256) for r in rows if r.fingerprint.startswith("actqkv-")]


def count_encodings(ctx, monkeypatch):
    calls = []
    lm = ctx.model()
    original = lm.encode_blocks
    monkeypatch.setattr(type(lm), "encode_blocks", lambda self, *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def test_the_state_is_built_once_reused_and_cites_document_pages(small_ctx, two_users, make_doc, monkeypatch):
    ctx = small_ctx
    alice, _ = two_users
    doc = make_doc(alice.id, pages=PAGES)
    calls = count_encodings(ctx, monkeypatch)
    first = ask(ctx, alice.id, "How many units are in lot 2?", [doc])
    assert len(calls) == 1 and first.engine == "actqkv" and first.timings["new_tokens"] >= 1
    [(owner_doc, path, sha)] = state_rows(ctx)
    assert owner_doc == doc
    ctx.tensors.verify(path, sha)
    follow = ask(ctx, alice.id, "And the late fee of lot 3?", [], first.conversation)
    assert len(calls) == 1 and state_rows(ctx) == [(doc, path, sha)]  # loaded, not re-encoded
    assert follow.timings["cached_prompt_tokens"] > 0  # the final window came from the state
    for c in first.citations + follow.citations:
        assert c["document"] == doc and 1 <= c["page"] <= len(PAGES) and c["text"]
    again = ask(ctx, alice.id, "How many units are in lot 2?", [doc])
    assert again.answer == first.answer  # the same question on the loaded state: the same tokens


def test_a_damaged_state_is_dropped_and_re_encoded(small_ctx, two_users, make_doc, monkeypatch):
    ctx = small_ctx
    alice, _ = two_users
    doc = make_doc(alice.id, pages=PAGES)
    first = ask(ctx, alice.id, "Where are the lots delivered?", [doc])
    [(_, path, _)] = state_rows(ctx)
    file = ctx.tensors.absolute(path)
    data = bytearray(file.read_bytes())
    data[-9] ^= 0xFF
    file.write_bytes(bytes(data))
    calls = count_encodings(ctx, monkeypatch)
    second = ask(ctx, alice.id, "Where are the lots delivered?", [doc])
    assert len(calls) == 1 and second.answer == first.answer
    [(_, path2, sha2)] = state_rows(ctx)
    ctx.tensors.verify(path2, sha2)


def test_actqkv_settings_are_validated_and_reach_the_engine():
    from app.config import ConfigError

    settings = Settings.load({}, environ={"SHAREDLLM_ACTQKV": '{"budget": 32, "max_blocks": 64}'})
    assert settings.actqkv_config() == ActQKVConfig(budget=32, max_blocks=64)
    for bad in ('{"budget": 100}', '{"nope": 1}', "[1]", "not json"):
        with pytest.raises(ConfigError, match="SHAREDLLM_ACTQKV"):
            Settings.load({}, environ={"SHAREDLLM_ACTQKV": bad})
    assert Settings.load({}, environ={}).actqkv_config() == ActQKVConfig()


def test_ingestion_encodes_only_the_servers_engine_and_others_build_on_first_use(tiny_model, tmp_path):
    from app_testkit import write_pdf

    lm = dataclasses.replace(tiny_model, actqkv=SMALL)
    ctx = AppContext(Settings.load({"data_dir": tmp_path / "d", "engine": "rag"}, environ={}), model=lm)
    owner = ctx.auth.local_user().id
    info = ctx.ingestion.ingest_path(owner, write_pdf(tmp_path / "lots.pdf", PAGES))
    assert info["status"] == "ready"

    def kinds():
        with ctx.sessions() as s:
            return sorted("actqkv" if r.fingerprint.startswith("actqkv-") else "tree"
                          for r in s.scalars(select(ContextTreeRecord)))

    assert kinds() == []  # rag needs no model state: nothing encoded at ingestion
    ask(ctx, owner, "How many units are in lot 2?", [info["id"]])
    assert kinds() == ["actqkv"]
    items = list(ctx.qa.answer(owner, "How many units are in lot 2?", [info["id"]], None, "sharedllm", SETTINGS))
    assert isinstance(items[-1], Answer) and kinds() == ["actqkv", "tree"]  # the tree on its first use
    ctx.close()


def test_the_chat_shows_progress_while_a_state_is_built_on_first_use(small_ctx, make_doc):
    from types import SimpleNamespace

    from app.ui.access import ExportLinks
    from app.ui.chat_page import ChatPage

    ctx = small_ctx
    owner = ctx.auth.local_user().id
    doc = make_doc(owner, pages=PAGES)
    chat = ChatPage(ctx, ExportLinks(ctx.conversations.transcript))
    request = SimpleNamespace(username=None, session_hash="page-1")
    chat.take_question("How many units are in lot 2?", request)
    frames = list(chat.ask(None, [doc], "actqkv", 8, 0.0, request))
    statuses = [f[4] for f in frames]
    reading = [s for s in statuses if "block memory" in s]
    done, total = reading[-1].rsplit(": ", 1)[1].split()[0].split("/")
    assert "1 of 1" in reading[0] and done == total and int(total) > 1  # per execution block, to the end
    assert "**Sources**" in frames[-1][0][-1]["content"] and "first token" in frames[-1][4]
    chat.take_question("And lot 3?", request)
    again = list(chat.ask(frames[-1][1], [doc], "actqkv", 8, 0.0, request))
    assert not [f for f in again if "block memory" in str(f[4])]  # stored: no second reading


def test_lexical_blocks_are_the_blocks_whose_words_match_the_question(tiny_model):
    """BM25 over two-block windows: a fact cut by a block boundary still ranks, both its blocks given."""
    from app.services.lexical import lexical_blocks
    from model.actqkv_encode import encode_stream

    words = [f"filler{i % 7} text" for i in range(300)]
    words[150] = "The warehouse in Ghent keeps lot"  # spans several tokens: may cross a block boundary
    text = " ".join(words)
    cfg = dataclasses.replace(SMALL, lexical_blocks=4, min_blocks=4, budget=4)
    state = encode_stream(tiny_model.model.base, tiny_model.tokenize(text), cfg, doc_offset=0)
    blocks = lexical_blocks(tiny_model, [state], "Which lot does the Ghent warehouse keep?", 4)
    assert 1 <= len(blocks) <= 4 and all(d == 0 for d, _ in blocks)
    best = blocks[0][1]
    window = tiny_model.tokenizer.decode(state.token_ids[best * 16:(best + 2) * 16])
    assert "Ghent" in window
    assert lexical_blocks(tiny_model, [state], "zzz qqq", 4) == []  # no word in common: nothing pinned
    assert lexical_blocks(tiny_model, [state], "Ghent", 0) == []
