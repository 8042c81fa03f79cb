"""From the stored history to training samples in the owner's voice.

Each owner turn is a sample. Its prompt is what the live agent would have built at that moment:
the same turns and time window (``agent.conversation``), the facts the agent would retrieve for the
last incoming turn, and the same prompt builder and limits (``agent.prompt``). The twin's own
replies are context, never targets: only ratings bring them back.

The facts are retrieved where a sample is used, not here (``trainer.examples.with_facts``): a
training run takes a few thousand samples of a history's hundreds of thousands, and embedding every
turn of the history for its facts was three quarters of a build (200,000 messages: 77 of 97 s).
The record holds what that needs: the turns its prompt starts from and the query. The run makes
the fact drills too (``drill_examples``), so the build never loads an embedding model, and a facts
edit leaves the training set as it is: the next run reads the edited file.

The build streams: messages are read chat by chat, samples are rendered a batch at a time (one
tokenizer call per turn) and written as they come, so memory is bounded by a batch. The split is by time: the newest ``validation_fraction`` of samples
is validation; a first cheap pass finds the time where it starts.

A rebuild continues the last build where it can: a chat that only grew since is read from its last
turn on, its older lines copied from the last JSONL (see "continuing the last build" below); the
output is what a build from scratch makes, byte for byte (a test holds it to that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from array import array
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sqlalchemy import BigInteger, and_, cast, extract, func, or_, select
from sqlalchemy.orm import Session

from agent.conversation import (SELF_KEY, ContextConfig, Said, TurnSpan, clean, facts_query, group_turns, in_window,
                                is_self_message, scrub)
from agent.prompt import Persona, PromptLimits, Turn, completion_text, render_prompt, turn_size
from feedback.models import Chat, Message
from trainer.examples import Example

log = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "Sample", "Counted", "BuildResult", "iter_samples", "count_samples", "build",
           "read_stats", "scrub", "Retriever"]

# facts for many queries at once: [(query, context)] -> for each, [(fact id, fact text)] (the fact drills' retrieval)
Retriever = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[tuple[str, str]]]]
DRILL_ASKER = "Friend"  # who asks the drill questions
FORMAT = 5  # bump when a sample's record or its facts retrieval changes, so an older build's sample cache is not reused
# (3: the recent context is embedded turn by turn, knowledge.index._context_vector; 4: the facts follow the newest message;
# 5: a sample's facts are retrieved where it is used, not in the build: its record holds the query and the turns)


@dataclass(frozen=True)
class DatasetConfig:
    context: ContextConfig = field(default_factory=ContextConfig, metadata={"help": "Turns, window, message cut: as the agent serves."})
    limits: PromptLimits = field(default_factory=PromptLimits, metadata={"help": "Prompt token budget: as the agent serves."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Most recent share of samples for validation."})
    skip_links_only: bool = field(default=True, metadata={"help": "Do not train on messages that are only links."})
    skip_forwarded: bool = field(default=True, metadata={"help": "Do not train on forwarded messages."})
    skip_media_only: bool = field(default=True, metadata={"help": "Do not train on media without text."})
    train_speakers: tuple[str, ...] = field(default=(), metadata={"help": "Other speakers whose turns are samples too."})
    batch_size: int = field(default=1024, metadata={"help": "Samples rendered (and facts retrieved) at a time."})
    drills_per_fact: int = field(default=3, metadata={"help": "Fact drills: questions about each fact, answered with it (0: none)."})
    drill_distractors: float = field(default=0.5, metadata={"help": "Share of drills whose prompt gets other facts beside the one asked about, that one at any place (0: none)."})

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")


_URL = re.compile(r"^\s*(?:(?:https?://|www\.)\S+\s*)+$", re.I)


@dataclass
class Sample:
    chat_id: int
    at: str
    speaker: str
    context: list[dict[str, Any]]
    reply: str
    owner: bool = True
    split: str = "train"


@dataclass
class Counted:
    turns: int = 0
    samples: int = 0
    filtered: Counter[str] = field(default_factory=Counter)


# --- from rows to turns ---

def _rows(chat_id: int, reset_at: datetime | None, after: tuple[datetime, int] | None = None,
          upto: datetime | None = None) -> Any:
    """A chat's rows in time order: from its context reset (or from the row ``after`` = (time,
    id), included), up to ``upto`` (included)."""
    q = select(Message.id, Message.sent_at, Message.sender_id, Message.sender_name, Message.is_owner, Message.text,
               Message.kind, Message.is_forwarded, Message.source).where(Message.chat_id == chat_id)
    if reset_at is not None:
        q = q.where(Message.sent_at >= reset_at)
    if upto is not None:
        q = q.where(Message.sent_at <= upto)
    if after is not None:
        q = q.where(or_(Message.sent_at > after[0], and_(Message.sent_at == after[0], Message.id >= after[1])))
    return q.order_by(Message.sent_at, Message.id)


def _said(session: Session, chat_id: int, reset_at: datetime | None, cfg: DatasetConfig, counted: Counted,
          after: tuple[datetime, int] | None = None, upto: datetime | None = None) -> Iterator[Said]:
    q = _rows(chat_id, reset_at, after, upto)
    ctx = cfg.context
    # through the connection (Core), not the ORM session: the same values, in half the time (200,000 rows: 0.59 s, 1.05 s)
    for row in session.connection().execute(q.order_by(Message.sent_at, Message.id)).yield_per(5000):
        is_self = is_self_message(row.source, row.is_owner)
        if row.kind == "service":
            if is_self:
                counted.filtered["service message"] += 1
            if not ctx.include_service:
                continue
        text = row.text or ""
        if not text.strip():
            if is_self:
                counted.filtered["empty message"] += 1
            continue
        reason = _reason(row.source, row.kind, row.is_forwarded, text, cfg)
        key = SELF_KEY if is_self else (row.sender_id or row.sender_name or "?")
        yield Said(row.sent_at, key, row.sender_name or row.sender_id or "someone", clean(text, ctx), is_self, reason,
                   row.id)


def _reason(source: str | None, kind: str | None, forwarded: bool | None, text: str, cfg: DatasetConfig) -> str | None:
    """Why the dataset may not learn from a stored message (None: it may); its context it stays."""
    if source == "twin":
        return "the twin's own reply"
    if kind == "media" and cfg.skip_media_only:
        return "media without text"
    if forwarded and cfg.skip_forwarded:
        return "forwarded message"
    if cfg.skip_links_only and _URL.match(text):
        return "link only"
    if kind == "service":
        return "service message"
    return None


def _target_speakers(cfg: DatasetConfig) -> set[str]:
    return {s.casefold() for s in cfg.train_speakers}


def _is_target(turn: TurnSpan, wanted: set[str]) -> bool:
    if turn.is_self:
        return True
    return bool(wanted) and (turn.key.casefold() in wanted or turn.speaker.casefold() in wanted)


@dataclass
class _Pending:
    chat_id: int
    at: datetime
    key: str
    speaker: str
    owner: bool
    context: list[TurnSpan]
    reply: str

    def turns(self) -> list[Turn]:
        # for another speaker's sample, that speaker is "self" (their own earlier turns are theirs)
        if self.owner:  # the owner's earlier turns that could be samples themselves are targets too
            return [t.owner_context() for t in self.context]
        return [Turn(t.speaker, t.text, t.key == self.key) for t in self.context]


def _pending(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None, counted: Counted) -> Iterator[_Pending]:
    q = select(Chat.id, Chat.context_reset_at).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    for chat_id, reset_at in session.execute(q).all():
        yield from _chat_pending(session, cfg, chat_id, reset_at, counted)


def _chat_pending(session: Session, cfg: DatasetConfig, chat_id: int, reset_at: datetime | None, counted: Counted,
                  start: tuple[list[TurnSpan], tuple[datetime, int]] | None = None,
                  upto: datetime | None = None) -> Generator[_Pending, None, list[TurnSpan]]:
    """One chat's samples, in time order. ``start`` = (the turns before a row, that row's (time,
    id)) resumes from that row with those turns as the history; ``upto`` stops after that time.
    Returns the history at the end: its newest ``max_turns + 1`` turns, at least."""
    wanted = _target_speakers(cfg)
    keep = 4 * cfg.context.max_turns
    history: list[TurnSpan] = list(start[0]) if start else []
    for turn in group_turns(_said(session, chat_id, reset_at, cfg, counted, start[1] if start else None, upto),
                            cfg.context.gap):
        if _is_target(turn, wanted):
            counted.turns += 1
            usable = [p for p in turn.parts if p.target_reason is None]
            for p in turn.parts:
                if p.target_reason is not None:
                    counted.filtered[p.target_reason] += 1
            context = in_window(history, turn.start, cfg.context)
            if not usable:
                pass
            elif not any(t.key != turn.key for t in context):
                counted.filtered["no one else wrote within the window"] += 1
            else:
                counted.samples += 1
                yield _Pending(chat_id, turn.start, turn.key, turn.speaker, turn.is_self, context,
                               "\n".join(p.text for p in usable))
        history.append(turn)
        if len(history) > keep:  # one more than the window can hold: the history before the newest turn stays whole
            del history[: len(history) - cfg.context.max_turns - 1]
    return history


def iter_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None,
                 counted: Counted | None = None) -> Iterator[Sample]:
    """Every sample of the stored history, chat by chat, in time order within a chat."""
    counted = counted if counted is not None else Counted()
    for p in _pending(session, cfg, chat_ids, counted):
        yield Sample(chat_id=p.chat_id, at=p.at.isoformat(), speaker=p.speaker,
                     context=[{"speaker": t.speaker, "text": t.text, "is_self": t.is_self} for t in p.turns()],
                     reply=p.reply, owner=p.owner)


def count_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None,
                  state: Path | None = None) -> Counted:
    """What ``iter_samples`` would count (turns, samples, what was left out and why), without
    building a turn, a context or a sample (the ingest summary runs it over every chat the ingest
    touched). With ``state`` (the last build's ``.state.npz``, made with ``cfg``), a chat that only
    grew since that build is counted from its stored counts and its new messages alone."""
    counted = Counted()
    chats = _known_chats(state, cfg) if state is not None else {}
    q = select(Chat.id, Chat.context_reset_at).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    rest: list[int] = []
    for chat_id, reset_at in session.execute(q).all():
        prev = chats.get(str(chat_id))
        part = _count_from(session, cfg, chat_id, reset_at, prev) if prev is not None else None
        if part is None:
            rest.append(chat_id)
        else:
            _add(counted, part)
    if rest:
        for _ in _sample_keys(session, cfg, rest, counted):
            pass
    return counted


def _sample_keys(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None,
                 counted: Counted, upto: dict[int, datetime] | None = None) -> Iterator[tuple[datetime, int]]:
    """(time, chat) of every sample ``_pending`` would make, counted into ``counted`` as it counts:
    a lean pass over the rows' times, speakers and kinds, with no turn, context or sample built (a
    test holds it to ``_pending``). 200,000 messages: 2.5 s through ``_pending``, ~1 s here."""
    filtered = counted.filtered
    found: list[tuple[Any, int]] = []
    wanted = _target_speakers(cfg)
    ctx = cfg.context
    gap, window, max_turns = ctx.gap, ctx.window, ctx.max_turns
    # the times as microseconds since 1970, computed by the database: integers to compare, where
    # datetimes were made from each row and subtracted (200,000 messages: ~40 % of this pass)
    sent = _epoch_us(session.get_bind().dialect.name)
    if sent is not None:
        gap, window = gap // _US, window // _US
    q = select(Chat.id, Chat.context_reset_at).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    for chat_id, reset_at in session.execute(q).all():
        rows = select(Message.sent_at if sent is None else sent, Message.sender_id, Message.sender_name,
                      Message.is_owner, Message.text, Message.kind, Message.is_forwarded,
                      Message.source).where(Message.chat_id == chat_id)
        if reset_at is not None:
            rows = rows.where(Message.sent_at >= reset_at)
        if upto is not None and chat_id in upto:
            rows = rows.where(Message.sent_at <= upto[chat_id])
        # the turns so far, newest last: (end, key); the current turn: its start, end, key, whether
        # it is a target, whether a part of it may be learnt from, its parts' reasons
        ends: list[datetime] = []
        keys: list[str] = []
        cur_key: str | None = None
        cur_start = cur_end = None
        cur_target = cur_usable = False
        cur_reasons: list[str] = []

        def close() -> None:
            if cur_target:
                counted.turns += 1
                for r in cur_reasons:
                    filtered[r] += 1
                if cur_usable:
                    other = False
                    n = len(ends)
                    for i in range(n - 1, max(-1, n - 1 - max_turns), -1):
                        if cur_start - ends[i] > window:
                            break
                        if keys[i] != cur_key:
                            other = True
                            break
                    if other:
                        counted.samples += 1
                        found.append((cur_start, chat_id))
                    else:
                        filtered["no one else wrote within the window"] += 1
            ends.append(cur_end)
            keys.append(cur_key)
            if len(ends) > 4 * max_turns:
                del ends[: len(ends) - max_turns], keys[: len(keys) - max_turns]

        for at, sender_id, sender_name, is_owner, text, kind, forwarded, source in \
                session.connection().execute(rows.order_by(Message.sent_at, Message.id)).yield_per(5000):  # Core: see _said
            is_self = is_self_message(source, is_owner)
            if kind == "service":
                if is_self:
                    filtered["service message"] += 1
                if not ctx.include_service:
                    continue
            if not text or not text.strip():
                if is_self:
                    filtered["empty message"] += 1
                continue
            reason = _reason(source, kind, forwarded, text, cfg)
            key = SELF_KEY if is_self else (sender_id or sender_name or "?")
            if cur_key is not None and key == cur_key and at - cur_end <= gap:
                cur_end = at
            else:
                if cur_key is not None:
                    close()
                    if found:
                        yield from found if sent is None else ((_UTC_EPOCH + _US * at, c) for at, c in found)
                        found.clear()
                speaker = sender_name or sender_id or "someone"
                cur_key, cur_start, cur_end, cur_reasons, cur_usable = key, at, at, [], False
                cur_target = is_self or (bool(wanted) and (key.casefold() in wanted or speaker.casefold() in wanted))
            if reason is None:
                cur_usable = True
            else:
                cur_reasons.append(reason)
        if cur_key is not None:
            close()
            yield from found if sent is None else ((_UTC_EPOCH + _US * at, c) for at, c in found)
            found.clear()


_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _epoch_us(dialect: str) -> Any:
    """A message's time in microseconds since 1970 (UTC) as SQL, for the databases Doppel stores in
    (None for another: the times are read as datetimes). SQLite holds the text SQLAlchemy's DateTime
    writes, 'YYYY-MM-DD HH:MM:SS.ffffff' (the ingest writes the same); PostgreSQL naive UTC."""
    if dialect == "sqlite":
        # the whole seconds apart: SQLite keeps times in milliseconds, and "…:39.999998" would read as :40
        return (cast(func.strftime("%s", func.substr(Message.sent_at, 1, 19)), BigInteger) * 1_000_000
                + cast(func.substr(Message.sent_at, 21, 6), BigInteger))
    if dialect == "postgresql":
        return cast(extract("epoch", Message.sent_at) * 1_000_000, BigInteger)
    return None


# --- the build ---

@dataclass
class BuildResult:
    path: Path
    fingerprint: str
    train: int
    validation: int
    counted: Counted
    with_query: int = 0  # samples with a message to retrieve facts for, where the sample is used
    reused: int = 0  # samples taken from the last build (its file or its cache) instead of rendered again
    chats_kept: int = 0  # chats whose samples were taken from the last build, new messages added to them


class _Sizes:
    """Each turn's token size, counted once (a turn is context for many samples)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def of(self, span: TurnSpan, turn: Turn) -> int:
        if span.is_self != turn.is_self:  # another speaker's sample sees this turn differently
            return turn_size(self.tokenizer, turn)
        if span.tokens is None:
            span.tokens = turn_size(self.tokenizer, turn)
        return span.tokens


