"""UI page handlers called directly (no browser): per-file upload statuses, errors, rendering."""

from types import SimpleNamespace

import gradio as gr
import pytest

from app.ui import render
from app.ui.access import ExportLinks, UploadRegistry
from app.ui.chat_page import ChatPage
from app.ui.pages import LibraryPage

LOCAL = SimpleNamespace(username=None, session_hash="page-1")  # single-user mode request


def ask(chat, question, conversation_id, docs):
    chat.take_question(question, LOCAL)
    return list(chat.ask(conversation_id, docs, "sharedllm", 5, 0.0, LOCAL))


def test_upload_reports_each_file(ctx, contract_pdf, tmp_path):
    uploads = UploadRegistry()
    page = LibraryPage(ctx, uploads)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 not really")
    notes = tmp_path / "notes.txt"
    notes.write_text("plain text")
    files = [str(contract_pdf), str(broken), str(notes)]
    uploads.record(None, files)  # as the upload route records them
    frames = list(page.ingest_files(files, LOCAL))
    assert len(frames) >= 3
    final = frames[-1]
    assert final.count("data-status='ready'") == 1
    assert final.count("data-status='failed'") == 1
    assert final.count("data-status='rejected'") == 1 and "only PDF files are accepted" in final
    rows, choices = page.refresh(LOCAL)
    assert sorted(r[2] for r in rows) == ["failed", "ready"]
    assert not contract_pdf.exists()  # Gradio's temporary copy is removed; ours is private


def test_upload_requires_files(ctx):
    with pytest.raises(gr.Error):
        list(LibraryPage(ctx, UploadRegistry()).ingest_files([], LOCAL))


def test_chat_streams_and_reports_not_ready(ctx, make_doc):
    owner = ctx.auth.local_user().id
    doc = make_doc(owner)
    exports = ExportLinks(ctx.conversations.transcript)
    chat = ChatPage(ctx, exports)
    frames = ask(chat, "What is the fee?", None, [doc])
    history, conv_id, _, _, stats, _ = frames[-1]
    assert conv_id and "**Sources**" in history[-1]["content"] and "p. " in history[-1]["content"]
    assert "first token" in stats and len(frames) >= 3
    loaded = chat.open_conversation(conv_id, LOCAL)
    assert loaded[0] == history and loaded[1] == [doc] and loaded[2] == conv_id
    key = loaded[3]["choices"][0][1]
    assert chat.show_page(key, LOCAL) == ctx.documents.page_text(owner, *render.parse_citation_key(key))
    link = chat.export_as("md")(conv_id, LOCAL)
    token = link.split("export/", 1)[1].split("/", 1)[0]
    name, _, data = exports.render(token, owner)
    assert "What is the fee?" in data.decode() and name.endswith(".md") and name in link
    assert exports.render(token, owner + 1) is None
    chat.delete_conversation(conv_id, LOCAL)
    assert ctx.conversations.list(owner) == []

    from storage import Document

    with ctx.sessions.begin() as s:
        s.get(Document, doc).status = "encoding"
    frames = ask(chat, "Again?", None, [doc])
    assert "still being encoded" in frames[-1][0][-1]["content"]


def test_login_required_once_accounts_exist(ctx):
    ctx.auth.add_user("alice", "alice-password-1")
    with pytest.raises(gr.Error, match="login required"):
        LibraryPage(ctx, UploadRegistry()).refresh(LOCAL)


def test_progress_html_escapes_names():
    html = render.progress_html([{"name": "<script>x</script>.pdf", "status": "failed", "error": "bad <b>"}])
    assert "<script>" not in html and "&lt;script&gt;" in html and "failed" in html
