"""Per-document tensor files derived from a document by a model (prompt caches, ActQKV block states,
HOMER leaves).

One safetensors file per (document, fingerprint) in the tensor store, recorded in the same
`context_trees` table as the trees: written to a temporary name, fsynced and renamed by the store,
the row (with its sha256) added only after the rename, memory-mapped and verified when read. A file
that fails verification is dropped (row and file) so the caller recomputes it; a row whose document
was deleted meanwhile takes its new file with it. The rows cascade with their document.
"""

from __future__ import annotations

import logging

import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import ContextTreeRecord, TensorStore, TensorStoreError

logger = logging.getLogger(__name__)

# fingerprints of derived states (not trees): each checks its own validity (token ids, source digest),
# so re-encoding a document's tree leaves them alone
DERIVED_PREFIXES = ("prompt-", "actqkv-", "homer-")


def is_derived_state(fingerprint: str) -> bool:
    return fingerprint.startswith(DERIVED_PREFIXES)


class DerivedStateStore:
    def __init__(self, sessions: sessionmaker[Session], tensors: TensorStore) -> None:
        self._sessions = sessions
        self._tensors = tensors

    def has(self, document_id: int, fingerprint: str) -> bool:
        with self._sessions() as session:
            return self._record(session, document_id, fingerprint) is not None

    def load(self, document_id: int, fingerprint: str) -> dict[str, torch.Tensor] | None:
        """The verified, memory-mapped tensors, or None when missing or damaged (then dropped)."""
        with self._sessions() as session:
            record = self._record(session, document_id, fingerprint)
            if record is None:
                return None
            path, sha256 = record.path, record.sha256
        try:
            return self._tensors.load(path, sha256)
        except TensorStoreError as exc:
            logger.warning("stored state %s unusable (%s): recomputing it", path, exc)
            self.drop(document_id, fingerprint)
            return None

    def save(self, document_id: int, fingerprint: str, tensors: dict[str, torch.Tensor],
             metadata: dict[str, str]) -> int:
        """Persists the tensors unless a concurrent request stored them first; returns bytes written."""
        with self._sessions() as session:
            if self._record(session, document_id, fingerprint) is not None:
                return 0
        stored = self._tensors.save(document_id, fingerprint, tensors, metadata=metadata)
        try:
            with self._sessions.begin() as session:
                if self._record(session, document_id, fingerprint) is not None:  # another request won:
                    return 0  # same (document, fingerprint), same path: its row names this file
                session.add(ContextTreeRecord(document_id=document_id, fingerprint=fingerprint, path=stored.path,
                                              sha256=stored.sha256, bytes=stored.bytes, status="ready"))
        except IntegrityError:  # the document was deleted meanwhile, or a concurrent insert won
            if not self.has(document_id, fingerprint):
                self._tensors.delete(stored.path)
            return 0
        return stored.bytes

    def drop(self, document_id: int, fingerprint: str) -> None:
        with self._sessions.begin() as session:
            record = self._record(session, document_id, fingerprint)
            if record is None:
                return
            path = record.path
            session.delete(record)
        self._tensors.delete(path)

    @staticmethod
    def _record(session: Session, document_id: int, fingerprint: str) -> ContextTreeRecord | None:
        return session.scalar(select(ContextTreeRecord).where(
            ContextTreeRecord.document_id == document_id, ContextTreeRecord.fingerprint == fingerprint))
