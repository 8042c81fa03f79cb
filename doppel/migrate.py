"""Schema management through Alembic: upgrade, and the check that refuses a database that is behind
or ahead of the code.

Every command checks the schema first. A database at the head takes a fast path: one SELECT and the
revision lines of the migration files, without importing Alembic (its import, with mako and pygments,
took 0.13 s of a 4-second rebuild of the training set). Anything else takes Alembic's own answer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

import migrations
from common.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

_REVISION = re.compile(r"^(down_revision|revision)[ \t]*(?::[^=\n]*)?=[ \t]*(?:['\"]([^'\"\n]+)['\"]|(None))[ \t]*$", re.M)


def head_from_files() -> str | None:
    """The head revision read from the migration files' ``revision = '...'`` lines, or None where they do
    not name exactly one head plainly (a merge, a tuple, an unreadable file): then only Alembic answers.
    The files are those Alembic reads: ``*.py``, not ``__init__`` nor an editor's ``.#`` lock."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        if path.name.startswith((".", "__")):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        found: dict[str, str | None] = {}
        for m in _REVISION.finditer(source):
            if m.group(1) in found:
                return None  # named twice: not plain
            found[m.group(1)] = m.group(2)
            if m.group(1) == "revision" and m.group(2) is None:
                return None
        if "revision" not in found or "down_revision" not in found:
            return None
        revisions.add(str(found["revision"]))
        if found["down_revision"] is not None:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # The URL is passed through the connection, never rendered into a config string (it may hold a password).
    return cfg


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the schema; returns (revision before, revision after)."""
    from alembic import command

    before = current_revision(engine)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current_revision(engine)


def drift(engine: Engine) -> list[object]:
    """Differences between the models and the database (empty when in sync)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from feedback.models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def ensure_current(engine: Engine) -> None:
    """Refuse to run on a database whose schema is behind or ahead of the code.

    Raises:
        DatabaseError: with the command that fixes it.
    """
    head = head_from_files()
    if head is not None:
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        except SQLAlchemyError:
            rows = []  # no table yet (or unreadable): Alembic says which
        if rows == [head]:
            return
    from alembic.script import ScriptDirectory

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
