"""UI pages as classes: components are attributes, handlers are named methods that call services.

The acting user always comes from the server side (`gr.Request.username`, set by Gradio's login),
never from a component value; every service call is filtered by that owner.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

import gradio as gr

from app.auth import AuthError
from app.services import ServiceError
from app.services.context import AppContext
from app.services.engines import ENGINES
from app.services.qa import Answer, AnswerSettings, Asked
from app.ui import render
from app.ui.access import ExportLinks, UploadRegistry
from app.ui.background import Progress, in_background

logger = logging.getLogger(__name__)

POLL_S = 0.25


class Pages:
    """Shared by every page: the app context and the owner of a request."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def owner_id(self, request: gr.Request | None) -> int:
        username = getattr(request, "username", None) if request is not None else None
        try:
            return self.ctx.auth.resolve(username).id
        except AuthError as exc:
            raise gr.Error(str(exc)) from None


def _page_key(request: gr.Request | None) -> str:
    """One open page: Gradio's session of the request."""
    return str(getattr(request, "session_hash", None))


# --- account -----------------------------------------------------------------------------------------
class AccountBar(Pages):
    def render(self) -> None:
        with gr.Row(elem_id="account-bar"):
            gr.Markdown("## SharedLLM DocQA", elem_id="app-title")
            self.who = gr.Markdown("", elem_id="signed-in-as")
            self.logout = gr.Button(
                "Log out", link="/logout", size="sm", scale=0, visible=self.ctx.auth.has_accounts()
            )

    def signed_in(self, request: gr.Request) -> str:
        username = getattr(request, "username", None)
        return f"Signed in as **{username}**" if username else "Single-user mode (no accounts)"


# --- settings ----------------------------------------------------------------------------------------
class SettingsPage(Pages):
    def render(self) -> None:
        s = self.ctx.settings
        self.engine = gr.Radio(
            list(ENGINES),
            value=s.engine,
            label="Engine",
            info=" · ".join(f"{name}: {engine.summary}" for name, engine in ENGINES.items()),
        )
        gr.Markdown(render.default_engine_markdown(s.engine), elem_id="default-engine")
        self.max_new_tokens = gr.Slider(
            16, s.max_new_tokens_limit, value=s.max_new_tokens, step=16, label="Max new tokens"
        )
        self.temperature = gr.Slider(
            0.0, s.max_temperature, value=s.temperature, step=0.05, label="Temperature", info="0 = greedy (reproducible)"
        )

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.engine, self.max_new_tokens, self.temperature]


