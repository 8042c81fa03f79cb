"""What every parser produces: chats, each with a lazy stream of normalized messages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MAX_SKIP_REASONS = 32  # a hostile file must not grow the summary (and the imports row) without bound


@dataclass(slots=True)
class RawMessage:
    sent_at: datetime  # timezone-aware
    sender_id: str | None
    sender_name: str | None
    text: str
    kind: str = "text"  # text | media | service
    platform_message_id: str | None = None
    reply_to: str | None = None
    is_forwarded: bool = False
    edited_at: datetime | None = None


@dataclass
class ChatStream:
    """One chat of an export. ``messages`` is lazy: consume it before asking for the next chat."""

    platform: str
    external_id: str
    title: str | None
    kind: str  # private | group
    messages: Iterator[RawMessage]


@dataclass
class ParseStats:
    """What a parser dropped, by reason; shown in the ingest summary."""

    skipped: Counter[str] = field(default_factory=Counter)
    owner_hint: str | None = None  # e.g. Telegram's personal_information user id

    def skip(self, reason: str, n: int = 1) -> None:
        if reason not in self.skipped and len(self.skipped) >= MAX_SKIP_REASONS - 1:
            reason = "other reasons"
        self.skipped[reason] += n


def as_str(value: Any) -> str | None:
    """A JSON value that should be a string (a name, a text): itself, else None."""
    return value if value.__class__ is str else None


def as_id(value: Any) -> str | None:
    """A JSON value that should be an id: a string or an integer, as a string; else None."""
    if value.__class__ is str:
        return value
    if value.__class__ is int:
        return str(value)
    return None


def describe(value: Any) -> str:
    """A short repr of a value from a file, for a skip reason."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def speaker_key(sender_id: str | None, sender_name: str | None) -> str:
    return sender_id or sender_name or "?"


def matches_speaker(who: str, sender_id: str | None, sender_name: str | None) -> bool:
    """Does ``who`` (a name or id given by the user) name this sender?"""
    w = who.strip().casefold()
    if not w:
        return False
    if sender_name and sender_name.strip().casefold() == w:
        return True
    if sender_id:
        sid = sender_id.casefold()
        if sid == w or sid == f"user{w}":
            return True
    return False
