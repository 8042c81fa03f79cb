"""The adapter registry: versioned adapters in ``<adapters_dir>/v<N>/``, one row each in the
``adapters`` table, and the active one named in ``<adapters_dir>/ACTIVE`` (written atomically; the
serving agent reads it before each request, see ``agent/adapters.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters import POINTER
from common.errors import InputError, NotFoundError
from feedback.models import Adapter, utcnow
from knowledge.facts import write_atomic


def version_name(version: int) -> str:
    return f"v{version}"


class Registry:
    def __init__(self, adapters_dir: Path, sessions: sessionmaker[Session]) -> None:
        self.dir = Path(adapters_dir)
        self.sessions = sessions

    def staging_dir(self, run_id: int) -> Path:
        """Where run ``run_id`` writes before it is registered (its checkpoints live here too)."""
        return self.dir / ".staging" / f"run-{run_id}"

    def active_version(self) -> int | None:
        pointer = self.dir / POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None

    def active_path(self) -> Path | None:
        v = self.active_version()
        return self.dir / version_name(v) if v is not None else None

    def register(self, adapter_dir: Path, *, status: str, reason: str, metrics: dict[str, Any],
                 fingerprint: str | None, config: dict[str, Any]) -> Adapter:
        """Move a finished adapter into the registry as the next version. Nothing is registered
        unless the move succeeded: the folder appears whole, then the row."""
        with self.sessions.begin() as session:
            version = (session.scalar(select(func.max(Adapter.version))) or 0) + 1
            target = self.dir / version_name(version)
            (adapter_dir / "doppel.json").write_text(json.dumps(
                {"version": version, "config": config, "metrics": metrics, "dataset_fingerprint": fingerprint},
                indent=2, default=str), encoding="utf-8")
            self.dir.mkdir(parents=True, exist_ok=True)
            adapter_dir.rename(target)
            try:
                row = Adapter(version=version, path=str(target), status=status, reason=reason,
                              dataset_fingerprint=fingerprint, metrics=metrics)
                session.add(row)
                session.flush()
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            session.expunge(row)
        if status == "active":
            self.activate(version)
        return row

    def activate(self, version: int) -> Adapter:
        with self.sessions.begin() as session:
            row = session.scalar(select(Adapter).where(Adapter.version == version))
            if row is None:
                raise NotFoundError(f"No adapter v{version}.", hint="See `doppel adapters list`.")
            if not (Path(row.path) / "adapter_config.json").is_file():
                raise InputError(f"The files of adapter v{version} are missing at {row.path}.")
            for other in session.scalars(select(Adapter).where(Adapter.status == "active", Adapter.version != version)):
                other.status = "retired"
            row.status = "active"
            metrics = dict(row.metrics or {})
            metrics["activated_at"] = utcnow().isoformat()
            row.metrics = metrics
            # the pointer last: if it fails, the transaction rolls back and nothing changed
            write_atomic(self.dir / POINTER, f"{version_name(version)}\n".encode())
            session.flush()
            session.expunge(row)
            return row

    def deactivate(self) -> None:
        """Serve the base model alone."""
        with self.sessions.begin() as session:
            for row in session.scalars(select(Adapter).where(Adapter.status == "active")):
                row.status = "retired"
            (self.dir / POINTER).unlink(missing_ok=True)

    def rollback(self) -> Adapter | None:
        """Go back one version: to the newest adapter older than the active one that has served
        before (the base model if there is none)."""
        current = self.active_version()
        if current is None:
            raise NotFoundError("No adapter is active; there is nothing to roll back.")
        with self.sessions() as session:
            earlier = session.scalars(select(Adapter).where(Adapter.version < current, Adapter.status == "retired")
                                      .order_by(Adapter.version.desc())).first()
            target = earlier.version if earlier is not None else None
        if target is None:
            self.deactivate()
            return None
        return self.activate(target)

    def list(self) -> list[Adapter]:
        with self.sessions() as session:
            rows = session.scalars(select(Adapter).order_by(Adapter.version)).all()
            for r in rows:
                session.expunge(r)
            return list(rows)