# --- library -----------------------------------------------------------------------------------------
class LibraryPage(Pages):
    """Upload with per-file progress and status; the document table; delete."""

    def __init__(self, ctx: AppContext, uploads: UploadRegistry):
        super().__init__(ctx)
        self.uploads = uploads  # who uploaded which file: the handler takes only the caller's own

    def render(self) -> None:
        mb = self.ctx.settings.max_upload_mb
        self.files = gr.File(
            file_count="multiple",
            file_types=[".pdf"],
            label=f"Upload PDFs (up to {mb} MB each)",
            elem_id="upload-files",
        )
        self.upload = gr.Button("Add to library", variant="primary", elem_id="upload-button")
        self.progress = gr.HTML(render.progress_html([]), elem_id="upload-progress")
        self.table = gr.Dataframe(
            headers=render.LIBRARY_HEADERS,
            value=[],
            interactive=False,
            label="Documents",
            elem_id="library-table",
            wrap=True,
        )
        with gr.Row():
            self.to_delete = gr.Dropdown(
                choices=[],
                multiselect=True,
                label="Select documents to delete",
                elem_id="delete-select",
                scale=3,
            )
            self.delete = gr.Button("Delete selected", variant="stop", elem_id="delete-button", scale=1)
            self.refresh_button = gr.Button("Refresh", scale=0)
        self.message = gr.Markdown("", elem_id="library-message")

    def refresh(self, request: gr.Request):
        docs = self.ctx.documents.list(self.owner_id(request))
        return render.library_rows(docs), gr.update(
            choices=render.document_choices(docs, ready_only=False), value=[]
        )

    def ingest_files(self, files: list[str] | None, request: gr.Request):
        """Generator: ingests the files one after another, yielding the per-file progress table."""
        owner = self.owner_id(request)
        paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
        if not paths:
            raise gr.Error("choose one or more PDF files first")
        rows = [{"name": p.name, "status": "queued", "fraction": 0.0} for p in paths]
        for row, path in zip(rows, paths, strict=True):
            if not self.uploads.claim(getattr(request, "username", None), path):
                # not uploaded by this user in this session (or already used): never read, never removed
                logger.warning("owner %s named a file they did not upload: %s", owner, path)
                row.update(status="rejected", error="not a file you uploaded; upload it again")
        yield render.progress_html(rows)
        for row, path in zip(rows, paths, strict=True):
            if row["status"] == "queued":
                yield from self._ingest_one(owner, row, path, rows)
        ok = sum(r["status"] == "ready" for r in rows)
        logger.info("owner %s uploaded %d file(s), %d ready", owner, len(rows), ok)
        yield render.progress_html(rows)

    def _ingest_one(self, owner: int, row: dict[str, Any], path: Path, rows: list[dict[str, Any]]):
        name = row["name"]
        try:
            self.ctx.ingestion.check_file(path, name)
        except ServiceError as exc:
            row.update(status="rejected", error=str(exc))
            path.unlink(missing_ok=True)
            return
        events: queue.Queue = queue.Queue()

        def progress(stage: str, done: int, total: int) -> None:
            events.put(("progress", stage, done, total))

        def work() -> None:
            try:
                events.put(
                    ("done", self.ctx.ingestion.ingest_path(owner, path, name=name, progress=progress))
                )
            except Exception as exc:  # reported in the table; the traceback goes to the log
                logger.exception("ingestion of %s failed", name)
                events.put(("error", str(exc)))

        row.update(status="extracting", fraction=0.02)
        threading.Thread(target=work, name=f"ingest-{name}", daemon=True).start()
        while True:
            try:
                event = events.get(timeout=POLL_S)
            except queue.Empty:
                yield render.progress_html(rows)
                continue
            if event[0] == "progress":
                _, stage, done, total = event
                # extraction is the first 20 % of the bar, encoding the rest; then the full-text
                # prompt cache (the document is ready for questions already, the bar stays full)
                frac = done / total if total else 0.0
                if stage == "prompt":
                    row.update(status="caching prompt", fraction=1.0)
                else:
                    row.update(
                        status="encoding" if stage == "encode" else "extracting",
                        fraction=0.2 + 0.8 * frac if stage == "encode" else 0.2 * frac,
                    )
            elif event[0] == "done":
                doc = event[1]
                row.update(status=doc["status"], error=doc.get("error") or "", id=doc["id"])
                break
            else:
                row.update(status="failed", error=event[1])
                break
        path.unlink(missing_ok=True)  # the private copy lives under the data dir; drop Gradio's
        yield render.progress_html(rows)

    def delete_selected(self, selected: list[int] | None, request: gr.Request):
        owner = self.owner_id(request)
        if not selected:
            raise gr.Error("select documents to delete first")
        names = []
        for doc_id in selected:
            try:
                names.append(self.ctx.documents.delete(owner, int(doc_id))["name"])
            except ServiceError as exc:
                raise gr.Error(str(exc)) from None
        return f"Deleted {', '.join(names)}."


