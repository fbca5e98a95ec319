"""The chat page: questions queued per page, answers streamed with the engine's status lines (a
state built on first use, homer's merges) on a worker thread, sources, exports."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import gradio as gr

from app.services import ServiceError
from app.services.context import AppContext
from app.services.engines import ENGINES
from app.services.qa import Answer, AnswerSettings, Asked
from app.ui import render
from app.ui.access import ExportLinks
from app.ui.background import Progress, in_background
from app.ui.pages import Pages, page_key


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
            waiting = self._pending.setdefault(page_key(request), deque())
            waiting.append(question)
            return "", render.queued_markdown(list(waiting))

    def _next_question(self, request: gr.Request) -> tuple[str | None, list[str]]:
        with self._lock:
            waiting = self._pending.get(page_key(request))
            question = waiting.popleft() if waiting else None
            left = list(waiting or [])
            if waiting is not None and not waiting:
                del self._pending[page_key(request)]
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