_EPOCH = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)


def _us(at: datetime) -> int:
    """A time as microseconds, in the order the datetimes compare (a sample's split key)."""
    if at.tzinfo is not None:
        at = at.astimezone(timezone.utc).replace(tzinfo=None)
    return (at - _EPOCH) // _US


def _first_validation(at: Sequence[int] | np.ndarray, chat: Sequence[int] | np.ndarray,
                      fraction: float) -> tuple[int, int] | None:
    """The first (time, chat) key of validation: the newest ``fraction`` of samples is validation,
    and every sample from that key on (ties at the cut included)."""
    n = len(at)
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    if n_val == 0:
        return None
    order = np.lexsort((np.asarray(chat, dtype=np.int64), np.asarray(at, dtype=np.int64)))
    i = order[n - n_val]
    return int(at[i]), int(chat[i])


class _SampleCache:
    """Rendered samples, keyed by everything that shapes them (the sample's turns and reply, the
    settings, the persona, the tokenizer), so a build that must render a chat again (its older
    messages changed, or there is no build to continue) renders only the samples that changed. A full build writes a fresh cache of what it used; a build that continues
    the last one adds its new samples to the cache in place."""

    def __init__(self, path: Path, shape: str, append: bool = False) -> None:
        import sqlite3

        self.shape = shape
        self.path = path
        self.tmp = path.with_suffix(path.suffix + ".tmp")
        self.tmp.unlink(missing_ok=True)
        self.reused = 0
        self.append = append and path.is_file()
        if self.append:
            self.new = self.old = sqlite3.connect(path)
            self.new.execute("CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, line TEXT NOT NULL)")
            return
        self.old = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if path.is_file() else None
        self.new = sqlite3.connect(self.tmp)
        self.new.execute("PRAGMA journal_mode=OFF")
        self.new.execute("PRAGMA synchronous=OFF")
        self.new.execute("CREATE TABLE samples (key TEXT PRIMARY KEY, line TEXT NOT NULL)")

    def key(self, p: _Pending, turns: Sequence[Turn]) -> str:
        h = hashlib.blake2b(self.shape.encode(), digest_size=16)
        h.update(json.dumps([p.chat_id, p.at.isoformat(), p.speaker, p.owner, p.reply,
                             [(t.speaker, t.text, t.is_self, t.target) for t in turns]], ensure_ascii=False).encode())
        return h.hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        if self.old is None or not keys:
            return {}
        rows: list[tuple[str, str]] = []
        try:
            for i in range(0, len(keys), 500):  # SQLite takes at most 999 parameters a statement
                chunk = list(keys[i:i + 500])
                rows += self.old.execute(f"SELECT key, line FROM samples WHERE key IN ({','.join('?' * len(chunk))})",
                                         chunk).fetchall()
        except Exception as exc:  # an unreadable cache is only a slower build
            log.warning("the sample cache %s could not be read (%s); rendering every sample", self.path, exc)
            return {}
        self.reused += len(rows)
        return dict(rows)

    def put(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.new.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?)", pairs)
        if self.append:  # in place: short transactions, so a build killed half-way leaves no big rollback journal
            self.new.commit()

    def close(self, keep: bool) -> None:
        if self.append:
            if keep:
                self.new.commit()
            else:
                self.new.rollback()
            self.new.close()
            return
        if self.old is not None:
            self.old.close()
        self.new.commit()
        self.new.close()
        if keep:
            # a rollback journal left beside the old file by a killed build would be played back into this one
            Path(f"{self.path}-journal").unlink(missing_ok=True)
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# --- continuing the last build ---
#
# Beside the JSONL, ``<name>.state.npz`` holds what lets the next build continue this one instead of
# reading every message again: an index of the JSONL's lines (chat, time, length, whether it carries
# facts) and, for each chat, the newest message time the build read, a check of the rows up to it
# (count, sum and largest id: the stored history only grows by ingest and live chat, and deletions
# by ``doppel forget`` drop this file), the row where the chat's last turn starts (a later message
# can still join that turn) with the turns before it, and the counts before it. A chat whose rows
# up to that time are unchanged is continued from that row: its earlier lines are copied from the
# JSONL, the rest rendered. Anything else (other settings, other facts, a changed chat, a JSONL
# edited since) is built afresh, through the sample cache.

