"""Schema, engine settings and concurrency on SQLite; the same schema on a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from storage import (
    Base,
    Chunk,
    ContextTreeRecord,
    Conversation,
    Document,
    Message,
    Page,
    User,
    make_engine,
    make_session_factory,
    upgrade,
)
from storage.db import current_revision, downgrade, integrity_check, sqlite_url

TABLES = {"users", "documents", "pages", "chunks", "context_trees", "conversations", "messages"}


def test_import_creates_nothing(tmp_path):
    code = (f"import storage, storage.db, storage.models, storage.tensors; import os; "
            f"assert not os.path.exists({str(tmp_path / 'x.db')!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    engine = make_engine(sqlite_url(tmp_path))
    assert inspect(engine).get_table_names() == []


def test_migrations_up_down_up_and_match_models(tmp_path):
    url = sqlite_url(tmp_path / "d")
    upgrade(url)
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES and current_revision(engine) == "0002"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(url)
    assert integrity_check(engine) == "ok"


def test_sqlite_pragmas(sqlite_engine):
    with sqlite_engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000


def _document(owner_id: int, sha: str = "a" * 64, **kw) -> Document:
    return Document(owner_id=owner_id, sha256=sha, name="x.pdf", **kw)


def _crud(sessions) -> None:
    """Constraints and cascades that every backend must enforce."""
    with sessions.begin() as s:
        user = User(username="alice")
        s.add(user)
        s.flush()
        doc = _document(user.id)
        s.add(doc)
        s.flush()
        s.add_all([Page(document_id=doc.id, number=1, text="p", token_start=0, token_end=3),
                   Chunk(document_id=doc.id, index=0, token_start=0, token_end=3, page_start=1, page_end=1, text="p"),
                   ContextTreeRecord(document_id=doc.id, fingerprint="f", path="1/f.safetensors", sha256="b" * 64,
                                     bytes=10)])
        conv = Conversation(owner_id=user.id, title="t", document_ids=[doc.id])
        s.add(conv)
        s.flush()
        s.add(Message(conversation_id=conv.id, role="assistant", text="hi",
                      citations=[{"document": doc.id, "page": 1, "text": "p"}], timings={"total_s": 1.5}))
        user_id, doc_id = user.id, doc.id
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(_document(user_id))  # same (owner, sha256)
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(_document(user_id, sha="c" * 64, status="bogus"))
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Page(document_id=doc_id + 999, number=1, text="", token_start=0, token_end=0))  # no such document
    with sessions() as s:
        message = s.scalar(select(Message))
        assert message.citations[0]["page"] == 1 and message.timings == {"total_s": 1.5}
        assert s.scalar(select(Conversation)).document_ids == [doc_id]
    with sessions.begin() as s:  # delete through the database, not the ORM: FKs must cascade
        s.execute(text("DELETE FROM users"))
    with sessions() as s:
        for table in (Document, Page, Chunk, ContextTreeRecord, Conversation, Message):
            assert s.scalar(select(func.count()).select_from(table)) == 0


def test_constraints_and_cascades_sqlite(sqlite_sessions):
    _crud(sqlite_sessions)


def test_postgres_migrations_and_constraints(postgres_url):
    engine = make_engine(postgres_url)
    try:
        downgrade(engine, "base")
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES and current_revision(engine) == "0002"
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        _crud(make_session_factory(engine))
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_twenty_concurrent_readers_and_writers(tmp_path):
    """10 writer and 10 reader threads on one SQLite file, each with its own sessions."""
    url = sqlite_url(tmp_path / "d")
    upgrade(url)
    engine = make_engine(url, pool_size=20, max_overflow=0)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        s.add(User(username="owner"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(30):
            with sessions.begin() as s:
                owner = s.scalar(select(User).where(User.username == "owner"))
                doc = Document(owner_id=owner.id, sha256=f"{n:02d}{i:062d}", name=f"{n}-{i}.pdf")
                s.add(doc)
                s.flush()
                s.add(Page(document_id=doc.id, number=1, text="x" * 200, token_start=0, token_end=1))
                doc.status = "ready"

    def reader(_: int) -> None:
        barrier.wait()
        for _ in range(60):
            with sessions() as s:
                s.scalar(select(func.count()).select_from(Document))
                list(s.scalars(select(Page).limit(20)))

    def guarded(fn, n):
        try:
            fn(n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(writer if n % 2 else reader, n)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 10 * 30
    assert integrity_check(engine) == "ok"
    engine.dispose()
