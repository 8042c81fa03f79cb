"""The parsing side of ingest: export files in, batches of message rows (plain tuples, in the form
the ``messages`` columns store) out.

This module imports no SQLAlchemy and no models, only the parsers: a large file is parsed in a
process of its own (see ``parser_main``), and that process must start in hundredths of a second,
not in the half second that importing the database layer and the command line takes.
"""

from __future__ import annotations

import hashlib
import marshal
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from common.errors import DoppelError, InputError
from common.secrets import redact
from common.tombstones import chat_hash, sender_hashes
from trainer.ingest.detect import expand, open_unit
from trainer.ingest.records import ParseStats, RawMessage, matches_speaker, speaker_key

MAX_STORED_CHARS = 65_536  # a longer single message is skipped and counted, never stored half
# the widths of the columns (feedback.models); PostgreSQL refuses a longer value, SQLite would keep it
MAX_NAME_CHARS = 255  # sender_id, sender_name, chats.external_id
MAX_TITLE_CHARS = 512  # chats.title
MAX_ID_CHARS = 64  # platform_message_id, reply_to, dedup_key ("id:" + the platform's id)
_MAX_PID = MAX_ID_CHARS - len("id:")  # a longer "id" is no platform's: such a message is keyed by its content

# (platform, external id, title, kind) -> the chat's database id
ChatIdFor = Callable[[tuple[str, str, "str | None", str]], int]


def resolve_tz(tz: tzinfo | None) -> tzinfo:
    """``tz``, or the zone of this machine."""
    if tz is not None:
        return tz
    return datetime.now().astimezone().tzinfo  # type: ignore[return-value]


@dataclass
class Speaker:
    key: str
    name: str | None
    messages: int


def list_speakers(paths: list[Path], fmt: str | None = None, local_tz: tzinfo | None = None) -> tuple[list[Speaker], str | None]:
    """Everyone who wrote in the exports, most active first, and the owner the export names (if any)."""
    counts: Counter[str] = Counter()
    names: dict[str, str | None] = {}
    hint = None
    tz = resolve_tz(local_tz)
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


def candidates(speakers: Counter[str], names: dict[str, str | None], n: int = 5) -> str:
    parts = []
    for key, count in speakers.most_common(n):
        name = names.get(key)
        key, name = _shown(key), _shown(name)
        said = f"{count} message" + ("" if count == 1 else "s")
        parts.append(f"{name} ({key}, {said})" if name and name != key else f"{key} ({said})")
    return "; ".join(parts)


def who_are_you(files: list[Path], fmt: str | None, tz: tzinfo | None) -> InputError:
    speakers, _ = list_speakers(files, fmt, tz)
    counts = Counter({s.key: s.messages for s in speakers})
    names = {s.key: s.name for s in speakers}
    return InputError(
        f"Which speaker is you in {files[0].name}? This export does not say.",
        hint=f"Pass --me NAME_OR_ID (or set DOPPEL_OWNER). Candidates: {candidates(counts, names)}.",
    )


def _shown(name: str | None) -> str | None:
    """A speaker as an error message shows it: a name from a hostile file may be 100,000 characters."""
    return name if name is None or len(name) <= 60 else name[:57] + "..."


