"""Ingest: parse export files and store their messages, one transaction per file.

Re-ingesting the same export adds nothing (every message has a stable dedup key inside its chat);
a newer export that overlaps adds only what is new. If anything goes wrong in a file, nothing of
that file is kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from common.errors import DoppelError, InputError, NotFoundError
from feedback.models import Chat, Import, Message, utcnow
from trainer.ingest.detect import expand, open_unit
from trainer.ingest.records import ParseStats, RawMessage, matches_speaker, speaker_key

log = logging.getLogger(__name__)

MAX_STORED_CHARS = 65_536  # a longer single message is skipped and counted, never stored half


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


@dataclass
class Speaker:
    key: str
    name: str | None
    messages: int


def _local_tz(options: IngestOptions) -> tzinfo:
    if options.local_tz is not None:
        return options.local_tz
    from datetime import datetime

    return datetime.now().astimezone().tzinfo  # type: ignore[return-value]


def list_speakers(paths: list[Path], fmt: str | None = None, local_tz: tzinfo | None = None) -> tuple[list[Speaker], str | None]:
    """Everyone who wrote in the exports, most active first, and the owner the export names (if any)."""
    counts: Counter[str] = Counter()
    names: dict[str, str | None] = {}
    hint = None
    tz = _local_tz(IngestOptions(local_tz=local_tz))
    for unit in expand(paths):
        stats = ParseStats()
        _, chats = open_unit(unit, fmt, stats, tz)
        for chat in chats:
            for m in chat.messages:
                if m.kind == "service":
                    continue
                key = speaker_key(m.sender_id, m.sender_name)
                counts[key] += 1
                names.setdefault(key, m.sender_name)
        hint = hint or stats.owner_hint
    return [Speaker(k, names.get(k), n) for k, n in counts.most_common()], hint


def _dedup_key(m: RawMessage, seen: Counter[str]) -> str:
    if m.platform_message_id is not None:
        return "id:" + m.platform_message_id
    base = hashlib.sha1(
        f"{m.sent_at.isoformat()}\x1f{m.sender_id}\x1f{m.text}".encode("utf-8", "surrogatepass")
    ).hexdigest()[:24]
    n = seen[base]
    seen[base] = n + 1
    return f"h:{base}:{n}"  # the n-th identical message at the same time stays distinct


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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)
_FRACTIONS: dict[int, str] = {0: ".000000"}


def _sqlite_time(dt: datetime | None) -> tuple[int | None, str | None]:
    """(Unix second, '.ffffff') for the SQLite insert above; (None, None) for no time."""
    if dt is None:
        return None, None
    us = dt.microsecond
    frac = _FRACTIONS.get(us)
    if frac is None:
        frac = f".{us:06d}"
    return (dt - _EPOCH) // _ONE_SECOND, frac


def _pg_time(dt: datetime | None) -> datetime | None:
    """A timestamp as the column stores it on PostgreSQL: naive UTC (``UTCDateTime``)."""
    if dt is None:
        return None
    if dt.utcoffset():  # parsers give UTC already; this is the rare other case
        dt = dt.astimezone(timezone.utc)
    return dt.replace(tzinfo=None)


def _chat_id(conn: Connection, chat: tuple[str, str, str | None, str]) -> int:
    platform, external_id, title, kind = chat
    row = conn.execute(
        select(Chat.id, Chat.title).where(Chat.platform == platform, Chat.external_id == external_id)
    ).first()
    if row is not None:
        if title and row.title != title:
            conn.execute(update(Chat).where(Chat.id == row.id).values(title=title))
        return int(row.id)
    return int(
        conn.execute(
            insert(Chat)
            .values(platform=platform, external_id=external_id, title=title, kind=kind, created_at=utcnow())
            .returning(Chat.id)
        ).scalar_one()
    )


class _Matcher:
    """``matches_speaker`` with a cache: a chat has few distinct senders."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.cache: dict[tuple[str | None, str | None], bool] = {}

    def __call__(self, sender_id: str | None, sender_name: str | None) -> bool:
        key = (sender_id, sender_name)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = matches_speaker(self.who, sender_id, sender_name)
        return hit


