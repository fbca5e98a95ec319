"""The app's door to ingestion (`app.ingestion.IngestionService`, owned by the store work): size
limits, timing, plain-dict results, and the model loaded only when a file really needs encoding."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from app.services.documents import document_dict
from app.services.errors import BadRequest

logger = logging.getLogger(__name__)


def rejected(name: str, reason: str) -> dict[str, Any]:
    """The outcome of a file refused before anything was stored (too large, not a PDF, missing)."""
    return {"id": None, "name": name, "pages": 0, "tokens": 0, "status": "rejected", "error": reason,
            "seconds": 0.0}


class Ingestion:
    def __init__(self, ctx: Any):
        self._ctx = ctx
        self._service: Any | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> Any:
        from app.ingestion import IngestionService

        with self._lock:
            if self._service is None:
                self._service = IngestionService(
                    self._ctx.sessions,
                    self._ctx.tensors,
                    self._ctx.model(),
                    uploads_dir=self._ctx.settings.uploads_dir,
                )
            return self._service

    def check_file(self, path: Path, name: str | None = None) -> None:
        """Cheap checks before anything is copied: exists, within the upload limit, looks like a PDF."""
        name = name or path.name
        if not path.is_file():
            raise BadRequest(f"{name}: file not found")
        size = path.stat().st_size
        limit = self._ctx.settings.max_upload_bytes
        if size > limit:
            raise BadRequest(f"{name}: {size / 2**20:.1f} MB is over the {limit // 2**20} MB upload limit")
        if not name.lower().endswith(".pdf"):
            raise BadRequest(f"{name}: only PDF files are accepted")

    def ingest_path(
        self, owner_id: int, path: Path | str, name: str | None = None, progress: Any | None = None
    ) -> dict[str, Any]:
        """Ingest one PDF for owner_id; returns the document as a dict plus `seconds`.

        Unusable files come back with their status (needs_password, no_text_layer, failed) and error.
        """
        path = Path(path)
        name = name or path.name
        self.check_file(path, name)
        started = time.perf_counter()
        doc = self.service.ingest(owner_id, path, name=name, progress=progress)
        info = document_dict(doc)
        if info["status"] == "ready" and self._ctx.settings.engine == "full":
            self._warm_full_prompt(owner_id, info["id"], progress)
        info["seconds"] = round(time.perf_counter() - started, 3)
        return info

    def _warm_full_prompt(self, owner_id: int, document_id: int, progress: Any | None) -> None:
        """The default engine `full` reads the whole document: its prompt prefix is prefilled once here
        (the document is already `ready`), not on the first question. A failure only costs that question."""
        if progress:
            progress("prompt", 0, 1)
        try:
            self._ctx.qa.warm_prompt_cache(owner_id, document_id, "full")
        except Exception:
            logger.exception("could not prepare the full-text prompt cache of document %s", document_id)
        if progress:
            progress("prompt", 1, 1)

    def ensure_tree(self, owner_id: int, document_id: int) -> None:
        """Re-encode a ready document whose tree is missing, damaged or from another model."""
        service = self.service
        doc = service.get_document(owner_id, document_id)
        if doc is not None:
            service.ensure_tree(doc)

    def recover(self) -> Any:
        """Start-up repair of interrupted ingestions (before any new ingestion starts)."""
        return self.service.recover()
