"""UI pages as classes: components are attributes, handlers are named methods that call services.

The acting user always comes from the server side (`gr.Request.username`, set by Gradio's login),
never from a component value; every service call is filtered by that owner.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from app.auth import AuthError
from app.services import ServiceError
from app.services.context import AppContext
from app.services.engines import ENGINES
from app.ui import render
from app.ui.access import UploadRegistry

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


def page_key(request: gr.Request | None) -> str:
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