_STATE_FORMAT = 1


class _StaleState(Exception):
    """The last build's state does not describe its JSONL after all (it is then built afresh)."""

_RESUME_MAX_ROWS = 50_000  # more new rows than this in a chat: stream it afresh (the continued part is held in memory)


def _counted_json(c: Counted) -> dict[str, Any]:
    return {"turns": c.turns, "samples": c.samples, "filtered": dict(c.filtered)}


def _counted_of(d: dict[str, Any]) -> Counted:
    return Counted(int(d["turns"]), int(d["samples"]), Counter({k: int(v) for k, v in d["filtered"].items()}))


def _add(total: Counted, part: Counted) -> None:
    total.turns += part.turns
    total.samples += part.samples
    total.filtered.update(part.filtered)


def _minus(a: Counted, b: Counted) -> Counted:
    filtered = Counter({k: v - b.filtered.get(k, 0) for k, v in a.filtered.items() if v - b.filtered.get(k, 0)})
    return Counted(a.turns - b.turns, a.samples - b.samples, filtered)


def _turn_json(t: TurnSpan) -> list[Any]:
    return [t.start.isoformat(), t.end.isoformat(), t.key, t.speaker, t.is_self,
            [[p.at.isoformat(), p.key, p.speaker, p.text, p.is_self, p.target_reason, p.id] for p in t.parts]]


