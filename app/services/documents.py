"""The document library of one owner: list, read pages, delete, and load what QA needs."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.services.errors import NotFound, NotReady
from app.tree_cache import TreeCache
from storage import (
    ContextTreeRecord,
    Conversation,
    Document,
    DocumentStatus,
    Page,
    TensorStore,
    TensorStoreError,
)

logger = logging.getLogger(__name__)

TOKEN_IDS_KEY = "doc.token_ids"

STATUS_HELP = {
    DocumentStatus.PENDING.value: "is waiting to be processed",
    DocumentStatus.EXTRACTING.value: "is still being read (extracting text)",
    DocumentStatus.ENCODING.value: "is still being encoded",
    DocumentStatus.NEEDS_PASSWORD.value: "is password-protected; upload an unlocked copy",
    DocumentStatus.NO_TEXT_LAYER.value: "has no text layer (a scan?); run OCR first",
    DocumentStatus.FAILED.value: "failed to ingest",
}


def owned_document(session: Session, owner_id: int, document_id: int) -> Document:
    """The document if owner_id owns it, else NotFound (a foreign id looks like a missing one)."""
    doc = session.scalar(select(Document).where(Document.id == document_id, Document.owner_id == owner_id))
    if doc is None:
        raise NotFound(f"document {document_id} not found")
    return doc


def document_dict(doc: Document) -> dict[str, Any]:
    return {
        "id": doc.id,
        "name": doc.name,
        "pages": doc.pages,
        "tokens": doc.tokens,
        "status": doc.status,
        "error": doc.error,
        "size_bytes": doc.size_bytes,
        "sha256": doc.sha256,
        "created_at": doc.created_at.isoformat() if doc.created_at else None,
    }


def not_ready_message(doc: Document) -> str:
    why = STATUS_HELP.get(doc.status, f"is {doc.status}")
    reason = f" ({doc.error})" if doc.error and doc.status == DocumentStatus.FAILED.value else ""
    return f"document {doc.name!r} {why}{reason}"


@dataclass
class PageSpan:
    number: int  # 1-based
    token_start: int
    token_end: int  # exclusive
    text: str


@dataclass
class DocumentContext:
    """One ready document as QA sees it: pages, chunk texts, and (for sharedllm) its tree."""

    id: int
    name: str
    pages: list[PageSpan]
    chunks: list[dict[str, Any]]  # {index, token_start, token_end, page_start, page_end, text}
    tree: Any | None = None  # model.ContextTree
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def page_of(self, token_start: int, token_end: int) -> PageSpan | None:
        """The page that overlaps the token range [start, end) the most."""
        best, best_overlap = None, 0
        for page in self.pages:
            overlap = min(token_end, page.token_end) - max(token_start, page.token_start)
            if overlap > best_overlap:
                best, best_overlap = page, overlap
        if best is None and self.pages:
            best = min(self.pages, key=lambda p: abs(p.token_start - token_start))
        return best

    @property
    def text(self) -> str:
        return "\n\n".join(p.text for p in self.pages)


class _MissingTree(Exception):
    def __init__(self, document_id: int, message: str):
        super().__init__(message)
        self.document_id = document_id


class DocumentService:
    """The library: one owner's documents (list, read pages, delete, hand over) and what QA needs of
    them (pages, chunks, trees through one tiered cache, repaired by re-encoding when unusable)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        tensors: TensorStore,
        uploads_dir: Path,
        trees: TreeCache | None = None,
        repair: Callable[[int, int], None] | None = None,
        tree_factory: Callable[[dict[str, Any]], Any] | None = None,
    ):
        """`repair(owner_id, document_id)` re-encodes a ready document whose tree is missing, damaged or
        from another model (the ingestion service's `ensure_tree`); without it such a document is
        NotReady. `tree_factory` turns stored tensors into a tree (default `ContextTree.from_tensors`)."""
        self._sessions = session_factory
        self._tensors = tensors
        self._uploads = uploads_dir
        self._trees = trees or TreeCache()
        self._repair = repair
        self._tree_factory = tree_factory

    def list(self, owner_id: int) -> list[dict[str, Any]]:
        with self._sessions() as session:
            docs = session.scalars(
                select(Document)
                .where(Document.owner_id == owner_id)
                .order_by(Document.created_at.desc(), Document.id.desc())
            )
            return [document_dict(d) for d in docs]

    def get(self, owner_id: int, document_id: int) -> dict[str, Any]:
        with self._sessions() as session:
            return document_dict(owned_document(session, owner_id, document_id))

    def page_text(self, owner_id: int, document_id: int, page: int) -> str:
        with self._sessions() as session:
            owned_document(session, owner_id, document_id)
            row = session.scalar(select(Page).where(Page.document_id == document_id, Page.number == page))
            if row is None:
                raise NotFound(f"page {page} of document {document_id} not found")
            return row.text

    def delete(self, owner_id: int, document_id: int) -> dict[str, Any]:
        """Delete the row (cascading to pages, chunks, tree records), then its tensor files."""
        with self._sessions.begin() as session:
            doc = owned_document(session, owner_id, document_id)
            info = document_dict(doc)
            paths = [t.path for t in doc.trees]
            upload = self._uploads / str(int(owner_id)) / f"{doc.sha256}.pdf"
            session.delete(doc)
        upload.unlink(missing_ok=True)
        for path in paths:
            self._trees.discard(path)
            try:
                self._tensors.delete(path)
            except Exception:  # the row is gone; a leftover file is logged, not fatal
                logger.exception("could not delete tensor file %s of document %s", path, document_id)
        logger.info("owner %s deleted document %s (%s)", owner_id, document_id, info["name"])
        return info

    def purge_owner(self, owner_id: int, delete_rows: Callable[[], None]) -> None:
        """Removes an owner: `delete_rows` deletes the rows (the account, cascading to its documents),
        then every file of theirs goes too: tensor files and the private copies of their PDFs."""
        with self._sessions() as session:
            paths = list(
                session.scalars(
                    select(ContextTreeRecord.path).join(Document).where(Document.owner_id == owner_id)
                )
            )
        delete_rows()
        for path in paths:
            self._trees.discard(path)
            self._tensors.delete(path)
        shutil.rmtree(self._uploads / str(int(owner_id)), ignore_errors=True)
        logger.info("owner %s removed with %d tensor file(s) and their uploads", owner_id, len(paths))

    def hand_over(self, from_owner: int, to_owner: int) -> dict[str, list[int]]:
        """Gives every document and conversation of `from_owner` to `to_owner` (e.g. what was uploaded
        in single-user mode, owned by `local`, to a real account). A document `to_owner` already has
        (same content) stays with `from_owner`; the private copies of the PDFs move along."""
        moved, kept = [], []
        with self._sessions.begin() as session:
            theirs = set(session.scalars(select(Document.sha256).where(Document.owner_id == to_owner)))
            for doc in session.scalars(select(Document).where(Document.owner_id == from_owner)):
                if doc.sha256 in theirs:
                    kept.append(doc.id)
                    continue
                doc.owner_id = to_owner
                moved.append((doc.id, doc.sha256))
            conversations = session.scalars(select(Conversation).where(Conversation.owner_id == from_owner))
            handed = []
            for conv in conversations:
                conv.owner_id = to_owner
                handed.append(conv.id)
        target = self._uploads / str(int(to_owner))
        for _, sha in moved:
            source = self._uploads / str(int(from_owner)) / f"{sha}.pdf"
            if source.exists():
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                source.replace(target / source.name)
        logger.info("owner %s handed %d document(s) and %d conversation(s) to owner %s",
                    from_owner, len(moved), len(handed), to_owner)
        return {"documents": [i for i, _ in moved], "kept_duplicates": kept, "conversations": handed}

    def load_for_qa(
        self, owner_id: int, document_ids: list[int], fingerprint: str | None
    ) -> list[DocumentContext]:
        """Ready documents in the given order; NotFound/NotReady if any is foreign, missing or not ready.

        With a fingerprint, each document's context tree for that model is loaded too (memory-mapped);
        a document encoded by another model is re-encoded first when `ensure_tree` is set.
        """
        try:
            return self._load_for_qa(owner_id, document_ids, fingerprint)
        except TensorStoreError as damaged:
            if self._repair is None:
                raise
            logger.warning("stored tree unusable (%s): re-encoding", damaged)
            for doc_id in document_ids:
                self._repair(owner_id, doc_id)  # verifies each file, re-encodes the bad ones
            return self._load_for_qa(owner_id, document_ids, fingerprint)
        except _MissingTree as missing:
            if self._repair is None:
                raise NotReady(str(missing)) from None
            logger.info(
                "document %s has no tree for model %s: encoding it now", missing.document_id, fingerprint
            )
            self._repair(owner_id, missing.document_id)
            return self._load_for_qa(owner_id, document_ids, fingerprint)

    def _load_for_qa(
        self, owner_id: int, document_ids: list[int], fingerprint: str | None
    ) -> list[DocumentContext]:
        out = []
        with self._sessions() as session:
            for doc_id in document_ids:
                doc = owned_document(session, owner_id, doc_id)
                if doc.status != DocumentStatus.READY.value:
                    raise NotReady(not_ready_message(doc))
                pages = [PageSpan(p.number, p.token_start, p.token_end, p.text) for p in doc.page_rows]
                chunks = [
                    {
                        "index": c.index,
                        "token_start": c.token_start,
                        "token_end": c.token_end,
                        "page_start": c.page_start,
                        "page_end": c.page_end,
                        "text": c.text,
                    }
                    for c in doc.chunks
                ]
                ctx = DocumentContext(doc.id, doc.name, pages, chunks)
                if fingerprint is not None:
                    record = session.scalar(
                        select(ContextTreeRecord).where(
                            ContextTreeRecord.document_id == doc.id,
                            ContextTreeRecord.fingerprint == fingerprint,
                        )
                    )
                    if record is None:
                        raise _MissingTree(doc.id, f"document {doc.name!r} was encoded with another model")
                    ctx.extra["tree_path"] = record.path
                    ctx.extra["tree_sha256"] = record.sha256
                out.append(ctx)
        for ctx in out:
            if "tree_path" in ctx.extra:
                path, sha256 = ctx.extra["tree_path"], ctx.extra["tree_sha256"]
                self._trees.discard(path, keep_sha256=sha256)  # versions of this file re-encoded since
                ctx.tree, ctx.token_ids = self._trees.get(path, sha256) or self._load_tree(path, sha256)
        return out

    def _load_tree(self, path: str, sha256: str) -> tuple[Any, list[int] | None]:
        """Maps and verifies the stored tree, then keeps it in the cache (on the GPU when it fits)."""
        tensors = self._tensors.load(path, sha256)
        token_ids = tensors.pop(TOKEN_IDS_KEY, None)
        factory = self._tree_factory
        if factory is None:
            from model import ContextTree

            factory = ContextTree.from_tensors
        ids = token_ids.tolist() if token_ids is not None else None
        return self._trees.put(path, sha256, factory(tensors), ids)
