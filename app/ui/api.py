"""Scriptable endpoints (for `gradio_client`): the same services, the same owner check as the UI.

The owner is the logged-in user of the request; no endpoint takes a user or owner argument.
"""

from __future__ import annotations

import base64
import inspect
from typing import Any

import gradio as gr

from app.export import export
from app.services import ServiceError
from app.services.qa import AnswerSettings
from app.ui.pages import Pages


class Api(Pages):
    def register(self) -> None:
        for fn in (
            self.list_documents,
            self.get_document,
            self.page_text,
            self.delete_document,
            self.ask,
            self.list_conversations,
            self.get_conversation,
            self.delete_conversation,
            self.export_conversation,
        ):
            group = {"concurrency_id": "answer"} if fn == self.ask else {}
            gr.api(self._guard(fn), api_name=fn.__name__, **group)

    @staticmethod
    def _guard(fn):
        """Service errors become gr.Error (a clean message for the client)."""

        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ServiceError as exc:
                raise gr.Error(str(exc)) from None

        wrapped.__name__ = fn.__name__
        wrapped.__doc__ = fn.__doc__
        wrapped.__signature__ = inspect.signature(fn)
        wrapped.__annotations__ = dict(fn.__annotations__)
        return wrapped

    def list_documents(self, request: gr.Request) -> list[dict[str, Any]]:
        """The caller's documents."""
        return self.ctx.documents.list(self.owner_id(request))

    def get_document(self, document_id: int, request: gr.Request) -> dict[str, Any]:
        return self.ctx.documents.get(self.owner_id(request), int(document_id))

    def page_text(self, document_id: int, page: int, request: gr.Request) -> str:
        return self.ctx.documents.page_text(self.owner_id(request), int(document_id), int(page))

    def delete_document(self, document_id: int, request: gr.Request) -> dict[str, Any]:
        return self.ctx.documents.delete(self.owner_id(request), int(document_id))

    def ask(
        self,
        question: str,
        document_ids: list[int],
        conversation_id: int | None = None,
        engine: str = "sharedllm",
        max_new_tokens: int = 256,
        request: gr.Request = None,
    ) -> dict[str, Any]:
        """Answer a question (non-streaming): the same record as `sharedllm ask --json`."""
        settings = AnswerSettings(
            max_new_tokens=int(max_new_tokens), max_citations=self.ctx.settings.max_citations
        )
        final = self.ctx.qa.answer_all(
            self.owner_id(request),
            question,
            [int(i) for i in document_ids or []],
            None if conversation_id in (None, "") else int(conversation_id),
            engine,
            settings,
        )
        return final.to_dict()

    def list_conversations(self, request: gr.Request) -> list[dict[str, Any]]:
        return self.ctx.conversations.list(self.owner_id(request))

    def get_conversation(self, conversation_id: int, request: gr.Request) -> dict[str, Any]:
        return self.ctx.conversations.transcript(self.owner_id(request), int(conversation_id))

    def delete_conversation(self, conversation_id: int, request: gr.Request) -> dict[str, Any]:
        owner = self.owner_id(request)
        self.ctx.conversations.delete(owner, int(conversation_id))
        return {"deleted": int(conversation_id)}

    def export_conversation(self, conversation_id: int, fmt: str = "md", request: gr.Request = None) -> str:
        """md/json as text; pdf as base64."""
        data = export(self.ctx.conversations.transcript(self.owner_id(request), int(conversation_id)), fmt)
        return base64.b64encode(data).decode() if fmt == "pdf" else data.decode("utf-8")
