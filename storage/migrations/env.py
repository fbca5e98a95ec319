"""Alembic environment, driven programmatically by `storage.db.upgrade` (no alembic.ini needed).

Batch mode is on for SQLite: it cannot ALTER most things in place, so Alembic copies the table.
"""

from alembic import context
from sqlalchemy import Engine

from storage.base import Base
from storage import models  # noqa: F401  (registers the tables on Base.metadata)

config = context.config
target_metadata = Base.metadata


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from storage.db import make_engine

    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    return make_engine(url)


def run_migrations_offline() -> None:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
