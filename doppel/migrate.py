"""Schema management through Alembic: upgrade, and the check that refuses a database that is behind
or ahead of the code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

import migrations
from common.errors import DatabaseError
from feedback.models import Base


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # The URL is passed through the connection, never rendered into a config string (it may hold a password).
    return cfg


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the schema; returns (revision before, revision after)."""
    before = current_revision(engine)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current_revision(engine)


def drift(engine: Engine) -> list[object]:
    """Differences between the models and the database (empty when in sync)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def ensure_current(engine: Engine) -> None:
    """Refuse to run on a database whose schema is behind or ahead of the code.

    Raises:
        DatabaseError: with the command that fixes it.
    """
    script = ScriptDirectory.from_config(alembic_config(engine))
    head = script.get_current_head()
    current = current_revision(engine)
    if current == head:
        return
    if current is None:
        raise DatabaseError(
            "The database has no Doppel schema yet.", hint="Run `doppel db upgrade` to create it."
        )
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise DatabaseError(
            f"The database schema ({current}) is newer than this version of Doppel knows (head {head}).",
            hint="Upgrade Doppel (pip install -U doppel), or point DOPPEL_DATABASE_URL at another database.",
        )
    raise DatabaseError(
        f"The database schema ({current}) is behind the code ({head}).",
        hint="Run `doppel db upgrade` (back up the database first if it holds data you care about).",
    )
