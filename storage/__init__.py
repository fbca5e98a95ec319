"""Persistence: SQLAlchemy models and sessions, Alembic migrations, the tensor store.

Importing this package creates no tables and opens no connection; the schema is created by
`storage.db.upgrade(url)` (Alembic), never at import.
"""

from storage.base import Base
from storage.db import integrity_check, make_engine, make_session_factory, sqlite_url, upgrade
from storage.models import (
    ACTIVE_STATUSES,
    DOCUMENT_STATUSES,
    Chunk,
    ContextTreeRecord,
    Conversation,
    Document,
    DocumentStatus,
    Message,
    Page,
    User,
)
from storage.tensors import (
    StoredTensors,
    TensorChecksumMismatch,
    TensorFileMissing,
    TensorFileTruncated,
    TensorStore,
    TensorStoreError,
)

__all__ = [
    "ACTIVE_STATUSES",
    "Base",
    "Chunk",
    "ContextTreeRecord",
    "Conversation",
    "DOCUMENT_STATUSES",
    "Document",
    "DocumentStatus",
    "Message",
    "Page",
    "StoredTensors",
    "TensorChecksumMismatch",
    "TensorFileMissing",
    "TensorFileTruncated",
    "TensorStore",
    "TensorStoreError",
    "User",
    "integrity_check",
    "make_engine",
    "make_session_factory",
    "sqlite_url",
    "upgrade",
]
