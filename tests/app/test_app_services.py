"""QA, documents and conversations services on a tiny random model (production code paths)."""

import json

import pytest

from app.services import BadRequest, NotFound, NotReady
from app.services.qa import Answer, AnswerSettings, Asked
from storage import Document

FAST = AnswerSettings(max_new_tokens=6)


def run(ctx, owner_id, question, doc_ids, conversation_id=None, engine="sharedllm", settings=FAST):
    items = list(ctx.qa.answer(owner_id, question, doc_ids, conversation_id, engine, settings))
    asked, pieces, final = items[0], items[1:-1], items[-1]
    assert isinstance(asked, Asked) and asked.conversation == final.conversation
    assert isinstance(final, Answer) and all(isinstance(p, str) for p in pieces)
    return pieces, final


def test_answer_streams_then_final_record_with_citations_and_timings(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id)
    pieces, final = run(ctx, alice.id, "What is the annual fee?", [doc])
    assert pieces and "".join(pieces) == final.answer
    assert final.engine == "sharedllm" and final.conversation > 0
    assert set(final.timings) == {"retrieval_s", "ttft_s", "total_s", "new_tokens", "tokens_per_s", "prompt_tokens",
                                  "cached_prompt_tokens"}
    assert final.timings["new_tokens"] == 6
    assert 0 <= final.timings["retrieval_s"] <= final.timings["ttft_s"] <= final.timings["total_s"]
    assert 1 <= len(final.citations) <= FAST.max_citations
    for c in final.citations:
        assert c["document"] == doc and c["name"] == "report.pdf" and c["page"] in (1, 2, 3) and c["text"]
    data = final.to_dict()
    # the tiny test model's cross-attention is untrained, which the JSON says too
    assert set(data) == {"answer", "engine", "conversation", "citations", "timings", "warning"}


def test_conversation_persists_and_continues(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id)
    _, first = run(ctx, alice.id, "When does the contract start?", [doc])
    _, second = run(ctx, alice.id, "And the fee?", [], conversation_id=first.conversation)
    assert second.conversation == first.conversation
    convs = ctx.conversations.list(alice.id)
    assert [c["id"] for c in convs] == [first.conversation]
    assert convs[0]["title"] == "When does the contract start?" and convs[0]["document_ids"] == [doc]
    messages = ctx.conversations.messages(alice.id, first.conversation)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["citations"] == first.citations and messages[3]["timings"] == second.timings


@pytest.mark.parametrize("engine", ["full", "rag"])
def test_baseline_engines_answer_with_citations(ctx, two_users, make_doc, engine):
    alice, _ = two_users
    doc = make_doc(alice.id)
    _, final = run(ctx, alice.id, "What is the annual fee?", [doc], engine=engine)
    assert final.engine == engine
    if engine == "rag":
        assert final.citations and all(c["document"] == doc for c in final.citations)


def test_errors_are_clear(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id)
    with pytest.raises(BadRequest, match="empty"):
        run(ctx, alice.id, "   ", [doc])
    with pytest.raises(BadRequest, match="select at least one document"):
        run(ctx, alice.id, "fee?", [])
    with pytest.raises(BadRequest, match="unknown engine"):
        run(ctx, alice.id, "fee?", [doc], engine="gpt")
    with pytest.raises(NotFound, match="document 999 not found"):
        run(ctx, alice.id, "fee?", [999])
    with ctx.sessions.begin() as s:
        s.get(Document, doc).status = "encoding"
    with pytest.raises(NotReady, match="still being encoded"):
        run(ctx, alice.id, "fee?", [doc])
    with ctx.sessions.begin() as s:
        row = s.get(Document, doc)
        row.status, row.error = "failed", "pypdf could not parse the file"
    with pytest.raises(NotReady, match="failed to ingest .pypdf could not parse"):
        run(ctx, alice.id, "fee?", [doc])


def test_documents_list_page_text_and_delete_removes_tensor_files(ctx, two_users, make_doc):
    alice, _ = two_users
    doc = make_doc(alice.id)
    [info] = ctx.documents.list(alice.id)
    assert info["id"] == doc and info["pages"] == 3 and info["status"] == "ready" and info["tokens"] > 0
    assert "annual fee" in ctx.documents.page_text(alice.id, doc, 2)
    files = list((ctx.settings.data_dir / "trees").rglob("*.safetensors"))
    assert len(files) == 1
    ctx.documents.delete(alice.id, doc)
    assert ctx.documents.list(alice.id) == []
    assert not files[0].exists()
    with pytest.raises(NotFound):
        ctx.documents.page_text(alice.id, doc, 2)


