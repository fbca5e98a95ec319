"""Engines, sessions and schema upgrades from one SQLAlchemy URL (SQLite or PostgreSQL).

SQLite is tuned per connection through a `connect` event, because PRAGMAs are per connection:
WAL lets readers run while one writer commits, `busy_timeout` makes a writer wait for the lock
instead of failing with "database is locked", and foreign keys are off by default in SQLite.
Nothing here creates tables: the schema belongs to Alembic (`upgrade`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def sqlite_url(data_dir: Path | str) -> str:
    """The default database URL: `sqlite:///<data_dir>/sharedllm.db` (absolute path)."""
    return f"sqlite:///{(Path(data_dir) / 'sharedllm.db').resolve()}"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; for a SQLite file URL also create its directory and apply the PRAGMAs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = kwargs.pop("connect_args", {})
        # The pool hands connections to other threads; SQLite's own locking keeps that safe.
        connect_args.setdefault("check_same_thread", False)
        # Python's sqlite3 has its own 5 s busy wait; keep it in line with the PRAGMA.
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine_or_url: Engine | str) -> sessionmaker[Session]:
    """A session factory; objects stay readable after commit so services can return them."""
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(url: str, engine: Engine | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option: URLs may contain '%' (configparser interpolation).
    config.attributes["url"] = url
    config.attributes["engine"] = engine
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Bring the schema at `url_or_engine` to `revision` (creates the SQLite file if needed)."""
    from alembic import command

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        command.upgrade(_alembic_config(str(engine.url), engine), revision)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()
    log.info("database schema at %s", revision)


def downgrade(url_or_engine: str | Engine, revision: str) -> None:
    """Take the schema back to `revision` ("base" drops every table)."""
    from alembic import command

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        command.downgrade(_alembic_config(str(engine.url), engine), revision)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def integrity_check(engine: Engine) -> str:
    """SQLite's `PRAGMA integrity_check` ("ok" when healthy); "ok" on other backends."""
    if engine.dialect.name != "sqlite":
        return "ok"
    with engine.connect() as conn:
        rows = conn.execute(text("PRAGMA integrity_check")).scalars().all()
    return "\n".join(str(r) for r in rows)