@dataclass
class _Tally:
    """What the parsing side counted, handed to the report at the end of a file."""

    format: str = "?"
    owner: str | None = None
    parsed: int = 0
    owner_messages: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    speakers: Counter[str] = field(default_factory=Counter)


def _parse_rows(files: list[Path], options: IngestOptions, tz: tzinfo, sqlite: bool,
                chat_id_for: Callable[[tuple[str, str, str | None, str]], int],
                tally: _Tally) -> Iterator[list[tuple[Any, ...]]]:
    """Parse ``files`` into batches of message rows ready for the insert. ``chat_id_for`` turns a
    chat (platform, external id, title, kind) into its database id; it is called before any row of
    that chat. Raises InputError (nothing is stored then: the caller's transaction rolls back)."""
    stats = ParseStats()
    tally.format, chats = open_unit(files, options.fmt, stats, tz)
    is_me = _Matcher("")
    size = options.batch_size
    for chat in chats:
        if tally.owner is None:
            tally.owner = options.me or stats.owner_hint
            if tally.owner is None:
                raise _who_are_you(files, options)
            is_me = _Matcher(tally.owner)
        chat_id = chat_id_for((chat.platform, chat.external_id, chat.title, chat.kind))
        seen: Counter[str] = Counter()
        batch: list[tuple[Any, ...]] = []
        for m in chat.messages:
            text = m.text
            if len(text) > MAX_STORED_CHARS:
                stats.skip(f"message longer than {MAX_STORED_CHARS:,} characters")
                continue
            sid, name = m.sender_id, m.sender_name
            is_owner = is_me(sid, name)
            if m.kind != "service":
                tally.speakers[sid or name or "?"] += 1
                tally.owner_messages += is_owner
            tally.parsed += 1
            pid = m.platform_message_id
            key = "id:" + pid if pid is not None else _dedup_key(m, seen)
            if sqlite:
                batch.append((chat_id, key, pid, sid, name, is_owner, text, m.kind, m.is_forwarded, m.reply_to,
                              *_sqlite_time(m.sent_at), *_sqlite_time(m.edited_at), "ingest"))
            else:
                batch.append((chat_id, key, pid, sid, name, is_owner, text, m.kind, m.is_forwarded, m.reply_to,
                              _pg_time(m.sent_at), _pg_time(m.edited_at), "ingest"))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    tally.skipped = stats.skipped


# -- parsing in a process of its own -------------------------------------------------------------
# Parsing JSON and building rows is Python work, and so is binding the rows in SQLite's executemany:
# in one process they take turns on the GIL (measured: 4.6 s parse + 6 s insert = 15 s end to end
# for 1M messages). A large file is parsed in a child process that streams batches of rows over a
# pipe, while this process only inserts them; the pipe's buffer bounds the memory in flight.

def _parser_main(conn: Any, files: list[Path], options: IngestOptions, tz: tzinfo, sqlite: bool) -> None:
    tally = _Tally()

    def chat_id_for(chat: tuple[str, str, str | None, str]) -> int:
        conn.send(("chat", chat))
        return int(conn.recv())

    try:
        for batch in _parse_rows(files, options, tz, sqlite, chat_id_for, tally):
            conn.send(("rows", batch))
        conn.send(("end", tally))
    except DoppelError as exc:
        conn.send(("error", (type(exc).__name__, exc.message, exc.hint)))
    except BaseException as exc:  # anything else still reaches the user, with what it was
        conn.send(("error", ("InputError", f"Reading {files[0]} failed: {type(exc).__name__}: {exc}",
                             "This is a bug in Doppel's parser if the export opens elsewhere; nothing was stored.")))
    finally:
        conn.close()