def _turn_of(j: list[Any]) -> TurnSpan:
    parts = [Said(datetime.fromisoformat(a), k, n, text, s, r, i) for a, k, n, text, s, r, i in j[5]]
    return TurnSpan(datetime.fromisoformat(j[0]), datetime.fromisoformat(j[1]), j[2], j[3], j[4], parts)


def _newest(session: Session, chat_id: int, reset_at: datetime | None) -> datetime | None:
    """The time of a chat's newest message since its context reset (None: it has none)."""
    q = select(func.max(Message.sent_at)).where(Message.chat_id == chat_id)
    if reset_at is not None:
        q = q.where(Message.sent_at >= reset_at)
    return session.execute(q).scalar()  # type: ignore[no-any-return]


def _resume_start(prev: dict[str, Any]) -> tuple[list[TurnSpan], tuple[datetime, int]]:
    """Where a chat's state resumes: (the turns before its last turn, that turn's first row)."""
    return [_turn_of(j) for j in prev["history"]], (datetime.fromisoformat(prev["resume"][0]), int(prev["resume"][1]))


def _check(session: Session, chat_id: int, reset_at: datetime | None, upto: datetime) -> list[int]:
    q = select(func.count(Message.id), func.coalesce(func.sum(Message.id), 0), func.coalesce(func.max(Message.id), 0)) \
        .where(Message.chat_id == chat_id, Message.sent_at <= upto)
    if reset_at is not None:
        q = q.where(Message.sent_at >= reset_at)
    return [int(x) for x in session.execute(q).one()]


