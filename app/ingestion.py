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
import time
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
from app.services.derived_state import is_derived_state
from app.services.documents import TOKEN_IDS_KEY, document_dict
from app.services.errors import BadRequest, NotFound, NotReady, ServiceError
from app.services.language_model import LanguageModel
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

ProgressFn = Callable[[str, int, int], None]  # (stage "extract" | "encode" | "prompt", done, total)
PAGE_SEPARATOR = "\n\n"
UPLOAD_TMP_SUFFIX = ".tmp"


class IngestionError(ServiceError):
    """The upload could not be claimed (bad files are statuses, not exceptions)."""


def rejected(name: str, reason: str) -> dict[str, Any]:
    """The outcome of a file refused before anything was stored (too large, not a PDF, missing)."""
    return {"id": None, "name": name, "pages": 0, "tokens": 0, "status": "rejected", "error": reason,
            "seconds": 0.0}


@dataclass
class RecoveryReport:
    failed_documents: list[int] = field(default_factory=list)
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


class IngestionService:
    """Turns PDFs into stored documents with the app's model; safe to share between threads."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        tensor_store: TensorStore,
        model: Callable[[], LanguageModel],
        *,
        uploads_dir: Path,
        limits: ExtractionLimits,
        on_ready: Callable[[int, int, ProgressFn | None], None] | None = None,
        encode_trees: bool = True,
    ) -> None:
        """`model` returns the loaded model (loading it on first use: a rejected file costs no model);
        `limits` come from `Settings.extraction_limits()` (one upload limit everywhere); `on_ready`
        runs after a document became ready (the app warms its engine's state there). `encode_trees`:
        encode the SharedLLM context tree before the document is ready; the app sets it only when
        `sharedllm` is its engine, otherwise a tree is built on the first `sharedllm` question (the
        library's repair path), so a library does not pay for an engine it never uses."""
        self.sessions = session_factory
        self.tensors = tensor_store
        self._model = model
        self.uploads_dir = Path(uploads_dir)
        self.limits = limits
        self._on_ready = on_ready
        self.encode_trees = encode_trees

    @property
    def lm(self) -> LanguageModel:
        return self._model()

    def check_file(self, path: Path, name: str | None = None) -> None:
        """Cheap checks before anything is copied: exists, within the upload limit, looks like a PDF."""
        name = name or path.name
        if not path.is_file():
            raise BadRequest(f"{name}: file not found")
        size, limit = path.stat().st_size, self.limits.max_file_bytes
        if size > limit:
            raise BadRequest(f"{name}: {size / 2**20:.1f} MB is over the {limit // 2**20} MB upload limit")
        if not name.lower().endswith(".pdf"):
            raise BadRequest(f"{name}: only PDF files are accepted")

    def ingest_path(self, owner_id: int, path: Path | str, name: str | None = None,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
        """Ingest one PDF for owner_id; returns the document as a dict plus `seconds`. BadRequest for a
        file refused before anything is stored; unusable files come back with their status and error."""
        path = Path(path)
        name = name or path.name
        self.check_file(path, name)
        started = time.perf_counter()
        info = document_dict(self.ingest(owner_id, path, name=name, progress=progress))
        if info["status"] == DocumentStatus.READY.value and self._on_ready is not None:
            self._on_ready(owner_id, info["id"], progress)
        info["seconds"] = round(time.perf_counter() - started, 3)
        return info

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
                self._ensure_tree(doc.id, self.lm, progress)
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
        lm = self.lm
        try:
            self._set_status(doc_id, DocumentStatus.EXTRACTING)
            extracted = extract_pdf(upload, self.limits, progress)
            if extracted.status != OK:
                upload.unlink(missing_ok=True)  # nothing of an unusable file is kept but its row
                return self._finish(doc_id, extracted.status, extracted.reason, pages=extracted.n_pages)
            stage = "tokenize"
            tokenized = tokenize_pages(lm.tokenizer, extracted.pages)
            if not tokenized.token_ids:
                upload.unlink(missing_ok=True)
                return self._finish(doc_id, DocumentStatus.NO_TEXT_LAYER.value, "no text after normalisation",
                                    pages=extracted.n_pages)
            with self.sessions.begin() as s:
                doc = s.get(Document, doc_id)
                _clear_derived_rows(s, doc_id)
                self._add_page_rows(s, doc_id, extracted.pages, tokenized, lm)
                doc.pages, doc.tokens = extracted.n_pages, len(tokenized.token_ids)
                doc.status = (DocumentStatus.ENCODING if self.encode_trees else DocumentStatus.READY).value
            if self.encode_trees:
                stage = "encode"
                self._encode_and_store(doc_id, tokenized.token_ids, lm, progress)
            return self._fetch(doc_id)
        except Exception as exc:
            log.exception("ingestion of document %d failed while %s", doc_id, stage)
            upload.unlink(missing_ok=True)
            return self._finish(doc_id, DocumentStatus.FAILED.value, f"{stage} failed: {type(exc).__name__}: {exc}"[:1000])

    @staticmethod
    def _add_page_rows(s: Session, doc_id: int, pages: list[str], tokenized: Tokenized, lm: LanguageModel) -> None:
        s.add_all(Page(document_id=doc_id, number=number, text=text, token_start=start, token_end=end)
                  for number, (text, (start, end)) in enumerate(zip(pages, tokenized.page_spans), 1))
        s.add_all(chunk_rows(doc_id, tokenized, lm.config.chunk_len, lm.tokenizer.decode))

    def _encode_and_store(self, doc_id: int, token_ids: list[int], lm: LanguageModel,
                          progress: ProgressFn | None) -> ContextTreeRecord:
        """Encode, write the file atomically, then in one transaction record it and mark ready."""
        encode_progress = (lambda done, total: progress("encode", done, total)) if progress else None
        if encode_progress:  # the bar says "encoding" from the start, not "reading text" until the first chunk
            encode_progress(0, 1)
        tree = lm.encode_tree(token_ids, encode_progress)
        tensors = dict(tree.to_tensors())
        tensors[TOKEN_IDS_KEY] = torch.tensor(token_ids, dtype=torch.int32)
        stored = self.tensors.save(doc_id, lm.fingerprint, tensors, metadata={"model": lm.name})
        stale: list[str] = []
        try:
            with self.sessions.begin() as s:
                for old in s.scalars(select(ContextTreeRecord).where(ContextTreeRecord.document_id == doc_id)):
                    if is_derived_state(old.fingerprint):  # prompt caches, actqkv states: checked on use
                        continue
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
    def ensure_tree(self, owner_id: int, document_id: int) -> None:
        """Re-encode the owner's ready document whose tree is missing, damaged or from another model
        (the library calls it when a stored tree cannot be used)."""
        with self.sessions() as s:
            found = s.scalar(select(Document.id).where(Document.id == document_id, Document.owner_id == owner_id))
        if found is None:
            raise NotFound(f"document {document_id} not found")
        self._ensure_tree(document_id, self.lm, None)

    def _ensure_tree(self, doc_id: int, lm: LanguageModel, progress: ProgressFn | None) -> ContextTreeRecord:
        """A verified tree record for `lm`'s fingerprint, re-encoding when missing, damaged or stale."""
        with self.sessions() as s:
            record = s.scalar(select(ContextTreeRecord).where(ContextTreeRecord.document_id == doc_id,
                                                              ContextTreeRecord.fingerprint == lm.fingerprint))
            status = s.scalar(select(Document.status).where(Document.id == doc_id))
        if status != DocumentStatus.READY.value:
            raise NotReady(f"document {doc_id} is {status}")
        if record is not None:
            try:
                self.tensors.verify(record.path, record.sha256)
                return record
            except TensorStoreError as exc:
                log.warning("document %d: stored tree unusable (%s); re-encoding", doc_id, exc)
        else:
            log.info("document %d: no tree for model %s; encoding", doc_id, lm.fingerprint[:12])
        return self._reencode(doc_id, lm, progress)

    def _reencode(self, doc_id: int, lm: LanguageModel, progress: ProgressFn | None) -> ContextTreeRecord:
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

    # --- recovery -------------------------------------------------------------------------------
    def recover(self) -> RecoveryReport:
        """Start-up repair: finish off interrupted ingestions and delete orphan files.

        Rows left in pending/extracting/encoding lose their pages/chunks/trees and become `failed`
        ("interrupted"; uploading the file again retries it). Must run before this process (or any
        other) starts ingesting: in-flight files look like orphans.
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
        report.removed_files += self.tensors.cleanup(keep)
        report.removed_files += self._clean_uploads(uploads)
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
