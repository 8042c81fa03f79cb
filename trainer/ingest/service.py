"""Ingest: parse export files and store their messages, one transaction per file.

Re-ingesting the same export adds nothing (every message has a stable dedup key inside its chat);
a newer export that overlaps adds only what is new. If anything goes wrong in a file, nothing of
that file is kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from common.errors import InputError, NotFoundError
from feedback.models import Chat, Forgotten, Import, Message, utcnow
from trainer.ingest.detect import expand
from trainer.ingest.rows import (  # noqa: F401  (MAX_STORED_CHARS and Speaker: imported from here by callers)
    BOOT,
    MAX_STORED_CHARS,
    ChatIdFor,
    ParseJob,
    Speaker,
    Tally,
    candidates,
    list_speakers,
    parse_rows,
    receive,
    clean_text,
    resolve_tz,
    scrub_rows,
    send,
)

log = logging.getLogger(__name__)


@dataclass
class IngestOptions:
    me: str | None = None  # the owner's name or id; None: from the export (Telegram) or an error
    fmt: str | None = None  # force a format; None: detect
    local_tz: tzinfo | None = None  # zone of timestamps written without an offset
    batch_size: int = 5000
    # files at least this large are parsed in a child process while this one inserts (2x on 2 cores);
    # below it, starting the process costs more than it saves
    parallel_min_bytes: int = 8 * 1024 * 1024


@dataclass
class FileReport:
    path: str
    format: str = "?"
    chats: int = 0
    parsed: int = 0
    new: int = 0
    duplicates: int = 0
    owner_messages: int = 0
    owner: str | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    chat_ids: list[int] = field(default_factory=list)
    error: InputError | None = None  # set when this file failed; nothing of it was stored


def _local_tz(options: IngestOptions) -> tzinfo:
    return resolve_tz(options.local_tz)


_COLUMNS = ("chat_id", "dedup_key", "platform_message_id", "sender_id", "sender_name", "is_owner", "text",
            "kind", "is_forwarded", "reply_to", "sent_at", "edited_at", "source")


def _insert_sql(conn: Connection) -> str:
    """Bulk insert through the DB-API cursor: SQLAlchemy's per-row parameter processing costs more
    than SQLite's own work here, so rows are plain tuples already in the form the column stores.

    On SQLite a timestamp is stored as the text SQLAlchemy's DateTime writes ('2020-09-13
    12:26:40.000000', naive UTC); SQLite formats it from two parameters, the Unix second and the
    fraction, inside its own C loop (measured: a fifth of the parser's time when done in Python).
    """
    dialect = conn.dialect
    if dialect.name not in ("sqlite", "postgresql"):
        raise InputError(f"Ingest supports SQLite and PostgreSQL, not {dialect.name}.")
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    values = [mark] * len(_COLUMNS)
    if dialect.name == "sqlite":
        for col in ("sent_at", "edited_at"):
            values[_COLUMNS.index(col)] = "strftime('%Y-%m-%d %H:%M:%S', ?, 'unixepoch') || ?"
    return (f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ({', '.join(values)}) "
            "ON CONFLICT (chat_id, dedup_key) DO NOTHING")


def _forgotten(conn: Connection) -> frozenset[str]:
    """Who asked to be forgotten (hashes; see common.tombstones): their messages are not imported again."""
    return frozenset(conn.execute(select(Forgotten.key)).scalars())


def _chat_id(conn: Connection, chat: tuple[str, str, str | None, str]) -> int:
    platform, external_id, title, kind = chat
    row = conn.execute(
        select(Chat.id, Chat.title).where(Chat.platform == platform, Chat.external_id == external_id)
    ).first()
    if row is not None:
        # a title renamed by a /forget ("[removed]'s birthday") is not given its old name back
        if title and row.title != title and not (row.title and "[removed]" in row.title):
            conn.execute(update(Chat).where(Chat.id == row.id).values(title=title))
        return int(row.id)
    return int(
        conn.execute(
            insert(Chat)
            .values(platform=platform, external_id=external_id, title=title, kind=kind, created_at=utcnow())
            .returning(Chat.id)
        ).scalar_one()
    )


def _parse_in_child(job: ParseJob, chat_id_for: ChatIdFor, tally: Tally) -> Iterator[list[tuple[Any, ...]]]:
    """``parse_rows``, run in a child process (see trainer.ingest.rows for why it is not spawned by
    multiprocessing)."""
    ours, theirs = _socket_pipe()
    try:
        child = subprocess.Popen([sys.executable, "-c", BOOT, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # stderr: a crash shows
    finally:
        theirs.close()
    try:
        ours.send(sys.path)
        send(ours, ("job", job))
        while True:
            try:
                kind, value = receive(ours)
            except (EOFError, ConnectionResetError):
                try:
                    code = child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                raise InputError(f"The parser of {job.files[0]} stopped unexpectedly (exit code {code}).",
                                 hint="Nothing of this file was stored. If memory ran out, close other programs "
                                      "and run the ingest again.") from None
            if kind == "rows":
                yield value
            elif kind == "chat":
                send(ours, ("id", chat_id_for(value)))
            elif kind == "end":
                for name in ("format", "owner", "parsed", "owner_messages", "skipped", "speakers"):
                    setattr(tally, name, getattr(value, name))
                return
            else:
                cls, message, hint = value
                error_type = {"NotFoundError": NotFoundError}.get(cls, InputError)
                raise error_type(message, hint=hint)
    finally:
        ours.close()  # a child still parsing gets a broken pipe and ends
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _socket_pipe() -> tuple[Any, Any]:
    """``multiprocessing.Pipe(duplex=True)`` (a socket pair), asking for 4 MB send buffers: with the
    usual 208 KB a batch of rows does not fit, so the parser waits for every recv and the two
    processes move in lock step; with room for several batches the parser runs ahead and evens out
    the batches that insert slower (the kernel caps the size at net.core.wmem_max)."""
    import socket
    from multiprocessing.connection import Connection

    a, b = socket.socketpair()
    for sock in (a, b):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
    return Connection(a.detach()), Connection(b.detach())


class _Digest(threading.Thread):
    """The files' SHA-256, computed beside the parse (hashlib and reads release the GIL)."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(name="doppel-ingest-sha256", daemon=True)
        self.files = files
        self.digest = ""
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.digest = _sha256(self.files)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
            self.error = exc

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest


def ingest_unit(engine: Engine, files: list[Path], options: IngestOptions,
                on_progress: Callable[[int], None] | None = None) -> FileReport:
    """Ingest one file (or one Messenger thread) in one transaction."""
    report = FileReport(path=", ".join(str(f) for f in files))
    tz = _local_tz(options)
    tally = Tally()
    digest = _Digest(files)
    with engine.begin() as conn:  # one transaction: the whole file, or nothing of it
        sql = _insert_sql(conn)
        job = ParseJob(files=files, me=options.me, fmt=options.fmt, tz=tz, sqlite=conn.dialect.name == "sqlite",
                       batch_size=options.batch_size, forgotten=_forgotten(conn))
        before: dict[int, int] = {}

        def chat_id_for(chat: tuple[str, str, str | None, str]) -> int:
            chat_id = _chat_id(conn, chat)
            if chat_id not in before:
                report.chat_ids.append(chat_id)
                before[chat_id] = _count(conn, chat_id)
            return chat_id

        size = sum(f.stat().st_size for f in files if f.is_file())
        parallel = size >= options.parallel_min_bytes and os.name == "posix" and bool(sys.executable)
        parse = _parse_in_child if parallel else parse_rows
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for batch in parse(job, chat_id_for, tally):
                _insert(cursor, sql, batch)
                if on_progress:
                    on_progress(len(batch))
        finally:
            cursor.close()
        report.format, report.owner = tally.format, tally.owner
        report.parsed, report.owner_messages = tally.parsed, tally.owner_messages
        report.chats = len(report.chat_ids)
        report.new = sum(_count(conn, cid) - n for cid, n in before.items())
        if report.chats == 0:
            raise InputError(f"{report.path}: the export holds no chats with messages.", hint="Check that you exported the chat history.")
        if report.owner_messages == 0 and tally.speakers:
            names = _names_of(files, options, tz)
            raise _owner_not_found(report.path, report.owner or "", tally.speakers, names)
        report.duplicates = report.parsed - report.new
        report.skipped = tally.skipped
        conn.execute(
            insert(Import).values(
                path=clean_text(report.path[:1024]), sha256=digest.result(), format=report.format,
                counts={"chats": report.chats, "parsed": report.parsed, "new": report.new,
                        "duplicates": report.duplicates, "owner_messages": report.owner_messages,
                        "skipped": dict(report.skipped)},
                created_at=utcnow(),
            )
        )
    return report


def _insert(cursor: Any, sql: str, batch: list[tuple[Any, ...]]) -> None:
    """Insert a batch. A lone surrogate (from a "\\ud800" escape in a JSON export) cannot be encoded
    for either database, and PostgreSQL refuses NUL: both fail on the client side, before the row is
    sent, so the transaction goes on. Then the batch goes again with those characters replaced
    (rows already inserted are skipped by their dedup keys). Checking every string up front would
    cost every ingest a tenth of its parsing time for a character real exports do not hold."""
    try:
        cursor.executemany(sql, batch)
    except Exception:
        scrubbed = scrub_rows(batch)
        if scrubbed is None:  # the failure was something else
            raise
        cursor.executemany(sql, scrubbed)


def _count(conn: Connection, chat_id: int) -> int:
    return int(conn.execute(select(func.count()).select_from(Message).where(Message.chat_id == chat_id)).scalar_one())


def _names_of(files: list[Path], options: IngestOptions, tz: tzinfo) -> dict[str, str | None]:
    """Display names of the speakers (only needed for an error message, so read again then)."""
    speakers, _ = list_speakers(files, options.fmt, tz)
    return {s.key: s.name for s in speakers}


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _owner_not_found(path: str, owner: str, speakers: Counter[str], names: dict[str, str | None]) -> InputError:
    return InputError(
        f"Nobody called {owner!r} wrote in {path}, so there is nothing of yours to learn from.",
        hint=f"Pass --me with one of: {candidates(speakers, names)}. Nothing from this file was stored.",
    )


def ingest_paths(engine: Engine, paths: list[Path], options: IngestOptions,
                 on_file: Callable[[list[Path]], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> list[FileReport]:
    """Ingest every file; a file that fails is reported (and nothing of it stored), the others go on."""
    units = expand(paths)
    reports = []
    for unit in units:
        if on_file:
            on_file(unit)
        try:
            reports.append(ingest_unit(engine, unit, options, on_progress))
        except InputError as exc:
            if len(units) == 1:
                raise
            reports.append(FileReport(path=", ".join(str(f) for f in unit), error=exc))
    return reports