def _chat_state(session: Session, cfg: DatasetConfig, chat_id: int, reset_at: datetime | None, upto: datetime,
                check: list[int], history: list[TurnSpan], total: Counted) -> dict[str, Any]:
    """What continues a chat: the row where its last turn starts, the turns before it, and the
    counts before it (its total, less what a pass from that row counts)."""
    state: dict[str, Any] = {"reset": reset_at.isoformat() if reset_at else None, "upto": upto.isoformat(),
                             "check": check, "total": _counted_json(total), "resume": None, "history": [],
                             "before": _counted_json(total)}
    if not history or history[-1].parts[0].id is None:
        return state
    last = history[-1].parts[0]
    before = history[:-1][-cfg.context.max_turns:]
    tail = Counted()
    for _ in _chat_pending(session, cfg, chat_id, reset_at, tail, (before, (last.at, last.id)), upto):
        pass
    state.update(resume=[last.at.isoformat(), last.id], history=[_turn_json(t) for t in before],
                 before=_counted_json(_minus(total, tail)))
    return state


def _load_state(path: Path, out: Path, shape_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The last build's state, if it describes ``out`` as it is and was made with these settings."""
    try:
        st = out.stat()
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["state"].tobytes().decode("utf-8"))
            index = {k: z[k] for k in ("chat", "at", "length", "facts")}
    except FileNotFoundError:
        return None
    except Exception as exc:  # an unreadable state is only a slower build
        log.warning("the dataset state %s could not be read (%s); building afresh", path, exc)
        return None
    if meta.get("format") != _STATE_FORMAT or meta.get("shape") != shape_id:
        return None
    if meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns or int(index["length"].sum()) != st.st_size:
        return None
    return meta, index


def _config_id(cfg: DatasetConfig) -> str:
    return hashlib.blake2b(json.dumps(asdict(cfg), sort_keys=True, default=list).encode(), digest_size=16).hexdigest()


def _known_chats(path: Path, cfg: DatasetConfig) -> dict[str, Any]:
    """The per-chat part of a build's state, if that build used ``cfg`` (the counts need nothing
    else: not the JSONL, not the facts)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["state"].tobytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except Exception as exc:
        log.warning("the dataset state %s could not be read (%s); counting afresh", path, exc)
        return {}
    if meta.get("format") != _STATE_FORMAT or meta.get("config") != _config_id(cfg):
        return {}
    return dict(meta.get("chats") or {})


def _count_from(session: Session, cfg: DatasetConfig, chat_id: int, reset_at: datetime | None,
                prev: dict[str, Any]) -> Counted | None:
    """A chat's counts from its state in the last build and the messages after it; None when the
    chat changed otherwise (it is counted from its rows)."""
    if prev["reset"] != (reset_at.isoformat() if reset_at else None):
        return None
    upto = _newest(session, chat_id, reset_at)
    if upto is None:
        return None
    old_upto = datetime.fromisoformat(prev["upto"])
    if upto < old_upto or _check(session, chat_id, reset_at, old_upto) != prev["check"]:
        return None
    if upto == old_upto:
        return _counted_of(prev["total"])
    if prev["resume"] is None:
        return None
    counted = _counted_of(prev["before"])
    for _ in _chat_pending(session, cfg, chat_id, reset_at, counted, _resume_start(prev), upto):
        pass
    return counted


class _Lines:
    """The index of one section of the JSONL as it is written: each line's chat, time, length and
    whether it carries facts."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.cur: tuple[array, array, array, array] = (array("q"), array("q"), array("q"), array("b"))

    def add(self, chat: int, at: int, length: int, facts: bool) -> None:
        c, a, n, f = self.cur
        c.append(chat)
        a.append(at)
        n.append(length)
        f.append(facts)

    def extend(self, chat: np.ndarray, at: np.ndarray, length: np.ndarray, facts: np.ndarray) -> None:
        self._close()
        self.parts.append((chat, at, length, facts))

    def _close(self) -> None:
        if len(self.cur[0]):
            self.parts.append(tuple(np.frombuffer(x, dtype=d).copy()
                                    for x, d in zip(self.cur, (np.int64, np.int64, np.int64, np.int8))))
            self.cur = (array("q"), array("q"), array("q"), array("b"))

    def arrays(self) -> list[np.ndarray]:
        self._close()
        if not self.parts:
            return [np.zeros(0, dtype=d) for d in (np.int64, np.int64, np.int64, np.int8)]
        return [np.concatenate([p[i] for p in self.parts]) for i in range(4)]


def _drain(gen: Generator[_Pending, None, list[TurnSpan]]) -> tuple[list[_Pending], list[TurnSpan]]:
    items: list[_Pending] = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


@dataclass
class _Plan:
    chat_id: int
    reset_at: datetime | None
    upto: datetime
    check: list[int]
    mode: str  # "same": copied whole; "resume": copied up to its last turn, continued from there; "full"
    prev: dict[str, Any] | None = None
    old: np.ndarray | None = None  # the old lines it keeps (indices into the last build's index)
    new: list[_Pending] = field(default_factory=list)  # a continued chat's new samples
    history: list[TurnSpan] = field(default_factory=list)
    counted: Counted = field(default_factory=Counted)