def test_a_warning_saved_with_the_weights_is_said_with_every_sharedllm_answer(settings, tiny_model, tmp_path):
    import dataclasses

    from app_testkit import make_ready_document

    from app.services.context import AppContext
    from model.sharedllm import SharedLLM

    note = "trained at a small CPU scale: answers from documents are unreliable"
    tiny_model.model.save_pretrained(tmp_path / "weights", extra={"steps": 3, "warning": note})
    assert SharedLLM.weights_info(tmp_path / "weights") == {"steps": 3, "warning": note}
    lm = dataclasses.replace(tiny_model, weights_trained=True, weights_warning=note)
    context = AppContext(settings, model=lm)
    try:
        alice = context.auth.add_user("alice", "alice-password-1")
        doc = make_ready_document(context, alice.id, "a.pdf", ["The annual fee is 12,500 euros."])
        _, final = run(context, alice.id, "What is the annual fee?", [doc])
        assert final.notes["warning"] == note and final.to_dict()["warning"] == note
        _, rag = run(context, alice.id, "What is the annual fee?", [doc], engine="rag", conversation_id=final.conversation)
        assert "warning" not in rag.notes and "warning" not in rag.to_dict()
        # the warning is stored with its answer: a resumed conversation and every export still say it
        from app.export import export
        from app.ui import render

        stored = [m for m in context.conversations.messages(alice.id, final.conversation) if m["role"] == "assistant"]
        assert [m["notes"].get("warning") for m in stored] == [note, None]
        shown = render.chat_messages(stored)
        assert note in shown[0]["content"] and note not in shown[1]["content"]
        transcript = context.conversations.transcript(alice.id, final.conversation)
        md = export(transcript, "md").decode()
        assert md.count(note) == 1 and md.index(note) < md.index("_rag: ")  # under the sharedllm answer only
        assert json.loads(export(transcript, "json"))["messages"][1]["notes"] == {"warning": note}
        assert b"%PDF" in export(transcript, "pdf")[:8]
    finally:
        context.close()


def test_untrained_sharedllm_weights_are_flagged_on_the_answer(ctx, two_users, make_doc):
    from app.services.qa import UNTRAINED_WARNING
    from app.ui import render

    alice, _ = two_users
    doc = make_doc(alice.id)
    _, final = run(ctx, alice.id, "What is the annual fee?", [doc])
    assert final.notes["warning"] == UNTRAINED_WARNING  # the tiny test model has no trained weights
    assert "untrained" in render.notes_markdown(final.notes)
    _, rag = run(ctx, alice.id, "What is the annual fee?", [doc], engine="rag")
    assert "warning" not in rag.notes


def test_question_is_stored_before_the_answer(ctx, two_users, make_doc, monkeypatch):
    """Issue 14, defect 5: a question was stored only with its answer, so a crash mid-answer lost it."""
    alice, _ = two_users
    doc = make_doc(alice.id)
    lm = ctx.model()
    real = lm.generate

    def crashing(*args, **kwargs):
        stream = real(*args, **kwargs)
        yield next(iter(stream))
        raise RuntimeError("the server died mid-answer")

    monkeypatch.setattr(lm, "generate", crashing)
    items = ctx.qa.answer(alice.id, "What is the annual fee?", [doc], None, "rag", FAST)
    with pytest.raises(RuntimeError):
        for _ in items:
            pass
    [conv] = ctx.conversations.list(alice.id)
    assert [(m["role"], m["text"]) for m in ctx.conversations.messages(alice.id, conv["id"])] == [
        ("user", "What is the annual fee?")
    ]
    monkeypatch.setattr(lm, "generate", real)
    _, final = run(ctx, alice.id, "And the notice period?", [doc], conv["id"], engine="rag")
    roles = [m["role"] for m in ctx.conversations.messages(alice.id, conv["id"])]
    assert final.conversation == conv["id"] and roles == ["user", "user", "assistant"]