# --- chat ----------------------------------------------------------------------------------------------
class ChatPage(Pages):
    """Conversation list, document selection, streamed answers with sources, page viewer, export."""

    def __init__(self, ctx: AppContext, exports: ExportLinks):
        super().__init__(ctx)
        self.exports = exports  # owner-bound, expiring download links (no export is ever a file)
        # questions taken but not answered yet, per open page (Gradio session), oldest first
        self._pending: dict[str, deque[str]] = {}
        self._lock = threading.Lock()

    def render(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                with gr.Row():
                    self.new_chat = gr.Button("New chat", elem_id="new-chat")
                    self.delete_chat = gr.Button("Delete chat", variant="stop", elem_id="delete-chat")
                self.conversations = gr.Radio(choices=[], label="Conversations", elem_id="conversation-list")
                self.documents = gr.CheckboxGroup(
                    choices=[], label="Ask about these documents", elem_id="chat-documents"
                )
            with gr.Column(scale=3):
                self.chatbot = gr.Chatbot(
                    value=[],
                    label="Chat",
                    elem_id="chatbot",
                    height=460,
                    buttons=["copy"],
                    feedback_options=None,
                )
                with gr.Row():
                    self.question = gr.Textbox(
                        placeholder="Ask a question about the selected documents",
                        show_label=False,
                        scale=5,
                        elem_id="question",
                        lines=1,
                    )
                    self.send = gr.Button("Ask", variant="primary", scale=1, elem_id="ask-button")
                self.queued = gr.Markdown("", elem_id="queued-questions")
                self.stats = gr.Markdown("", elem_id="answer-stats")
                with gr.Accordion("View a cited page", open=False, elem_id="page-viewer"):
                    self.cited = gr.Dropdown(choices=[], label="Cited page", elem_id="cited-page")
                    self.page_text = gr.Textbox(
                        label="Page text", lines=10, interactive=False, elem_id="page-text", buttons=["copy"]
                    )
                with gr.Row(elem_id="export-row"):
                    self.export_md = gr.Button("Export Markdown", size="sm", elem_id="export-md")
                    self.export_json = gr.Button("Export JSON", size="sm", elem_id="export-json")
                    self.export_pdf = gr.Button("Export PDF", size="sm", elem_id="export-pdf")
                self.export_file = gr.HTML("", elem_id="export-file")
        self.conversation_id = gr.State(None)

    # conversation list / documents ---------------------------------------------------------------
    def sidebar(self, conversation_id: int | None, request: gr.Request):
        owner = self.owner_id(request)
        docs = self.ctx.documents.list(owner)
        convs = self.ctx.conversations.list(owner)
        return (
            gr.update(choices=render.conversation_choices(convs), value=conversation_id),
            gr.update(choices=render.document_choices(docs, ready_only=True)),
        )

    def open_conversation(self, conversation_id: int | None, request: gr.Request):
        if conversation_id is None:
            return gr.update(), gr.update(), None, gr.update(), "", ""
        owner = self.owner_id(request)
        try:
            conv = self.ctx.conversations.get(owner, int(conversation_id))
            messages = self.ctx.conversations.messages(owner, int(conversation_id))
        except ServiceError as exc:
            raise gr.Error(str(exc)) from None
        ready = {d["id"] for d in self.ctx.documents.list(owner) if d["status"] == "ready"}
        last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
        stats = render.timing_markdown(last["engine"] or "", last["timings"]) if last else ""
        return (
            render.chat_messages(messages),
            [i for i in conv["document_ids"] if i in ready],
            conv["id"],
            gr.update(choices=render.citation_choices(messages), value=None),
            stats,
            "",  # the previous conversation's export link goes
        )

    def new_conversation(self):
        return [], None, gr.update(value=None), gr.update(choices=[], value=None), "", "", ""

    def delete_conversation(self, conversation_id: int | None, request: gr.Request):
        """Delete the open conversation, then show an empty chat and the remaining list."""
        if conversation_id is None:
            raise gr.Error("no conversation is open")
        owner = self.owner_id(request)
        try:
            self.ctx.conversations.delete(owner, int(conversation_id))
        except ServiceError as exc:
            raise gr.Error(str(exc)) from None
        convs = self.ctx.conversations.list(owner)
        return (
            [],
            None,
            gr.update(choices=render.conversation_choices(convs), value=None),
            gr.update(choices=[], value=None),
            "",
            "",
            "",
        )

    # asking ---------------------------------------------------------------------------------------------
    def take_question(self, question: str, request: gr.Request):
        """Runs at once, even while an answer streams: the question joins this page's queue and the box
        is cleared; `ask` (chained after it, one answer at a time) takes the questions in order."""
        self.owner_id(request)
        question = (question or "").strip()
        if not question:
            raise gr.Error("type a question first")
        with self._lock:
            waiting = self._pending.setdefault(_page_key(request), deque())
            waiting.append(question)
            return "", render.queued_markdown(list(waiting))

    def _next_question(self, request: gr.Request) -> tuple[str | None, list[str]]:
        with self._lock:
            waiting = self._pending.get(_page_key(request))
            question = waiting.popleft() if waiting else None
            left = list(waiting or [])
            if waiting is not None and not waiting:
                del self._pending[_page_key(request)]
            return question, left

    def _shown(self, owner: int, conversation_id: int | None) -> list[dict[str, Any]]:
        """The conversation as stored (not as the page last drew it: a queued question's page is stale)."""
        if conversation_id is None:
            return []
        return render.chat_messages(self.ctx.conversations.messages(owner, int(conversation_id)))

    def ask(
        self,
        conversation_id: int | None,
        document_ids: list[int] | None,
        engine: str,
        max_new_tokens: float,
        temperature: float,
        request: gr.Request,
    ):
        """Generator: the next queued question; streams its answer, then adds its sources and timings.
        Never writes the question box: what the user types meanwhile stays there."""
        owner = self.owner_id(request)
        question, left = self._next_question(request)
        if question is None:
            return
        queued = render.queued_markdown(left)
        try:
            history = self._shown(owner, conversation_id)
        except ServiceError:  # the open conversation was deleted meanwhile: start a new one
            history, conversation_id = [], None
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield history, conversation_id, gr.update(), gr.update(), "Thinking…", queued
        settings = AnswerSettings(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            max_citations=self.ctx.settings.max_citations,
        )
        text = ""
        try:
            for status in self._prepare_states(owner, [int(i) for i in document_ids or []], engine):
                yield history, conversation_id, gr.update(), gr.update(), status, gr.update()
            for item in in_background(lambda report: self.ctx.qa.answer(
                owner, question, [int(i) for i in document_ids or []], conversation_id, engine, settings,
                progress=report), "answer"):
                if isinstance(item, Progress):  # homer's merge levels, the minutes before its first token
                    stage, done, total = item
                    if stage == "merge":
                        yield history, conversation_id, gr.update(), gr.update(), merge_status(done, total), gr.update()
                    continue
                if isinstance(item, Asked):  # stored: a question queued behind this one continues it
                    conversation_id = item.conversation
                    waiting = getattr(ENGINES.get(engine), "waiting", "Thinking…")  # an engine's own words
                    yield history, conversation_id, gr.update(), gr.update(), waiting, gr.update()
                    continue
                if isinstance(item, Answer):
                    final = item
                    break
                text += item
                history[-1] = {"role": "assistant", "content": text}
                yield history, conversation_id, gr.update(), gr.update(), "Answering…", gr.update()
        except ServiceError as exc:
            history[-1] = {"role": "assistant", "content": f"**Cannot answer:** {exc}"}
            yield history, conversation_id, gr.update(), gr.update(), "", gr.update()
            return
        convs = self.ctx.conversations.list(owner)
        messages = self.ctx.conversations.messages(owner, final.conversation)
        # the stored answer, rendered as a resumed conversation shows it (sources and notes included)
        history[-1] = render.chat_messages([messages[-1]])[0]
        yield (
            history,
            final.conversation,
            gr.update(choices=render.conversation_choices(convs), value=final.conversation),
            gr.update(choices=render.citation_choices(messages), value=None),
            render.notes_markdown(final.notes) + render.timing_markdown(final.engine, final.timings),
            gr.update(),
        )

    def _prepare_states(self, owner: int, document_ids: list[int], engine: str):
        """Yields status lines while an engine builds the documents' persisted state on its first use
        (actqkv: minutes for a long PDF on a CPU), so the chat does not sit on "Thinking…" silently."""
        if not getattr(ENGINES.get(engine), "state_kind", None):
            return

        def work(report):
            for n, doc_id in enumerate(document_ids, 1):
                yield self.ctx.qa.warm_engine_state(
                    owner, doc_id, engine, lambda stage, done, total, n=n: report(n, stage, done, total))

        for event in in_background(work, "prepare-states"):
            if isinstance(event, Progress):
                yield state_status(engine, len(document_ids), *event)

    def show_page(self, key: str | None, request: gr.Request) -> str:
        if not key:
            return ""
        owner = self.owner_id(request)
        doc_id, page = render.parse_citation_key(key)
        try:
            return self.ctx.documents.page_text(owner, doc_id, page)
        except ServiceError as exc:
            raise gr.Error(str(exc)) from None

    # export ---------------------------------------------------------------------------------------------
    def export_as(self, fmt: str):
        def handler(conversation_id: int | None, request: gr.Request) -> str:
            """A download link for the open conversation, rendered when (and only if) its owner opens it."""
            if conversation_id is None:
                raise gr.Error("nothing to export yet: ask a question first")
            owner = self.owner_id(request)
            try:
                return render.export_link_html(self.exports.create(owner, int(conversation_id), fmt))
            except ServiceError as exc:
                raise gr.Error(str(exc)) from None

        handler.__name__ = f"export_{fmt}"
        return handler


def state_status(engine: str, n_docs: int, n: int, stage: str, done: int, total: int) -> str:
    """The chat's line while document n of n_docs gets `engine`'s state built on first use."""
    if stage == "calibration":
        return f"Calibrating {engine} for this model (once, then stored)…"
    what, unit = ("block memory", "blocks") if engine == "actqkv" else ("stored leaves", "pieces")
    return f"Reading document {n} of {n_docs} into {engine}'s {what} (first use, then stored): {done}/{total} {unit}"


def merge_status(done: int, total: int) -> str:
    """The chat's line while homer merges the documents for a question."""
    return f"Merging the documents for this question (HOMER): {done} of {total} merges done…"