def build(session: Session, cfg: DatasetConfig, tokenizer: Any, persona: Persona, out: Path,
          progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> BuildResult:
    """Write the training set as JSONL (train, then validation) with a
    fingerprint. A sample of the history is written with the prompt its turns make without facts,
    the turns it starts from and the query the agent would retrieve facts for: the facts are
    retrieved where the sample is used (``trainer.examples.with_facts``: the few thousand a training
    run takes, not every turn of years of chat), from the facts file as it is then; the run makes
    the fact drills too (``drill_examples``). The build never loads an embedding model.

    With the same settings and facts as the last build, a chat that only grew is continued (its
    older samples copied from the last JSONL, see "continuing the last build"), and a sample the
    last build rendered is taken from its cache: the output is byte for byte what a build from
    scratch makes."""
    counted = Counted()
    # the tokenizer by its folder's name, not its path: a data directory moved keeps its cache
    shape = json.dumps([FORMAT, asdict(cfg), asdict(persona), Path(getattr(tokenizer, "name_or_path", "") or "").name,
                        getattr(tokenizer, "chat_template", ""), len(tokenizer)],
                       sort_keys=True, default=list)
    shape_id = hashlib.blake2b(shape.encode(), digest_size=16).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_suffix(".state.npz")
    loaded = _load_state(state_path, out, shape_id)
    old_chats: dict[str, Any] = loaded[0]["chats"] if loaded else {}
    old_index = loaded[1] if loaded else None
    old_train_lines = int(loaded[0]["train_lines"]) if loaded else 0

    # which chats continue the last build, which are built afresh
    plans: list[_Plan] = []
    for chat_id, reset_at in session.execute(select(Chat.id, Chat.context_reset_at).order_by(Chat.id)).all():
        upto = _newest(session, chat_id, reset_at)
        if upto is None:
            continue
        check = _check(session, chat_id, reset_at, upto)
        plan = _Plan(chat_id, reset_at, upto, check, "full")
        prev = old_chats.get(str(chat_id))
        if prev is not None and prev["reset"] == (reset_at.isoformat() if reset_at else None):
            if prev["upto"] == upto.isoformat() and prev["check"] == check:
                plan.mode, plan.prev = "same", prev
            elif (prev["resume"] is not None and datetime.fromisoformat(prev["upto"]) < upto
                  and check[0] - prev["check"][0] <= _RESUME_MAX_ROWS
                  and _check(session, chat_id, reset_at, datetime.fromisoformat(prev["upto"])) == prev["check"]):
                plan.mode, plan.prev = "resume", prev
        plans.append(plan)

    # every sample's (time, chat) key, for the time split: the kept lines', a continued chat's new
    # samples' (rendered later, held until then), and a lean pass over the chats built afresh
    keys_at: list[np.ndarray] = []
    keys_chat: list[np.ndarray] = []
    if old_index is not None:
        o_chat, o_at, o_len, o_facts = old_index["chat"], old_index["at"], old_index["length"], old_index["facts"]
        o_off = np.concatenate([[0], np.cumsum(o_len)[:-1]]).astype(np.int64) if len(o_len) else np.zeros(0, np.int64)
    for plan in plans:
        if plan.mode == "full":
            continue
        assert old_index is not None and plan.prev is not None
        mine = np.nonzero(o_chat == plan.chat_id)[0]  # in file order: train lines, then validation lines: time order
        if plan.mode == "resume":
            # the lines before the resume row, by count, not by time: a turn before it may start in the same second
            mine = mine[: int(plan.prev["before"]["samples"])]
            plan.counted = _counted_of(plan.prev["before"])
            plan.new, plan.history = _drain(_chat_pending(
                session, cfg, plan.chat_id, plan.reset_at, plan.counted, _resume_start(plan.prev), plan.upto))
            keys_at.append(np.array([_us(p.at) for p in plan.new], dtype=np.int64))
            keys_chat.append(np.full(len(plan.new), plan.chat_id, dtype=np.int64))
        else:
            plan.counted = _counted_of(plan.prev["total"])
        plan.old = mine
        keys_at.append(o_at[mine])
        keys_chat.append(o_chat[mine])
    afresh = {p.chat_id: p.upto for p in plans if p.mode == "full"}
    if afresh:
        fresh_keys = list(_sample_keys(session, cfg, list(afresh), Counted(), upto=afresh))
        keys_at.append(np.array([_us(at) for at, _ in fresh_keys], dtype=np.int64))
        keys_chat.append(np.array([c for _, c in fresh_keys], dtype=np.int64))
        del fresh_keys
    all_at = np.concatenate(keys_at) if keys_at else np.zeros(0, np.int64)
    all_chat = np.concatenate(keys_chat) if keys_chat else np.zeros(0, np.int64)
    first_val = _first_validation(all_at, all_chat, cfg.validation_fraction)
    if total is not None:  # what ``progress`` will count up to (the drills come after)
        total(len(all_at))
    del keys_at, keys_chat, all_at, all_chat

    def is_val(at: int, chat: int) -> bool:
        return first_val is not None and (at, chat) >= first_val

    kept = any(p.mode != "full" for p in plans)
    cache = _SampleCache(out.with_suffix(".cache.sqlite"), shape, append=kept)
    sizes = _Sizes(tokenizer)
    tmp_train = out.with_suffix(out.suffix + ".tmp")
    tmp_val = out.with_suffix(out.suffix + ".val.tmp")
    h = hashlib.sha256()
    with_query = 0
    copied = 0
    written = {"train": 0, "validation": 0}
    train_lines, val_lines = _Lines(), _Lines()
    try:
        with tmp_train.open("wb") as f_train, tmp_val.open("wb") as f_val, \
                (out.open("rb") if old_index is not None and kept else open(os.devnull, "rb")) as f_old:

            def emit(line: str, chat: int, at: int, val: bool, has_facts: bool) -> None:
                nonlocal with_query
                data = (line + "\n").encode("utf-8")
                if val:
                    f_val.write(data)
                    val_lines.add(chat, at, len(data), has_facts)
                else:
                    f_train.write(data)
                    h.update(data)
                    train_lines.add(chat, at, len(data), has_facts)
                written["validation" if val else "train"] += 1
                with_query += has_facts

            def copy(idx: np.ndarray, val: bool) -> None:
                """Old lines that keep their split: one run of the old file, copied as bytes."""
                nonlocal with_query, copied
                if not len(idx):
                    return
                if int(idx[-1]) - int(idx[0]) + 1 != len(idx):
                    raise _StaleState("a chat's lines in the last build are not one run")
                check_line(int(idx[0]))
                check_line(int(idx[-1]))
                f_old.seek(int(o_off[idx[0]]))
                left = int(o_off[idx[-1]] + o_len[idx[-1]] - o_off[idx[0]])
                while left:
                    chunk = f_old.read(min(left, 1 << 20))
                    if not chunk:
                        raise _StaleState(f"{out} is shorter than its index says")
                    (f_val if val else f_train).write(chunk)
                    if not val:
                        h.update(chunk)
                    left -= len(chunk)
                (val_lines if val else train_lines).extend(o_chat[idx], o_at[idx], o_len[idx], o_facts[idx])
                written["validation" if val else "train"] += len(idx)
                with_query += int(o_facts[idx].sum())
                copied += len(idx)

            def check_line(i: int) -> None:
                """That line ``i`` of the index is where the index says, and of its chat."""
                f_old.seek(int(o_off[i]))
                head = f_old.read(min(int(o_len[i]), 160))
                if not head.startswith(b'{"at": "') or f'"chat_id": {int(o_chat[i])},'.encode() not in head:
                    raise _StaleState(f"line {i + 1} is not where the index says, or not of chat {int(o_chat[i])}")
                f_old.seek(int(o_off[i] + o_len[i] - 1))
                if f_old.read(1) != b"\n":
                    raise _StaleState(f"line {i + 1} does not end where the index says")

            def move(idx: np.ndarray, val: bool) -> None:
                """Old lines whose split changed (the time split moved on): rewritten one by one."""
                nonlocal copied
                was, now = ('"split": "train"', '"split": "validation"') if val else ('"split": "validation"', '"split": "train"')
                for i in idx:
                    check_line(int(i))
                    f_old.seek(int(o_off[i]))
                    line = f_old.read(int(o_len[i])).decode("utf-8").rstrip("\n").replace(was, now, 1)
                    emit(line, int(o_chat[i]), int(o_at[i]), val, bool(o_facts[i]))
                copied += len(idx)

            batch: list[_Pending] = []

            def flush() -> None:
                if not batch:
                    return
                turns_of = [p.turns() for p in batch]
                keys = [cache.key(p, t) for p, t in zip(batch, turns_of)]
                known = cache.get(keys)
                fresh: list[tuple[str, str]] = []
                for p, turns, key in zip(batch, turns_of, keys):
                    at = _us(p.at)
                    val = is_val(at, p.chat_id)
                    line = known.get(key)
                    if line is not None:
                        if val:
                            line = line.replace('"split": "train"', '"split": "validation"', 1)
                        emit(line, p.chat_id, at, val, '"query": null' not in line)
                        fresh.append((key, line.replace('"split": "validation"', '"split": "train"', 1)))
                        continue
                    who = persona if p.owner else Persona(p.speaker, "")
                    prompt = render_prompt(tokenizer, who, [], turns, cfg.limits,
                                           sizes=[sizes.of(s, t) for s, t in zip(p.context, turns)])
                    query = facts_query(turns)
                    completion = completion_text(tokenizer, p.reply)
                    # the turns the prompt starts from, as stored (the newest uncut): with the facts retrieved
                    # for ``query`` they render the prompt the agent would have built (trainer.examples.with_facts)
                    kept = turns[len(turns) - len(prompt.turns):]
                    record = {"chat_id": p.chat_id, "at": p.at.isoformat(), "speaker": p.speaker, "owner": p.owner,
                              "split": "validation" if val else "train", "reply": p.reply, "prompt": prompt.text,
                              "completion": completion, "query": [query[0], query[1]] if query else None,
                              "turns": [[t.speaker, t.text, t.is_self, t.target] for t in kept],
                              "targets": [list(t) for t in prompt.targets], "prompt_tokens": prompt.token_count,
                              "completion_tokens": len(tokenizer.encode(completion, add_special_tokens=False))}
                    line = json.dumps(record, ensure_ascii=False, sort_keys=True)
                    emit(line, p.chat_id, at, val, query is not None)
                    fresh.append((key, line if not val else line.replace('"split": "validation"', '"split": "train"', 1)))
                cache.put(fresh)
                if progress:
                    progress(len(batch))
                batch.clear()

            def add(p: _Pending) -> None:
                batch.append(p)
                if len(batch) >= cfg.batch_size:
                    flush()

            for plan in plans:
                if plan.mode == "full":
                    gen = _chat_pending(session, cfg, plan.chat_id, plan.reset_at, plan.counted, upto=plan.upto)
                    while True:
                        try:
                            add(next(gen))
                        except StopIteration as stop:
                            plan.history = stop.value
                            break
                    continue
                flush()  # what is rendered so far goes before these lines
                idx = plan.old
                assert idx is not None
                # the kept lines in time order: the old train lines (the first n_old of them), then the old
                # validation lines; the first val_from of them are train now
                n_old = int(np.searchsorted(idx, old_train_lines))
                if first_val is None:
                    val_from = len(idx)
                else:
                    val_from = int(np.searchsorted(o_at[idx], first_val[0],
                                                   "right" if plan.chat_id < first_val[1] else "left"))
                copy(idx[: min(val_from, n_old)], False)
                move(idx[n_old:val_from], False)
                move(idx[val_from:n_old], True)
                copy(idx[max(val_from, n_old):], True)
                if progress:
                    progress(len(idx))
                for p in plan.new:
                    add(p)
                flush()
            flush()
        with tmp_train.open("ab") as f_train, tmp_val.open("rb") as f_val:
            while chunk := f_val.read(1 << 20):
                h.update(chunk)
                f_train.write(chunk)
        os.unlink(tmp_val)
        h.update(json.dumps(asdict(cfg), sort_keys=True, default=list).encode())
        fingerprint = h.hexdigest()[:16]
        states = {}
        for plan in plans:
            if plan.mode == "same":
                states[str(plan.chat_id)] = plan.prev
            else:
                states[str(plan.chat_id)] = _chat_state(session, cfg, plan.chat_id, plan.reset_at, plan.upto,
                                                        plan.check, plan.history, plan.counted)
            _add(counted, plan.counted)
        tmp_train.replace(out)  # atomic: a crash never leaves half a dataset
        _save_state(state_path, out, shape_id, cfg, fingerprint, states, train_lines, val_lines, written["train"])
    except BaseException as exc:
        cache.close(keep=False)
        tmp_val.unlink(missing_ok=True)
        if isinstance(exc, _StaleState):  # the last build's state does not describe its JSONL: build afresh
            log.warning("the dataset state %s does not match %s (%s); building afresh", state_path, out, exc)
            state_path.unlink(missing_ok=True)
            return build(session, cfg, tokenizer, persona, out, progress, total)
        raise
    cache.close(keep=True)
    reused = cache.reused + copied
    meta = {"fingerprint": fingerprint, "config": asdict(cfg), "train": written["train"],
            "validation": written["validation"], "with_query": with_query, "reused": reused,
            "filtered": dict(counted.filtered), "built_at": datetime.now().astimezone().isoformat()}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2, default=list), encoding="utf-8")
    return BuildResult(out, fingerprint, written["train"], written["validation"], counted, with_query, reused,
                       sum(p.mode != "full" for p in plans))


