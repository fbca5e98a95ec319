"""Ingestion: PDF upload -> pages, chunks and a persisted context tree, once per (user, content).

Crash safety rests on ordering, not on locks:
1. the upload is copied (hashed on the way) to a temporary name, then renamed to
   `uploads/<owner>/<sha256>.pdf`;
2. the document row moves pending -> extracting -> encoding, each step committed, so a crash leaves
   a row in an *active* status that `recover()` (run at start-up) marks failed and strips of pages
   and chunks;
3. the tensor file is written atomically (see storage.tensors) before the one transaction that adds
   its `context_trees` row and marks the document `ready`; a crash in between leaves an orphan file,
   which `recover()` deletes. A `ready` row therefore always points at a complete, checksummed file.

A stored tree is only used with the model fingerprint it was made with; `ensure_tree` re-encodes
(from the stored page texts) when the fingerprint differs or the file is missing or damaged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.extraction import OK, ExtractionLimits, extract_pdf
from storage import (
    ACTIVE_STATUSES,
    Chunk,
    ContextTreeRecord,
    Document,
    DocumentStatus,
    Page,
    TensorStore,
    TensorStoreError,
)
from storage.tensors import fsync_dir

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (stage "extract" | "encode", done, total)
TOKEN_IDS_KEY = "doc.token_ids"
PAGE_SEPARATOR = "\n\n"
UPLOAD_TMP_SUFFIX = ".tmp"


class IngestionError(Exception):
    """Base of the errors this service raises (bad files are statuses, not exceptions)."""


class DocumentNotFound(IngestionError, LookupError):
    """No such document for this owner (a foreign document looks exactly like a missing one)."""


class DocumentNotReady(IngestionError):
    """The document exists but has no usable text (status other than ready)."""


@dataclass
class LoadedTree:
    """What QA needs of one document: its tree and its token ids (both memory-mapped)."""

    document: Document
    tree: Any  # model.ContextTree
    token_ids: torch.Tensor  # (n_tokens,) int32


@dataclass
class RecoveryReport:
    failed_documents: list[int] = field(default_factory=list)
    retried_documents: list[int] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)


@dataclass
class Tokenized:
    token_ids: list[int]
    page_spans: list[tuple[int, int]]  # per page: [token_start, token_end)


def tokenize_pages(tokenizer: Any, pages: list[str]) -> Tokenized:
    """Tokenize page by page so every token knows its page; pages are joined by a blank line."""
    ids: list[int] = []
    spans = []
    for text in pages:
        start = len(ids)
        if text:
            ids.extend(tokenizer(text + PAGE_SEPARATOR, add_special_tokens=False)["input_ids"])
        spans.append((start, len(ids)))
    return Tokenized(ids, spans)


def chunk_rows(document_id: int, tokenized: Tokenized, chunk_len: int, decode: Callable[[list[int]], str]) -> list[Chunk]:
    """Chunk i covers tokens [i*L, min((i+1)*L, n)); its pages are those its tokens came from."""
    ends = [end for _, end in tokenized.page_spans]
    starts = [start for start, _ in tokenized.page_spans]
    ids = tokenized.token_ids
    rows = []
    for index, start in enumerate(range(0, len(ids), chunk_len)):
        end = min(start + chunk_len, len(ids))
        first = bisect_right(ends, start)  # first page ending after `start`
        last = bisect_left(starts, end) - 1  # last page starting before `end`
        rows.append(Chunk(document_id=document_id, index=index, token_start=start, token_end=end,
                          page_start=first + 1, page_end=max(first, last) + 1, text=decode(ids[start:end])))
    return rows


def _default_tree_factory(tensors: dict[str, torch.Tensor]) -> Any:
    from model import ContextTree

    return ContextTree.from_tensors(tensors)


class IngestionService:
    """Turns PDFs into stored documents for one loaded model; safe to share between threads."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        tensor_store: TensorStore,
        loaded_model: Any,
        *,
        uploads_dir: Path | None = None,
        limits: ExtractionLimits | None = None,
        tree_factory: Callable[[dict[str, torch.Tensor]], Any] = _default_tree_factory,
    ) -> None:
        self.sessions = session_factory
        self.tensors = tensor_store
        self.lm = loaded_model
        # Default: next to the tensor store, i.e. <data_dir>/uploads when the store is <data_dir>/trees.
        self.uploads_dir = Path(uploads_dir) if uploads_dir else Path(tensor_store.root).parent / "uploads"
        self.limits = limits or ExtractionLimits()
        self.tree_factory = tree_factory

    # --- ingest ---------------------------------------------------------------------------------
    def ingest(self, owner_id: int, path: Path | str, name: str | None = None,
               progress: ProgressFn | None = None) -> Document:
        """Store the PDF at `path` for `owner_id`; the same bytes again return the same document.

        Bad files do not raise: the returned document says `needs_password`, `no_text_layer` or
        `failed` with a reason. Raises FileNotFoundError when `path` does not exist.
        """
        path = Path(path)
        name = name or path.name
        staged, digest, size = self._stage_upload(owner_id, path)
        try:
            doc_id, process = self._claim(owner_id, digest, name, size)
            if process:
                final = self._upload_path(owner_id, digest)
                os.replace(staged, final)
                fsync_dir(final.parent)
        finally:
            staged.unlink(missing_ok=True)
        if not process:
            doc = self._fetch(doc_id)
            if doc.status == DocumentStatus.READY.value:
                self.ensure_tree(doc, self.lm, progress)
            log.info("%s: already stored as document %d (%s)", name, doc_id, doc.status)
            return doc
        return self._process(doc_id, final, progress)

    def _stage_upload(self, owner_id: int, path: Path) -> tuple[Path, str, int]:
        """Copy the upload to a temporary private file, hashing it on the way."""
        directory = self.uploads_dir / str(int(owner_id))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        staged = directory / f".{uuid.uuid4().hex}{UPLOAD_TMP_SUFFIX}"
        digest = hashlib.sha256()
        size = 0
        try:  # 0600 like the trees: a user's PDFs are readable by the server's account only
            with open(path, "rb") as src, os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return staged, digest.hexdigest(), size

    def _upload_path(self, owner_id: int, digest: str) -> Path:
        return self.uploads_dir / str(int(owner_id)) / f"{digest}.pdf"

    def _claim(self, owner_id: int, digest: str, name: str, size: int) -> tuple[int, bool]:
        """(document id, whether this call must process it). Failed documents are retried."""
        for _ in range(3):
            try:
                with self.sessions.begin() as s:
                    doc = s.scalar(select(Document).where(Document.owner_id == owner_id, Document.sha256 == digest))
                    if doc is None:
                        doc = Document(owner_id=owner_id, sha256=digest, name=name, size_bytes=size,
                                       status=DocumentStatus.PENDING.value)
                        s.add(doc)
                        s.flush()
                        return doc.id, True
                    if doc.status != DocumentStatus.FAILED.value:
                        return doc.id, False
                    _clear_derived_rows(s, doc.id)
                    doc.status, doc.error, doc.name = DocumentStatus.PENDING.value, None, name
                    return doc.id, True
            except IntegrityError:  # another request inserted the same (owner, sha256) first
                continue
        raise IngestionError(f"could not claim document {digest[:12]} for user {owner_id}")

    def _process(self, doc_id: int, upload: Path, progress: ProgressFn | None) -> Document:
        stage = "extract"
        try:
            self._set_status(doc_id, DocumentStatus.EXTRACTING)
            extracted = extract_pdf(upload, self.limits, progress)
            if extracted.status != OK:
                upload.unlink(missing_ok=True)  # nothing of an unusable file is kept but its row
                return self._finish(doc_id, extracted.status, extracted.reason, pages=extracted.n_pages)
            stage = "tokenize"
            tokenized = tokenize_pages(self.lm.tokenizer, extracted.pages)
            if not tokenized.token_ids:
                upload.unlink(missing_ok=True)
                return self._finish(doc_id, DocumentStatus.NO_TEXT_LAYER.value, "no text after normalisation",
                                    pages=extracted.n_pages)
            with self.sessions.begin() as s:
                doc = s.get(Document, doc_id)
                _clear_derived_rows(s, doc_id)
                self._add_page_rows(s, doc_id, extracted.pages, tokenized)
                doc.status, doc.pages, doc.tokens = DocumentStatus.ENCODING.value, extracted.n_pages, len(tokenized.token_ids)
            stage = "encode"
            self._encode_and_store(doc_id, tokenized.token_ids, self.lm, progress)
            return self._fetch(doc_id)
        except Exception as exc:
            log.exception("ingestion of document %d failed while %s", doc_id, stage)
            upload.unlink(missing_ok=True)
            return self._finish(doc_id, DocumentStatus.FAILED.value, f"{stage} failed: {type(exc).__name__}: {exc}"[:1000])

    def _add_page_rows(self, s: Session, doc_id: int, pages: list[str], tokenized: Tokenized) -> None:
        s.add_all(Page(document_id=doc_id, number=number, text=text, token_start=start, token_end=end)
                  for number, (text, (start, end)) in enumerate(zip(pages, tokenized.page_spans), 1))
        s.add_all(chunk_rows(doc_id, tokenized, self.lm.config.chunk_len, self._decode))

    def _decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids)

    def _encode_and_store(self, doc_id: int, token_ids: list[int], lm: Any,
                          progress: ProgressFn | None) -> ContextTreeRecord:
        """Encode, write the file atomically, then in one transaction record it and mark ready."""
        encode_progress = (lambda done, total: progress("encode", done, total)) if progress else None
        tree = lm.encode_tree(token_ids, encode_progress)
        tensors = dict(tree.to_tensors())
        tensors[TOKEN_IDS_KEY] = torch.tensor(token_ids, dtype=torch.int32)
        stored = self.tensors.save(doc_id, lm.fingerprint, tensors, metadata={"model": str(getattr(lm, "name", ""))})
        stale: list[str] = []
        try:
            with self.sessions.begin() as s:
                for old in s.scalars(select(ContextTreeRecord).where(ContextTreeRecord.document_id == doc_id)):
                    if old.path != stored.path:
                        stale.append(old.path)
                    s.delete(old)
                s.flush()
                record = ContextTreeRecord(document_id=doc_id, fingerprint=lm.fingerprint, path=stored.path,
                                           sha256=stored.sha256, bytes=stored.bytes, status="ready")
                s.add(record)
                doc = s.get(Document, doc_id)
                doc.status, doc.error = DocumentStatus.READY.value, None
        except BaseException:
            self.tensors.delete(stored.path)
            raise
        for path in stale:  # trees of other models: their chunk layout is gone, so are they
            self.tensors.delete(path)
        log.info("document %d ready: %d tokens, tree %s (%d bytes)", doc_id, len(token_ids), stored.path, stored.bytes)
        return record

    # --- trees ----------------------------------------------------------------------------------
    def ensure_tree(self, document: Document, lm: Any | None = None,
                    progress: ProgressFn | None = None) -> ContextTreeRecord:
        """A verified tree record for `lm`'s fingerprint, re-encoding when missing, damaged or stale."""
        lm = lm or self.lm
        with self.sessions() as s:
            record = s.scalar(select(ContextTreeRecord).where(ContextTreeRecord.document_id == document.id,
                                                              ContextTreeRecord.fingerprint == lm.fingerprint))
            status = s.scalar(select(Document.status).where(Document.id == document.id))
        if status != DocumentStatus.READY.value:
            raise DocumentNotReady(f"document {document.id} is {status}")
        if record is not None:
            try:
                self.tensors.verify(record.path, record.sha256)
                return record
            except TensorStoreError as exc:
                log.warning("document %d: stored tree unusable (%s); re-encoding", document.id, exc)
        else:
            log.info("document %d: no tree for model %s; encoding", document.id, lm.fingerprint[:12])
        return self._reencode(document.id, lm, progress)

    def _reencode(self, doc_id: int, lm: Any, progress: ProgressFn | None) -> ContextTreeRecord:
        """Re-tokenize the stored page texts with `lm` (its tokenizer or chunk length may differ)."""
        with self.sessions.begin() as s:
            pages = [p.text for p in s.scalars(select(Page).where(Page.document_id == doc_id).order_by(Page.number))]
            tokenized = tokenize_pages(lm.tokenizer, pages)
            s.execute(delete(Chunk).where(Chunk.document_id == doc_id))
            for page, (start, end) in zip(s.scalars(select(Page).where(Page.document_id == doc_id).order_by(Page.number)),
                                          tokenized.page_spans):
                page.token_start, page.token_end = start, end
            s.add_all(chunk_rows(doc_id, tokenized, lm.config.chunk_len, lm.tokenizer.decode))
            s.get(Document, doc_id).tokens = len(tokenized.token_ids)
        return self._encode_and_store(doc_id, tokenized.token_ids, lm, progress)

    def load_trees(self, owner_id: int, document_ids: list[int], lm: Any | None = None) -> list[LoadedTree]:
        """The owner's documents' trees, in the order asked, memory-mapped and verified."""
        lm = lm or self.lm
        out = []
        for doc_id in document_ids:
            doc = self.get_document(owner_id, doc_id)
            if doc is None:
                raise DocumentNotFound(f"document {doc_id} not found")
            record = self.ensure_tree(doc, lm)
            try:
                tensors = self.tensors.load(record.path, None)  # verified by ensure_tree just now
            except TensorStoreError:
                record = self._reencode(doc.id, lm, None)
                tensors = self.tensors.load(record.path, record.sha256)
            token_ids = tensors.pop(TOKEN_IDS_KEY)
            out.append(LoadedTree(document=doc, tree=self.tree_factory(tensors), token_ids=token_ids))
        return out

    # --- library --------------------------------------------------------------------------------
    def get_document(self, owner_id: int, doc_id: int) -> Document | None:
        with self.sessions() as s:
            doc = s.scalar(select(Document).where(Document.id == doc_id, Document.owner_id == owner_id))
            if doc is not None:
                s.expunge(doc)
            return doc

    def list_documents(self, owner_id: int) -> list[Document]:
        with self.sessions() as s:
            docs = list(s.scalars(select(Document).where(Document.owner_id == owner_id).order_by(Document.id)))
            s.expunge_all()
            return docs

    def delete_document(self, owner_id: int, doc_id: int) -> bool:
        """Delete the rows (pages, chunks, trees cascade) then the files; False if not the owner's."""
        with self.sessions.begin() as s:
            doc = s.scalar(select(Document).where(Document.id == doc_id, Document.owner_id == owner_id))
            if doc is None:
                return False
            paths = list(s.scalars(select(ContextTreeRecord.path).where(ContextTreeRecord.document_id == doc_id)))
            upload = self._upload_path(owner_id, doc.sha256)
            s.delete(doc)
        for path in paths:
            self.tensors.delete(path)
        upload.unlink(missing_ok=True)
        shutil.rmtree(Path(self.tensors.root) / str(doc_id), ignore_errors=True)
        log.info("deleted document %d of user %d", doc_id, owner_id)
        return True

    # --- recovery -------------------------------------------------------------------------------
    def recover(self, retry: bool = False) -> RecoveryReport:
        """Start-up repair: finish off interrupted ingestions and delete orphan files.

        Rows left in pending/extracting/encoding lose their pages/chunks/trees and become `failed`
        ("interrupted"), or, with retry=True and their upload intact, are ingested again. Must run
        before this process (or any other) starts ingesting: in-flight files look like orphans.
        """
        report = RecoveryReport()
        with self.sessions.begin() as s:
            for doc in s.scalars(select(Document).where(Document.status.in_(ACTIVE_STATUSES))):
                _clear_derived_rows(s, doc.id)
                doc.error = f"interrupted while {doc.status}; upload the file again to retry"
                doc.status = DocumentStatus.FAILED.value
                report.failed_documents.append(doc.id)
        with self.sessions() as s:
            keep = set(s.scalars(select(ContextTreeRecord.path)))
            uploads = {(str(o), f"{h}.pdf") for o, h in s.execute(
                select(Document.owner_id, Document.sha256).where(Document.status == DocumentStatus.READY.value))}
            retry_ids = {d.id: d for d in s.scalars(select(Document).where(Document.id.in_(report.failed_documents)))}
        report.removed_files += self.tensors.cleanup(keep)
        if retry:
            for doc in retry_ids.values():
                upload = self._upload_path(doc.owner_id, doc.sha256)
                if upload.is_file():
                    uploads.add((str(doc.owner_id), upload.name))
        report.removed_files += self._clean_uploads(uploads)
        if retry:
            for doc_id, doc in retry_ids.items():
                upload = self._upload_path(doc.owner_id, doc.sha256)
                if upload.is_file() and self._claim(doc.owner_id, doc.sha256, doc.name, doc.size_bytes)[1]:
                    self._process(doc_id, upload, None)
                    report.retried_documents.append(doc_id)
        if report.failed_documents or report.removed_files:
            log.warning("recovery: %d interrupted document(s), %d file(s) removed",
                        len(report.failed_documents), len(report.removed_files))
        return report

    def _clean_uploads(self, keep: set[tuple[str, str]]) -> list[str]:
        removed = []
        if not self.uploads_dir.exists():
            return removed
        for file in sorted(self.uploads_dir.glob("*/*")):
            if file.is_file() and (file.parent.name, file.name) not in keep:
                file.unlink(missing_ok=True)
                removed.append(f"uploads/{file.parent.name}/{file.name}")
        return removed

    # --- helpers --------------------------------------------------------------------------------
    def _set_status(self, doc_id: int, status: DocumentStatus) -> None:
        with self.sessions.begin() as s:
            s.get(Document, doc_id).status = status.value

    def _finish(self, doc_id: int, status: str, reason: str | None, pages: int = 0) -> Document:
        with self.sessions.begin() as s:
            _clear_derived_rows(s, doc_id)
            doc = s.get(Document, doc_id)
            doc.status, doc.error, doc.pages, doc.tokens = status, reason, pages, 0
        log.info("document %d: %s (%s)", doc_id, status, reason)
        return self._fetch(doc_id)

    def _fetch(self, doc_id: int) -> Document:
        with self.sessions() as s:
            doc = s.get(Document, doc_id)
            s.expunge(doc)
            return doc


def _clear_derived_rows(s: Session, doc_id: int) -> None:
    """Remove what an ingestion derives from the file (tree rows only when the caller handles files)."""
    s.execute(delete(Page).where(Page.document_id == doc_id))
    s.execute(delete(Chunk).where(Chunk.document_id == doc_id))
    s.execute(delete(ContextTreeRecord).where(ContextTreeRecord.document_id == doc_id))
