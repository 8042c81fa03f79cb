"""Alembic environment. The URL comes from the caller (``doppel db upgrade`` sets it on the config),
or from DOPPEL_DATABASE_URL when the ``alembic`` command is run by hand."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import pool

from feedback.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    url = os.environ.get("DOPPEL_DATABASE_URL")
    if url:
        return url
    data_dir = os.environ.get("DOPPEL_DATA_DIR", "doppel-data")
    return f"sqlite:///{os.path.join(data_dir, 'doppel.db')}"


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        from sqlalchemy import create_engine

        engine = create_engine(_url(), poolclass=pool.NullPool)
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
