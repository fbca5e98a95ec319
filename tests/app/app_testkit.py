"""Helpers shared by the app and browser tests (imported by tests/app/conftest.py and tests/browser)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.services.documents import TOKEN_IDS_KEY
from storage import Chunk, ContextTreeRecord, Document, DocumentStatus, Page

if TYPE_CHECKING:
    from app.services.context import AppContext


def make_ready_document(ctx: AppContext, owner_id: int, name: str, pages: list[str]) -> int:
    """Insert a `ready` document with pages, chunks and a context tree encoded by ctx's model."""
    lm = ctx.model()
    ids: list[int] = []
    spans = []
    for number, text in enumerate(pages, 1):
        start = len(ids)
        ids += lm.tokenize(text + "\n\n")
        spans.append((number, start, len(ids), text))
    chunk_len = lm.config.chunk_len
    tree = lm.encode_tree(ids)
    tensors = tree.to_tensors()
    tensors[TOKEN_IDS_KEY] = torch.tensor(ids, dtype=torch.int32)
    with ctx.sessions.begin() as session:
        doc = Document(
            owner_id=owner_id,
            sha256=f"{name}-{owner_id}".ljust(64, "0")[:64],
            name=name,
            size_bytes=sum(len(p) for p in pages),
            pages=len(pages),
            tokens=len(ids),
            status=DocumentStatus.READY.value,
        )
        session.add(doc)
        session.flush()
        for number, start, end, text in spans:
            session.add(Page(document_id=doc.id, number=number, text=text, token_start=start, token_end=end))
        for index, start in enumerate(range(0, len(ids), chunk_len)):
            end = min(start + chunk_len, len(ids))
            inside = [n for n, s, e, _ in spans if s < end and e > start]
            session.add(
                Chunk(
                    document_id=doc.id,
                    index=index,
                    token_start=start,
                    token_end=end,
                    page_start=min(inside),
                    page_end=max(inside),
                    text=lm.tokenizer.decode(ids[start:end]),
                )
            )
        stored = ctx.tensors.save(doc.id, lm.fingerprint, tensors)
        session.add(
            ContextTreeRecord(
                document_id=doc.id,
                fingerprint=lm.fingerprint,
                path=stored.path,
                sha256=stored.sha256,
                bytes=stored.bytes,
            )
        )
        return doc.id


def write_pdf(path, pages: list[str]) -> Path:
    """A real multi-page PDF with a text layer (fpdf2), one string per page."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return Path(path)


CONTRACT_PAGES = [
    "Service Agreement. This agreement between Acme Ltd and Beta GmbH starts on 1 March 2024 "
    "and covers the maintenance of the Beta ticketing platform.",
    "Fees. The annual fee is 12,500 euros, payable in advance each January. Late payments carry "
    "interest of 4 percent per year.",
    "Termination. Either party may terminate this agreement with ninety days written notice. "
    "The governing law is the law of Ireland.",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(ctx, port: int | None = None):
    """Start the real Gradio app (login on when accounts exist) on loopback; returns (demo, url)."""
    from app.ui.app import build_app
    from app.ui.server import launch_kwargs

    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=ctx.settings.concurrency_limit, max_size=ctx.settings.queue_max_size)
    kwargs = launch_kwargs(ctx)
    kwargs.update(
        server_name="127.0.0.1", server_port=port or free_port(), prevent_thread_lock=True, quiet=True
    )
    _, url, _ = demo.launch(**kwargs)
    return demo, url.rstrip("/")