def _save_state(path: Path, out: Path, shape_id: str, cfg: DatasetConfig, fingerprint: str, chats: dict[str, Any],
                train: _Lines, val: _Lines, train_lines: int) -> None:
    st = out.stat()
    meta = {"format": _STATE_FORMAT, "shape": shape_id, "config": _config_id(cfg), "fingerprint": fingerprint,
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "train_lines": train_lines, "chats": chats}
    t, v = train.arrays(), val.arrays()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, chat=np.concatenate([t[0], v[0]]), at=np.concatenate([t[1], v[1]]),
             length=np.concatenate([t[2], v[2]]), facts=np.concatenate([t[3], v[3]]),
             state=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8))
    tmp.replace(path)


def drill_examples(tokenizer: Any, persona: Persona, cfg: DatasetConfig, retrieve: Retriever,
                   facts: Sequence[tuple[str, str, str]], owner_replies: Sequence[str]) -> list[Example]:
    """Fact drills, made by a training run from the facts file as it is then: each question with the
    facts the agent would retrieve for it, answered with the drilled fact in the owner's style
    (``owner_replies``: theirs from the training set); left out when retrieval misses it."""
    from trainer.drills import Style, answer, drills

    if cfg.drills_per_fact <= 0 or not facts:
        return []
    style = Style.of(owner_replies)
    asked = drills(facts, "train", cfg.drills_per_fact)
    got = retrieve([(d.question, []) for d in asked])
    by_id = {fid: (text, topic) for fid, text, topic in facts}
    out = []
    for d, fs in zip(asked, got):
        if d.fact_id not in [i for i, _ in fs]:
            continue
        fs = with_distractors(fs, d.fact_id, by_id, cfg.drill_distractors, f"{d.fact_id}\n{d.question}")
        turns = [Turn(DRILL_ASKER, clean(d.question, cfg.context))]
        prompt = render_prompt(tokenizer, persona, [t for _, t in fs], turns, cfg.limits)
        out.append(Example(prompt.text, completion_text(tokenizer, answer(d.fact, style)), source="drill",
                           drill=d.fact_id, fact_ids=tuple(i for i, _ in fs)))
    return out


