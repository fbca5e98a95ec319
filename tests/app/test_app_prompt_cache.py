"""`full`'s persisted prompt cache through the QA service: stored once, reused by follow-ups, the same
tokens with and without it, a damaged file recomputed, removed with its document."""

from __future__ import annotations

from sqlalchemy import select

from app.services.prompt_cache import is_prompt_cache
from app.services.qa import Answer, AnswerSettings, QAService
from storage import ContextTreeRecord

SETTINGS = AnswerSettings(max_new_tokens=12)
LONG_PAGES = [
    f"Page {n}. Clause {n}: the supplier delivers lot {n} of {40 + n} units to the buyer's warehouse "
    f"in Ghent within {n + 3} business days; late delivery costs {n * 15} euros a day. " * 4
    for n in range(1, 4)
]


def ask(qa, owner, question, docs, conversation=None):
    items = list(qa.answer(owner, question, docs, conversation, "full", SETTINGS))
    assert isinstance(items[-1], Answer)
    return items[-1]


def prompt_rows(ctx):
    with ctx.sessions() as s:
        rows = s.scalars(select(ContextTreeRecord)).all()
        return [(r.document_id, r.fingerprint, r.path, r.sha256) for r in rows if is_prompt_cache(r.fingerprint)]


def test_follow_up_reuses_the_persisted_prefix_and_decodes_the_same_tokens(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id, pages=LONG_PAGES)
    first = ask(ctx.qa, alice.id, "How many units are in lot 2?", [doc])
    assert first.timings["cached_prompt_tokens"] == 0
    rows = prompt_rows(ctx)
    assert len(rows) == 1 and rows[0][0] == doc
    assert ctx.tensors.absolute(rows[0][2]).is_file()
    follow_up = ask(ctx.qa, alice.id, "And the late fee of lot 3?", [], first.conversation)
    cached = follow_up.timings["cached_prompt_tokens"]
    assert cached >= 256 and follow_up.timings["prompt_tokens"] > cached
    assert prompt_rows(ctx) == rows  # reused, not rewritten
    # the same turn without any cache: identical answer, token for token (greedy)
    uncached_qa = QAService(ctx.sessions, ctx.documents, ctx.model, prompt_cache=None)
    again = ask(uncached_qa, alice.id, "And the late fee of lot 3?", [], first.conversation)
    assert again.timings["cached_prompt_tokens"] == 0
    assert again.answer == follow_up.answer and again.timings["new_tokens"] == follow_up.timings["new_tokens"]


def test_a_damaged_cache_is_dropped_and_recomputed_with_the_same_answer(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id, pages=LONG_PAGES)
    first = ask(ctx.qa, alice.id, "Where are the lots delivered?", [doc])
    [(_, _, path, sha)] = prompt_rows(ctx)
    file = ctx.tensors.absolute(path)
    data = bytearray(file.read_bytes())
    data[-7] ^= 0xFF  # a flipped bit in the K/V payload
    file.write_bytes(bytes(data))
    second = ask(ctx.qa, alice.id, "Where are the lots delivered?", [doc])
    assert second.timings["cached_prompt_tokens"] == 0 and second.answer == first.answer
    [(_, _, path2, sha2)] = prompt_rows(ctx)
    ctx.tensors.verify(path2, sha2)  # recomputed and stored again, complete
    third = ask(ctx.qa, alice.id, "Where are the lots delivered?", [doc])
    assert third.timings["cached_prompt_tokens"] > 0 and third.answer == first.answer


def test_the_cache_goes_with_its_document_and_short_prompts_are_not_cached(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id, pages=LONG_PAGES)
    ask(ctx.qa, alice.id, "How many lots are there?", [doc])
    [(_, _, path, _)] = prompt_rows(ctx)
    ctx.documents.delete(alice.id, doc)
    assert prompt_rows(ctx) == [] and not ctx.tensors.absolute(path).exists()
    short = make_doc(alice.id, name="short.pdf")  # ~60 tokens: cheaper to prefill than to read back
    ask(ctx.qa, alice.id, "What is the annual fee?", [short])
    assert prompt_rows(ctx) == []


def test_ingestion_prepares_the_cache_so_the_first_question_prefills_only_itself(tiny_model, tmp_path):
    """With `full` as the server's engine, its prefix is made at ingestion; with another, it is not."""
    from app_testkit import write_pdf

    from app.config import Settings
    from app.services.context import AppContext

    other = AppContext(Settings.load({"data_dir": tmp_path / "rag", "engine": "rag"}, environ={}), model=tiny_model)
    owner = other.auth.local_user().id
    assert other.ingestion.ingest_path(owner, write_pdf(tmp_path / "a.pdf", LONG_PAGES))["status"] == "ready"
    assert prompt_rows(other) == []
    other.close()
    ctx = AppContext(Settings.load({"data_dir": tmp_path / "full", "engine": "full"}, environ={}), model=tiny_model)
    alice = ctx.auth.add_user("alice", "alice-password-1")
    stages = []
    info = ctx.ingestion.ingest_path(alice.id, write_pdf(tmp_path / "lots.pdf", LONG_PAGES),
                                     progress=lambda stage, done, total: stages.append(stage))
    assert info["status"] == "ready" and stages[-1] == "prompt"
    [(doc, _, _, _)] = prompt_rows(ctx)
    assert doc == info["id"]
    assert ctx.qa.warm_prompt_cache(alice.id, doc) == 0  # already there: nothing recomputed
    first = ask(ctx.qa, alice.id, "How many units are in lot 1?", [doc])
    assert first.timings["cached_prompt_tokens"] >= 256
    uncached = ask(QAService(ctx.sessions, ctx.documents, ctx.model, prompt_cache=None), alice.id,
                   "How many units are in lot 1?", [doc])
    assert uncached.answer == first.answer
    ctx.close()
