"""Assemble the pages into one Gradio Blocks app and wire their events."""

from __future__ import annotations

from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from app.services.context import AppContext
from app.ui.access import AccessGuard, ExportLinks, LoginThrottle, UploadRegistry
from app.ui.api import Api
from app.ui.chat_page import ChatPage
from app.ui.pages import AccountBar, LibraryPage, SettingsPage

CSS = """
.upload-progress { width: 100%; border-collapse: collapse; }
.upload-progress td, .upload-progress th { padding: 4px 8px; text-align: left; }
.upload-progress progress { width: 160px; }
.upload-file.bad .file-status, .upload-file.bad .file-note { color: #b42318; font-weight: 600; }
.upload-file.ok .file-status { color: #067647; font-weight: 600; }
.upload-file.bad progress::-webkit-progress-value { background: #b42318; }
.upload-file.bad progress::-moz-progress-bar { background: #b42318; }
#account-bar { align-items: center; }
"""


class DocQAApp:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.uploads = UploadRegistry()
        self.exports = ExportLinks(ctx.conversations.transcript)
        self.account = AccountBar(ctx)
        self.settings_page = SettingsPage(ctx)
        self.library = LibraryPage(ctx, self.uploads)
        self.chat = ChatPage(ctx, self.exports)
        self.api = Api(ctx)

    def middleware(self) -> Middleware:
        """Scopes Gradio's upload, file and login routes by user; serves the export links."""
        s = self.ctx.settings
        return Middleware(
            AccessGuard,
            uploads=self.uploads,
            exports=self.exports,
            resolve_owner=self._owner_or_none,
            logins=LoginThrottle(s.login_max_failures_per_client, s.login_window_s),
        )

    def _owner_or_none(self, username: str | None) -> int | None:
        try:
            return self.ctx.auth.resolve(username).id
        except Exception:  # unknown user, login required
            return None

    def launch_kwargs(self) -> dict[str, Any]:
        from app.ui.server import launch_kwargs

        return launch_kwargs(self.ctx) | {"app_kwargs": {"middleware": [self.middleware()]}}

    def build(self) -> gr.Blocks:
        # delete_cache: Gradio's copies of uploads and exports go after an hour (our copies are private).
        with gr.Blocks(title="SharedLLM DocQA", delete_cache=(3600, 3600)) as demo:
            self.account.render()
            with gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    self.chat.render()
                with gr.Tab("Library", id="library"):
                    self.library.render()
                with gr.Tab("Settings", id="settings"):
                    self.settings_page.render()
            self.api.register()  # first: the public endpoint names must not collide with UI handlers
            self._wire(demo)
        return demo

    def _wire(self, demo: gr.Blocks) -> None:
        chat, lib = self.chat, self.library
        sidebar_out = [chat.conversations, chat.documents]
        library_out = [lib.table, lib.to_delete]
        private = {"api_visibility": "private"}

        demo.load(self.account.signed_in, None, self.account.who, **private)
        demo.load(chat.sidebar, chat.conversation_id, sidebar_out, **private)
        demo.load(lib.refresh, None, library_out, **private)

        lib.upload.click(
            lib.ingest_files,
            lib.files,
            lib.progress,
            show_progress="hidden",
            concurrency_id="ingest",
            **private,
        ).then(lib.refresh, None, library_out, **private).then(
            chat.sidebar, chat.conversation_id, sidebar_out, **private
        ).then(lambda: None, None, lib.files, **private)
        lib.delete.click(lib.delete_selected, lib.to_delete, lib.message, **private).then(
            lib.refresh, None, library_out, **private
        ).then(chat.sidebar, chat.conversation_id, sidebar_out, **private)
        lib.refresh_button.click(lib.refresh, None, library_out, **private)

        ask_in = [chat.conversation_id, chat.documents, *self.settings_page.inputs]
        ask_out = [chat.chatbot, chat.conversation_id, chat.conversations, chat.cited, chat.stats, chat.queued]
        for trigger in (chat.send.click, chat.question.submit):
            # taking a question runs at once and never waits behind an answer (its own unlimited group);
            # answering is one concurrency group for every way of asking: the limit counts answers
            trigger(
                chat.take_question, chat.question, [chat.question, chat.queued], trigger_mode="multiple",
                concurrency_limit=None, concurrency_id="take", show_progress="hidden", **private,
            ).success(chat.ask, ask_in, ask_out, show_progress="minimal", concurrency_id="answer",
                      trigger_mode="multiple", **private)

        chat.conversations.input(
            chat.open_conversation,
            chat.conversations,
            [chat.chatbot, chat.documents, chat.conversation_id, chat.cited, chat.stats, chat.export_file],
            **private,
        )
        cleared = [chat.chatbot, chat.conversation_id, chat.conversations, chat.cited, chat.page_text,
                   chat.stats, chat.export_file]
        chat.new_chat.click(chat.new_conversation, None, cleared, **private)
        chat.delete_chat.click(chat.delete_conversation, chat.conversation_id, cleared, **private)
        chat.cited.change(chat.show_page, chat.cited, chat.page_text, **private)
        for button, fmt in ((chat.export_md, "md"), (chat.export_json, "json"), (chat.export_pdf, "pdf")):
            button.click(chat.export_as(fmt), chat.conversation_id, chat.export_file, **private)


def build_app(ctx: AppContext) -> tuple[gr.Blocks, DocQAApp]:
    """The Blocks app and its owner (launch it with `web.launch_kwargs()`: the access guard is part of it)."""
    web = DocQAApp(ctx)
    return web.build(), web