_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` as both databases store it: a lone surrogate (a "\\ud800" escape in a JSON file) is no
    text at all and NUL is refused by PostgreSQL, so each becomes U+FFFD."""
    return _BAD_CHARS.sub("\ufffd", value)


def scrub_rows(batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]] | None:
    """The batch with every string cleaned (``clean_text``), or None when nothing in it needed that.
    Called only when the database refused a batch, so the usual batch pays nothing for it."""
    changed = False
    out = []
    for row in batch:
        fixed = tuple(clean_text(v) if v.__class__ is str and _BAD_CHARS.search(v) else v for v in row)
        changed = changed or fixed != row
        out.append(fixed)
    return out if changed else None


def fit_chat(chat: tuple[str, str, str | None, str]) -> tuple[str, str, str | None, str]:
    """A chat's (platform, external id, title, kind) as the ``chats`` columns hold it: a title cut to
    its column, an external id longer than its column replaced by its digest (it still names one
    chat, the same on every ingest), no character the databases refuse."""
    platform, external_id, title, kind = chat
    external_id = clean_text(external_id)
    if len(external_id) > MAX_NAME_CHARS:
        external_id = "sha1:" + hashlib.sha1(external_id.encode("utf-8")).hexdigest()
    if title is not None:
        title = clean_text(title[:MAX_TITLE_CHARS])
    return platform, external_id, title, kind


def dedup_key(m: RawMessage, seen: Counter[str]) -> str:
    if m.platform_message_id is not None and len(m.platform_message_id) <= _MAX_PID:
        return "id:" + m.platform_message_id
    return content_key(m, seen)


def content_key(m: RawMessage, seen: Counter[str]) -> str:
    """The key of a message without a (usable) platform id: its time, sender and text."""
    base = hashlib.sha1(
        f"{m.sent_at.isoformat()}\x1f{m.sender_id}\x1f{m.text}".encode("utf-8", "surrogatepass")
    ).hexdigest()[:24]
    n = seen[base]
    seen[base] = n + 1
    return f"h:{base}:{n}"  # the n-th identical message at the same time stays distinct


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)
_FRACTIONS: dict[int, str] = {0: ".000000"}


def sqlite_time(dt: datetime | None) -> tuple[int | None, str | None]:
    """(Unix second, '.ffffff') for the SQLite insert (service.insert_sql); (None, None) for no time."""
    if dt is None:
        return None, None
    us = dt.microsecond
    frac = _FRACTIONS.get(us)
    if frac is None:
        frac = f".{us:06d}"
    return (dt - _EPOCH) // _ONE_SECOND, frac


def pg_time(dt: datetime | None) -> datetime | None:
    """A timestamp as the column stores it on PostgreSQL: naive UTC (``UTCDateTime``)."""
    if dt is None:
        return None
    if dt.utcoffset():  # parsers give UTC already; this is the rare other case
        dt = dt.astimezone(timezone.utc)
    return dt.replace(tzinfo=None)


FORGOTTEN_PERSON = "written by someone who asked to be forgotten"
FORGOTTEN_CHAT = "in a conversation forgotten at its other person's request"


@dataclass
class ParseJob:
    """What the parsing side needs to know: plain values, so it pickles without the database layer."""

    files: list[Path]
    me: str | None
    fmt: str | None
    tz: tzinfo
    sqlite: bool  # rows for SQLite's insert (times as second + fraction) or PostgreSQL's (datetimes)
    batch_size: int = 5000
    forgotten: frozenset[str] = frozenset()  # hashes of who asked to be forgotten (common.tombstones)


@dataclass
class Tally:
    """What the parsing side counted, handed to the report at the end of a file."""

    format: str = "?"
    owner: str | None = None
    parsed: int = 0
    owner_messages: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    speakers: Counter[str] = field(default_factory=Counter)


def _sender(who: str, sender_id: str | None, name: str | None) -> tuple[bool, str | None, str | None]:
    """Whether this sender is the owner, and its id and name cut to their columns."""
    is_owner = matches_speaker(who, sender_id, name)
    if sender_id is not None and len(sender_id) > MAX_NAME_CHARS:
        sender_id = sender_id[:MAX_NAME_CHARS]
    if name is not None and len(name) > MAX_NAME_CHARS:
        name = name[:MAX_NAME_CHARS]
    return is_owner, sender_id, name


def parse_rows(job: ParseJob, chat_id_for: ChatIdFor, tally: Tally) -> Iterator[list[tuple[Any, ...]]]:
    """Parse ``job.files`` into batches of message rows ready for the insert. ``chat_id_for`` turns a
    chat (platform, external id, title, kind) into its database id; it is called before any row of
    that chat. Raises InputError (nothing is stored then: the caller's transaction rolls back).

    The loop runs once per message of the history, so it is written for speed: locals instead of
    attributes, the owner test cached per sender, whole-second times converted without timedelta
    arithmetic."""
    stats = ParseStats()
    tally.format, chats = open_unit(job.files, job.fmt, stats, job.tz)
    size, sqlite = job.batch_size, job.sqlite
    speakers = tally.speakers
    # (sender id, name) as parsed -> (is the owner, id and name as stored): worked out once per sender
    senders: dict[tuple[str | None, str | None], tuple[bool, str | None, str | None]] = {}
    limit = MAX_STORED_CHARS
    forgotten = job.forgotten
    gone: dict[tuple[str, str | None, str | None], bool] = {}  # sender -> asked to be forgotten
    for chat in chats:
        if tally.owner is None:
            tally.owner = job.me or stats.owner_hint
            if tally.owner is None:
                raise who_are_you(job.files, job.fmt, job.tz)
        who = tally.owner
        if forgotten and chat_hash(*fit_chat((chat.platform, chat.external_id, None, ""))[:2]) in forgotten:
            n = sum(1 for _ in chat.messages)
            if n:
                stats.skip(FORGOTTEN_CHAT, n)
            continue
        chat_id = chat_id_for(fit_chat((chat.platform, chat.external_id, chat.title, chat.kind)))
        seen: Counter[str] = Counter()
        parsed = owners = 0
        batch: list[tuple[Any, ...]] = []
        append = batch.append
        for m in chat.messages:
            text = m.text
            if len(text) > limit:
                stats.skip(f"message longer than {limit:,} characters")
                continue
            if forgotten:
                k = (chat.platform, m.sender_id, m.sender_name)
                if (hit := gone.get(k)) is None:
                    hit = gone[k] = any(h in forgotten for h in sender_hashes(*k))
                if hit:
                    stats.skip(FORGOTTEN_PERSON)
                    continue
            text = redact(text)  # a bot token in the history (BotFather's message) is not stored
            sender = senders.get((m.sender_id, m.sender_name))
            if sender is None:
                sender = senders[(m.sender_id, m.sender_name)] = _sender(who, m.sender_id, m.sender_name)
            is_owner, sid, name = sender
            kind = m.kind
            if kind != "service":
                speakers[sid or name or "?"] += 1
                owners += is_owner
            parsed += 1
            pid, reply_to = m.platform_message_id, m.reply_to
            if pid is not None and len(pid) <= _MAX_PID:
                key = "id:" + pid
            else:  # no id, or one too long to be a platform's: the message is known by its content
                key, pid = content_key(m, seen), None
            if reply_to is not None and len(reply_to) > MAX_ID_CHARS:
                reply_to = None
            sent, edited = m.sent_at, m.edited_at
            if sqlite:
                if sent.microsecond or sent.tzinfo is None:
                    second, frac = sqlite_time(sent)  # (a naive time fails there, as it must)
                else:  # exact: a whole number of seconds is a float without rounding
                    second, frac = int(sent.timestamp()), ".000000"
                if edited is None:
                    append((chat_id, key, pid, sid, name, is_owner, text, kind, m.is_forwarded, reply_to,
                            second, frac, None, None, "ingest"))
                else:
                    append((chat_id, key, pid, sid, name, is_owner, text, kind, m.is_forwarded, reply_to,
                            second, frac, *sqlite_time(edited), "ingest"))
            else:
                append((chat_id, key, pid, sid, name, is_owner, text, kind, m.is_forwarded, reply_to,
                        pg_time(sent), pg_time(edited), "ingest"))
            if len(batch) >= size:
                yield batch
                batch = []
                append = batch.append
        tally.parsed += parsed
        tally.owner_messages += owners
        if batch:
            yield batch
    tally.skipped = stats.skipped


# -- parsing in a process of its own -------------------------------------------------------------
# Parsing JSON and building rows is Python work, and so is binding the rows in SQLite's executemany:
# in one process they take turns on the GIL. A large file is parsed in a child process that streams
# batches of rows over a socket, while the ingesting process only inserts them; the socket's buffer
# bounds the memory in flight.
#
# The child is a fresh interpreter that imports this module and the parsers, nothing else
# (``python -c BOOT``), not a multiprocessing "spawn" child: spawn re-imports the parent's main
# module in the child, which for the ``doppel`` command is the whole command line, and then the
# database layer for the target function: 0.5 s of CPU (measured) before the first message, while
# the ingesting process waits, against 0.06 s for this one.

BOOT = ("import sys\n"
        "from multiprocessing.connection import Connection\n"
        "conn = Connection(int(sys.argv[1]))\n"
        "sys.path[:] = conn.recv()\n"  # the parent's, so the child imports the same code
        "from trainer.ingest.rows import parser_main\n"
        "parser_main(conn)\n")


def send(conn: Any, message: tuple[str, Any]) -> None:
    """One message to the other side: b"p" and a pickle."""
    conn.send_bytes(b"p" + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Any) -> tuple[str, Any]:
    """One message from the other side: ("rows", batch) from b"m" and marshal (SQLite rows are plain
    tuples of str/int/None/bool, which marshal writes three times and reads one and a half times as
    fast as pickle), else the pickled (kind, value)."""
    data = conn.recv_bytes()
    if data[:1] == b"m":
        return "rows", marshal.loads(memoryview(data)[1:])
    return pickle.loads(memoryview(data)[1:])  # type: ignore[no-any-return]


def parser_main(conn: Any) -> None:
    """The child's side: receive a ParseJob, send ("chat", chat) and wait for its id, ("rows", batch)
    for each batch, then ("end", tally) or ("error", (class name, message, hint))."""
    job: ParseJob | None = None

    def chat_id_for(chat: tuple[str, str, str | None, str]) -> int:
        send(conn, ("chat", chat))
        return int(receive(conn)[1])

    try:
        _, job = receive(conn)
        tally = Tally()
        for batch in parse_rows(job, chat_id_for, tally):
            if job.sqlite:
                conn.send_bytes(b"m" + marshal.dumps(batch))
            else:  # PostgreSQL rows hold datetimes, which marshal does not write
                send(conn, ("rows", batch))
        send(conn, ("end", tally))
    except DoppelError as exc:
        send(conn, ("error", (type(exc).__name__, exc.message, exc.hint)))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the ingesting process went away (it failed, or was stopped): nothing to tell it
    except BaseException as exc:  # anything else still reaches the user, with what it was
        where = job.files[0] if job is not None else "the export"
        send(conn, ("error", ("InputError", f"Reading {where} failed: {type(exc).__name__}: {exc}",
                              "This is a bug in Doppel's parser if the export opens elsewhere; nothing was stored.")))
    finally:
        conn.close()
