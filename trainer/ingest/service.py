"""Ingest: parse export files and store their messages, one transaction per file.

Re-ingesting the same export adds nothing (every message has a stable dedup key inside its chat);
a newer export that overlaps adds only what is new. If anything goes wrong in a file, nothing of
that file is kept.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from common.errors import InputError
from feedback.models import Chat, Import, Message, utcnow
from trainer.ingest.detect import expand, open_unit
from trainer.ingest.records import ChatStream, ParseStats, RawMessage, matches_speaker, speaker_key

log = logging.getLogger(__name__)

MAX_STORED_CHARS = 65_536  # a longer single message is skipped and counted, never stored half


@dataclass
class IngestOptions:
    me: str | None = None  # the owner's name or id; None: from the export (Telegram) or an error
    fmt: str | None = None  # force a format; None: detect
    local_tz: tzinfo | None = None  # zone of timestamps written without an offset
    batch_size: int = 5000


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


class _Writer:
    """Bulk insert of message rows through the DB-API cursor, in a thread of its own.

    SQLAlchemy's per-row parameter processing costs more than SQLite's own work here, so rows are
    plain tuples with values already in the form the column stores (naive UTC, as ``UTCDateTime``
    writes them). The thread overlaps SQLite's work (which releases the GIL) with parsing; the
    bounded queue keeps memory at a few batches.
    """

    def __init__(self, conn: Connection) -> None:
        dialect = conn.dialect
        if dialect.name not in ("sqlite", "postgresql"):
            raise InputError(f"Ingest supports SQLite and PostgreSQL, not {dialect.name}.")
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.sql = (f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ({', '.join([mark] * len(_COLUMNS))}) "
                    "ON CONFLICT (chat_id, dedup_key) DO NOTHING")
        self.sqlite = dialect.name == "sqlite"
        self.cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        self.queue: queue.Queue[list[tuple[Any, ...]] | None] = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self.thread.start()

    def time(self, dt: datetime | None) -> Any:
        if dt is None:
            return None
        if dt.utcoffset():  # parsers give UTC already; this is the rare other case
            dt = dt.astimezone(timezone.utc)
        if self.sqlite:  # the text form SQLAlchemy's SQLite DateTime stores and reads back
            return dt.isoformat(" ", "microseconds")[:26]
        return dt.replace(tzinfo=None)

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is None:
                try:
                    self.cursor.executemany(self.sql, batch)
                except BaseException as exc:  # handed to the parsing thread in put()/close()
                    self.error = exc

    def put(self, batch: list[tuple[Any, ...]]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.cursor.close()
        if self.error is not None:
            raise self.error


def _chat_id(conn: Connection, chat: ChatStream) -> int:
    row = conn.execute(
        select(Chat.id, Chat.title).where(Chat.platform == chat.platform, Chat.external_id == chat.external_id)
    ).first()
    if row is not None:
        if chat.title and row.title != chat.title:
            conn.execute(update(Chat).where(Chat.id == row.id).values(title=chat.title))
        return int(row.id)
    return int(
        conn.execute(
            insert(Chat)
            .values(platform=chat.platform, external_id=chat.external_id, title=chat.title, kind=chat.kind, created_at=utcnow())
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


def _batches(it: Iterable[tuple[Any, ...]], n: int) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in it:
        batch.append(row)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_unit(engine: Engine, files: list[Path], options: IngestOptions,
                on_progress: Callable[[int], None] | None = None) -> FileReport:
    """Ingest one file (or one Messenger thread) in one transaction."""
    report = FileReport(path=", ".join(str(f) for f in files))
    stats = ParseStats()
    tz = _local_tz(options)
    speakers: Counter[str] = Counter()
    names: dict[str, str | None] = {}
    with engine.begin() as conn:  # one transaction: the whole file, or nothing of it
        report.format, chats = open_unit(files, options.fmt, stats, tz)
        owner: str | None = None
        is_me = _Matcher("")
        for chat in chats:
            if owner is None:
                owner = options.me or stats.owner_hint
                if owner is None:
                    raise _who_are_you(files, options)
                report.owner = owner
                is_me = _Matcher(owner)
            chat_id = _chat_id(conn, chat)
            report.chats += 1
            report.chat_ids.append(chat_id)
            before = conn.execute(select(func.count()).select_from(Message).where(Message.chat_id == chat_id)).scalar_one()
            seen: Counter[str] = Counter()

            def rows(chat: ChatStream = chat, chat_id: int = chat_id, seen: Counter[str] = seen) -> Iterator[tuple[Any, ...]]:
                parsed = mine = 0
                try:
                    for m in chat.messages:
                        text = m.text
                        if len(text) > MAX_STORED_CHARS:
                            stats.skip(f"message longer than {MAX_STORED_CHARS:,} characters")
                            continue
                        sid, name = m.sender_id, m.sender_name
                        is_owner = is_me(sid, name)
                        if m.kind != "service":
                            speakers[sid or name or "?"] += 1
                            mine += is_owner
                        parsed += 1
                        pid = m.platform_message_id
                        yield (chat_id, "id:" + pid if pid is not None else _dedup_key(m, seen), pid, sid, name,
                               is_owner, text, m.kind, m.is_forwarded, m.reply_to, to_db(m.sent_at),
                               to_db(m.edited_at) if m.edited_at is not None else None, "ingest")
                finally:
                    report.parsed += parsed
                    report.owner_messages += mine

            writer = _Writer(conn)
            to_db = writer.time
            try:
                for batch in _batches(rows(), options.batch_size):
                    writer.put(batch)
                    if on_progress:
                        on_progress(len(batch))
            finally:
                writer.close()
            after = conn.execute(select(func.count()).select_from(Message).where(Message.chat_id == chat_id)).scalar_one()
            report.new += after - before
        if report.chats == 0:
            raise InputError(f"{report.path}: the export holds no chats with messages.", hint="Check that you exported the chat history.")
        if report.owner_messages == 0 and speakers:
            names.update(_names_of(files, options, tz))
            raise _owner_not_found(report.path, owner or "", speakers, names)
        report.duplicates = report.parsed - report.new
        report.skipped = stats.skipped
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
        parts.append(f"{name} ({key}, {count} messages)" if name and name != key else f"{key} ({count} messages)")
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