def _parse_in_child(files: list[Path], options: IngestOptions, tz: tzinfo, sqlite: bool,
                    chat_id_for: Callable[[tuple[str, str, str | None, str]], int],
                    tally: _Tally) -> Iterator[list[tuple[Any, ...]]]:
    """``_parse_rows``, run in a child process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and models
    ours, theirs = ctx.Pipe(duplex=True)
    child = ctx.Process(target=_parser_main, args=(theirs, files, options, tz, sqlite), daemon=True,
                        name="doppel-ingest-parser")
    child.start()
    theirs.close()
    try:
        while True:
            try:
                kind, value = ours.recv()
            except EOFError:
                raise InputError(f"The parser of {files[0]} stopped unexpectedly (exit code {child.exitcode}).",
                                 hint="Nothing of this file was stored. If memory ran out, close other programs "
                                      "and run the ingest again.") from None
            if kind == "rows":
                yield value
            elif kind == "chat":
                ours.send(chat_id_for(value))
            elif kind == "end":
                for name in ("format", "owner", "parsed", "owner_messages", "skipped", "speakers"):
                    setattr(tally, name, getattr(value, name))
                return
            else:
                cls, message, hint = value
                error_type = {"NotFoundError": NotFoundError}.get(cls, InputError)
                raise error_type(message, hint=hint)
    finally:
        ours.close()
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join()


def ingest_unit(engine: Engine, files: list[Path], options: IngestOptions,
                on_progress: Callable[[int], None] | None = None) -> FileReport:
    """Ingest one file (or one Messenger thread) in one transaction."""
    report = FileReport(path=", ".join(str(f) for f in files))
    tz = _local_tz(options)
    tally = _Tally()
    with engine.begin() as conn:  # one transaction: the whole file, or nothing of it
        sql = _insert_sql(conn)
        sqlite = conn.dialect.name == "sqlite"
        before: dict[int, int] = {}

        def chat_id_for(chat: tuple[str, str, str | None, str]) -> int:
            chat_id = _chat_id(conn, chat)
            if chat_id not in before:
                report.chat_ids.append(chat_id)
                before[chat_id] = _count(conn, chat_id)
            return chat_id

        size = sum(f.stat().st_size for f in files if f.is_file())
        parse = _parse_in_child if size >= options.parallel_min_bytes else _parse_rows
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for batch in parse(files, options, tz, sqlite, chat_id_for, tally):
                cursor.executemany(sql, batch)
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
                path=report.path[:1024], sha256=_sha256(files), format=report.format,
                counts={"chats": report.chats, "parsed": report.parsed, "new": report.new,
                        "duplicates": report.duplicates, "owner_messages": report.owner_messages,
                        "skipped": dict(report.skipped)},
                created_at=utcnow(),
            )
        )
    return report


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


def _candidates(speakers: Counter[str], names: dict[str, str | None], n: int = 5) -> str:
    parts = []
    for key, count in speakers.most_common(n):
        name = names.get(key)
        said = f"{count} message" + ("" if count == 1 else "s")
        parts.append(f"{name} ({key}, {said})" if name and name != key else f"{key} ({said})")
    return "; ".join(parts)


def _owner_not_found(path: str, owner: str, speakers: Counter[str], names: dict[str, str | None]) -> InputError:
    return InputError(
        f"Nobody called {owner!r} wrote in {path}, so there is nothing of yours to learn from.",
        hint=f"Pass --me with one of: {_candidates(speakers, names)}. Nothing from this file was stored.",
    )


def _who_are_you(files: list[Path], options: IngestOptions) -> InputError:
    speakers, _ = list_speakers(files, options.fmt, options.local_tz)
    counts = Counter({s.key: s.messages for s in speakers})
    names = {s.key: s.name for s in speakers}
    return InputError(
        f"Which speaker is you in {files[0].name}? This export does not say.",
        hint=f"Pass --me NAME_OR_ID (or set DOPPEL_OWNER). Candidates: {_candidates(counts, names)}.",
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
