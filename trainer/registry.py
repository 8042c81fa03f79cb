"""The adapter registry: versioned adapters in ``<adapters_dir>/v<N>/``, one row each in the
``adapters`` table, and the active one named in ``<adapters_dir>/ACTIVE`` (written atomically; the
serving agent reads it before each request, see ``agent/adapters.py``).

Crash consistency: every change takes the registry's file lock (``<adapters_dir>/.lock``, across
processes; a dead process's lock is released by the kernel), and the pointer is the commit point
of an activation: serving processes follow it, so whatever the database says, the pointer is what
served. ``reconcile()`` (called by the composition roots at start) takes the lock and repairs what
a process killed half-way left: a folder moved in without its row is registered, the database
follows the pointer, and an adapter accepted but never activated says so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters import POINTER
from common.errors import InputError, NotFoundError
from feedback.models import Adapter, utcnow
from knowledge.facts import write_atomic

log = logging.getLogger(__name__)

LOCK = ".lock"
INTERRUPTED = "interrupted"  # the word reconcile's notes start with (and how it knows it has noted)


def version_name(version: int) -> str:
    return f"v{version}"


def _intended(folder: Path) -> str | None:
    """The status ``register`` was asked for, as it wrote it into the adapter's folder."""
    try:
        return json.loads((folder / "doppel.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


class Registry:
    def __init__(self, adapters_dir: Path, sessions: sessionmaker[Session]) -> None:
        self.dir = Path(adapters_dir)
        self.sessions = sessions

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The registry's lock, across processes: one change at a time, and reconcile never sees a
        change a live process is in the middle of."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

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
        """Move a finished adapter into the registry as the next version, then (``status="active"``)
        activate it. The folder appears whole, then its row (as a candidate until activated); a
        process killed in between leaves what ``reconcile`` completes."""
        with self._locked():
            with self.sessions() as session:
                version = (session.scalar(select(func.max(Adapter.version))) or 0) + 1
            while (self.dir / version_name(version)).exists():  # a folder a killed process moved in
                version += 1
            target = self.dir / version_name(version)
            (adapter_dir / "doppel.json").write_text(json.dumps(
                {"version": version, "status": status, "reason": reason, "config": config, "metrics": metrics,
                 "dataset_fingerprint": fingerprint}, indent=2, default=str), encoding="utf-8")
            adapter_dir.rename(target)
            try:
                with self.sessions.begin() as session:
                    row = Adapter(version=version, path=str(target), status="candidate" if status == "active" else status,
                                  reason=reason, dataset_fingerprint=fingerprint, metrics=metrics)
                    session.add(row)
                    session.flush()
                    session.expunge(row)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            if status == "active":
                return self._activate(version)
            return row

    def activate(self, version: int) -> Adapter:
        with self._locked():
            return self._activate(version)

    def _activate(self, version: int) -> Adapter:
        pointer = self.dir / POINTER
        with self.sessions() as session:  # committed below, after the pointer
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
            session.flush()
            session.expunge(row)
            # the pointer is the commit point (serving follows it); if the commit then fails, it is
            # put back, and a process killed right here is completed by reconcile()
            before = pointer.read_bytes() if pointer.is_file() else None
            write_atomic(pointer, f"{version_name(version)}\n".encode())
            try:
                session.commit()
            except BaseException:
                if before is None:
                    pointer.unlink(missing_ok=True)
                else:
                    write_atomic(pointer, before)
                raise
        return row

    def deactivate(self) -> None:
        """Serve the base model alone."""
        with self._locked():
            self._deactivate()

    def _deactivate(self) -> None:
        with self.sessions.begin() as session:
            for row in session.scalars(select(Adapter).where(Adapter.status == "active")):
                row.status = "retired"
            session.flush()
            (self.dir / POINTER).unlink(missing_ok=True)  # the commit point, as in _activate

    def rollback(self) -> Adapter | None:
        """Go back one version: to the newest adapter older than the active one that has served
        before (the base model if there is none)."""
        with self._locked():
            current = self.active_version()
            if current is None:
                raise NotFoundError("No adapter is active; there is nothing to roll back.")
            with self.sessions() as session:
                earlier = session.scalars(select(Adapter).where(Adapter.version < current, Adapter.status == "retired")
                                          .order_by(Adapter.version.desc())).first()
                target = earlier.version if earlier is not None else None
            if target is None:
                self._deactivate()
                return None
            return self._activate(target)

    def list(self) -> list[Adapter]:
        with self.sessions() as session:
            rows = session.scalars(select(Adapter).order_by(Adapter.version)).all()
            for r in rows:
                session.expunge(r)
            return list(rows)

    def reconcile(self) -> list[str]:
        """Repair what a process killed in the middle of a change left, and say what was done (also
        in the log). Safe to call at any time: it waits for a change in progress elsewhere."""
        if not self.dir.is_dir():
            return []
        done: list[str] = []
        with self._locked(), self.sessions.begin() as session:
            rows = {r.version: r for r in session.scalars(select(Adapter))}
            pointed = self.active_version()
            # 1. a folder moved in whose row was never written
            for folder in sorted(self.dir.iterdir()):
                m = re.fullmatch(r"v(\d+)", folder.name)
                if not (m and folder.is_dir()) or int(m.group(1)) in rows:
                    continue
                version = int(m.group(1))
                try:
                    meta = json.loads((folder / "doppel.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    meta = {}
                gate = meta.get("reason") or "no gate decision recorded"
                row = Adapter(version=version, path=str(folder), status="candidate",
                              reason=f"{INTERRUPTED}: the process died while registering it ({gate})",
                              dataset_fingerprint=meta.get("dataset_fingerprint"), metrics=meta.get("metrics") or {})
                if version != pointed:
                    row.reason += f"; it never served: `doppel adapters activate {version}` serves it"
                session.add(row)
                rows[version] = row
                done.append(f"adapter v{version} was in the registry's folder without a row: registered as a candidate")
            # 2. the database follows the pointer (what serving processes follow)
            if pointed is not None and (pointed not in rows
                                        or not (Path(rows[pointed].path) / "adapter_config.json").is_file()):
                (self.dir / POINTER).unlink(missing_ok=True)
                done.append(f"the pointer named adapter v{pointed}, whose files are gone: the base model serves")
                pointed = None
            for version, row in sorted(rows.items()):
                if version == pointed and row.status != "active":
                    row.status = "active"
                    row.metrics = {**(row.metrics or {}), "activated_at": utcnow().isoformat()}
                    row.reason = (f"{row.reason or ''}; {INTERRUPTED}: activated, but the process died before "
                                  "the database said so (completed at start)").lstrip("; ")
                    done.append(f"adapter v{version} serves (the pointer names it): marked active")
                elif version != pointed and row.status == "active":
                    row.status = "retired"
                    done.append(f"adapter v{version} was marked active but does not serve: marked retired")
                elif row.status == "candidate" and INTERRUPTED not in (row.reason or "") \
                        and _intended(Path(row.path)) == "active":
                    # seen under the lock, an adapter registered to serve was never activated
                    row.reason = (f"{row.reason or ''}; {INTERRUPTED}: the process died before it was activated; "
                                  f"`doppel adapters activate {version}` serves it").lstrip("; ")
                    done.append(f"adapter v{version} was accepted but never activated: left a candidate")
        for line in done:
            log.warning("registry: %s", line)
        return done
