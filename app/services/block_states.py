"""Persisted ActQKV states: each document's block K/V, loaded or built on first use.

A document's state depends on the model (checkpoint, compute dtype), the ActQKV knobs and the text
around the document in the prompt (`engines.actqkv_layout`): all of it is in the fingerprint, so a
state is used only by the configuration that made it. The stored stream's token ids are compared
with the expected stream before use (a renamed document has another "Document: name" line), and a
file that fails verification is dropped and re-encoded (`DerivedStateStore`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.services.derived_state import DerivedStateStore
from app.services.documents import DocumentContext
from app.services.engines import actqkv_layout, document_stream
from storage import TensorStore

logger = logging.getLogger(__name__)

STATE_KEY = "actqkv"  # where a loaded state sits in DocumentContext.extra


class BlockStateService:
    def __init__(self, sessions: sessionmaker[Session], tensors: TensorStore) -> None:
        self._store = DerivedStateStore(sessions, tensors)

    def fingerprint(self, lm: Any) -> str:
        return lm.actqkv_fingerprint(actqkv_layout(lm))

    def has(self, lm: Any, document_id: int) -> bool:
        return self._store.has(document_id, self.fingerprint(lm))

    def ensure(self, lm: Any, docs: list[DocumentContext],
               progress: Callable[[str, int, int], None] | None = None) -> int:
        """Attaches each document's state (loaded, or encoded and persisted); returns how many were
        encoded. `progress("actqkv", done, total)` reports execution blocks while encoding."""
        from model.actqkv import BlockState

        fingerprint = self.fingerprint(lm)
        encoded = 0
        for doc in docs:
            ids, offset = document_stream(lm, doc)
            state = None
            tensors = self._store.load(doc.id, fingerprint)
            if tensors is not None:
                state = BlockState.from_tensors(tensors, lm.actqkv)
                if state.token_ids != ids:
                    logger.info("actqkv state of document %s was made from other text: re-encoding", doc.id)
                    self._store.drop(doc.id, fingerprint)
                    state = None
            if state is None:
                state = self._encode(lm, doc, ids, offset, fingerprint, progress)
                encoded += 1
            doc.extra[STATE_KEY] = state
        return encoded

    def _encode(self, lm: Any, doc: DocumentContext, ids: list[int], offset: int, fingerprint: str,
                progress: Callable[[str, int, int], None] | None) -> Any:
        t0 = time.perf_counter()
        report = (lambda done, total: progress("actqkv", done, total)) if progress else None
        state = lm.encode_blocks(ids, offset, report)
        seconds = time.perf_counter() - t0
        metadata = {"kind": "actqkv", "config": json.dumps(lm.actqkv.to_dict(), sort_keys=True)}
        written = self._store.save(doc.id, fingerprint, state.to_tensors(), metadata)
        logger.info("document %s: actqkv state of %d tokens encoded in %.1f s (%.0f tokens/s, %d bytes, "
                    "%.0f bytes per token)", doc.id, len(ids), seconds, len(ids) / max(seconds, 1e-9), written,
                    written / max(1, len(ids)))
        return state
