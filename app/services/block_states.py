"""Persisted ActQKV states: each document's block K/V, loaded or built on first use.

A document's state depends on the model (checkpoint, compute dtype), the ActQKV knobs and the text
around the document in the prompt (`engines.actqkv_layout`): all of it is in the fingerprint, so a
state is used only by the configuration that made it. A digest of what the stream is made from (the
header, the document's name and page texts) is compared before use (a renamed document has another
"Document: name" line), and a file that fails verification is dropped and re-encoded
(`DerivedStateStore`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.services.derived_state import DerivedStateStore
from app.services.documents import DocumentContext
from app.services.engines import actqkv_layout, document_stream, stream_digest
from storage import TensorStore

logger = logging.getLogger(__name__)

STATE_KEY = "actqkv"  # where a loaded state sits in DocumentContext.extra
DIGEST_KEY = "source_digest"  # sha256 of what the stream was made from (engines.stream_digest)


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
        from model.block_state import BlockState

        fingerprint = self.fingerprint(lm)
        encoded = 0
        for doc in docs:
            digest = stream_digest(lm, doc)
            state = None
            tensors = self._store.load(doc.id, fingerprint)
            if tensors is not None:
                if bytes(tensors.get(DIGEST_KEY, torch.zeros(0, dtype=torch.uint8)).tolist()).hex() == digest:
                    state = BlockState.from_tensors(tensors, lm.actqkv)
                else:
                    logger.info("actqkv state of document %s was made from other text: re-encoding", doc.id)
                    self._store.drop(doc.id, fingerprint)
            if state is None:
                state = self._encode(lm, doc, digest, fingerprint, progress)
                encoded += 1
            doc.extra[STATE_KEY] = state
        return encoded

    def _encode(self, lm: Any, doc: DocumentContext, digest: str, fingerprint: str,
                progress: Callable[[str, int, int], None] | None) -> Any:
        t0 = time.perf_counter()
        ids, offset = document_stream(lm, doc)
        report = (lambda done, total: progress("actqkv", done, total)) if progress else None
        state = lm.encode_blocks(ids, offset, report)
        seconds = time.perf_counter() - t0
        metadata = {"kind": "actqkv", "config": json.dumps(lm.actqkv.to_dict(), sort_keys=True)}
        tensors = {**state.to_tensors(), DIGEST_KEY: torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)}
        written = self._store.save(doc.id, fingerprint, tensors, metadata)
        logger.info("document %s: actqkv state of %d tokens encoded in %.1f s (%.0f tokens/s, %d bytes, "
                    "%.0f bytes per token)", doc.id, len(ids), seconds, len(ids) / max(seconds, 1e-9), written,
                    written / max(1, len(ids)))
        return state