DRILL_FACTS = 3  # facts a drill's prompt holds at most (the most an owner's facts_top_k is likely to be; the default is 1)


def with_distractors(fs: list[tuple[str, str]], drilled: str, facts: dict[str, tuple[str, str]], share: float,
                     seed: str) -> list[tuple[str, str]]:
    """A drill's facts with, for ``share`` of the drills, other facts beside the drilled one, which
    lands at any place among them, first included. The retrieval ranks the fact asked about first for
    nearly every drill question (they are its own words turned around), so without this the drills
    teach "say the first fact". An earlier version never put it first, and that taught the opposite:
    asked with three facts in the prompt and the right one first, the trained twin stated it 2 times
    of 7 and another fact the other 5. The others come from the drilled fact's own topic first (the
    near misses a real question meets), then any."""
    rng = random.Random(seed)  # the same drill gets the same facts at every build
    if share <= 0 or rng.random() >= share or len(facts) < 2:
        return fs
    have = {i for i, _ in fs}
    topic = facts.get(drilled, ("", ""))[1]
    near = [i for i, (_, t) in facts.items() if i not in have and t == topic]
    far = [i for i, (_, t) in facts.items() if i not in have and t != topic]
    rng.shuffle(near)
    rng.shuffle(far)
    room = DRILL_FACTS - len(fs)
    add = (near + far)[: rng.randint(1, room)] if room > 0 else []
    others = [f for f in fs if f[0] != drilled] + [(i, facts[i][0]) for i in add]
    if not others:
        return fs
    at = rng.randint(0, len(others))  # any place, first included
    return others[:at] + [(drilled, facts[drilled][0])] + others[at:]


def read_stats(path: Path) -> dict[str, Any]:
    """Counts and token-length histogram of a built set."""
    splits: Counter[str] = Counter()
    lengths: list[int] = []
    for line in path.open(encoding="utf-8"):
        rec = json.loads(line)
        splits[rec["split"]] += 1
        lengths.append(rec["prompt_tokens"] + rec["completion_tokens"])
    edges = [0, 64, 128, 256, 512, 1024, 2048, 10**9]
    hist: Counter[tuple[int, int]] = Counter()
    for n in lengths:
        for lo, hi in zip(edges, edges[1:]):
            if lo <= n < hi:
                hist[(lo, hi)] += 1
    return {"splits": dict(splits), "total": len(lengths),
            "histogram": [(lo, hi, hist[(lo, hi)]) for lo, hi in zip(edges, edges[1:])],
            "max_tokens": max(lengths, default=0), "mean_tokens": (sum(lengths) / len(lengths)) if lengths else 0}
