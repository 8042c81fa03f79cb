"""The conversation as the model sees it: stored messages -> turns -> the time window -> the facts
query. ``Agent.reply`` and the dataset builder both go through here (DESIGN promise 1), so a
history renders the same way in training and in service.

- A *turn* is one speaker's consecutive messages within ``turn_gap_minutes``, joined by newlines.
  The twin's side (its own replies, and the owner's messages in ingested history) is one speaker.
- The *window* is the turns that ended at most ``window_hours`` before the reply starts, at most
  ``max_turns`` of them.
- The *facts query* is the newest turn someone else wrote, nudged by the two turns before it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.prompt import Turn

SELF_KEY = "\x00self"  # the twin's side of a conversation is one speaker, whatever ids it wrote under


@dataclass(frozen=True)
class ContextConfig:
    window_hours: float = 3.0
    max_turns: int = 16
    max_message_chars: int = 1000
    turn_gap_minutes: float = 5.0
    scrub_pii: bool = False
    include_service: bool = False  # service messages (joins, pins, calls) as context

    def __post_init__(self) -> None:
        if self.window_hours <= 0:
            raise ValueError("window_hours must be > 0")
        if self.max_turns < 1:
            raise ValueError("max_turns must be >= 1")

    @property
    def window(self) -> timedelta:
        return timedelta(hours=self.window_hours)

    @property
    def gap(self) -> timedelta:
        return timedelta(minutes=self.turn_gap_minutes)


# --- PII ---
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w])\+?\d[\d ()-]{7,}\d(?![\w])")


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub(text: str) -> str:
    """E-mail addresses, card numbers (Luhn-valid) and phone numbers replaced by placeholders."""
    if "@" in text:
        text = _EMAIL.sub("[email]", text)
    if any(c.isdigit() for c in text):
        text = _CARD.sub(lambda m: "[card]" if _luhn(re.sub(r"\D", "", m.group())) else m.group(), text)
        text = _PHONE.sub("[phone]", text)
    return text


def cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def clean(text: str, cfg: ContextConfig) -> str:
    """A message's text as every prompt shows it."""
    return cut(scrub(text) if cfg.scrub_pii else text, cfg.max_message_chars)


def is_self_message(source: str | None, is_owner: bool) -> bool:
    """The twin's side: its own replies, and the owner's messages in ingested history. The owner
    writing live to the twin is someone talking to it."""
    return source == "twin" or (source == "ingest" and bool(is_owner))


@dataclass
class Said:
    """One stored message, as the conversation sees it."""

    at: datetime
    key: str  # who wrote it (SELF_KEY for the twin's side)
    speaker: str
    text: str  # already cleaned
    is_self: bool
    target_reason: str | None = None  # why the dataset may not learn from it (None: it may)
    id: int | None = None  # the stored row's id, where it has one (the dataset builder resumes from a row)


@dataclass
class TurnSpan:
    start: datetime
    end: datetime
    key: str
    speaker: str
    is_self: bool
    parts: list[Said] = field(default_factory=list)
    tokens: int | None = None  # the prompt builder's size of this turn, once counted
    # the joined text, kept with the number of parts it joined (a turn is context for many samples)
    _text: tuple[int, str] = field(default=(-1, ""), repr=False, compare=False)
    _owner: tuple[int, Turn] | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        n, text = self._text
        if n != len(self.parts):
            text = "\n".join(p.text for p in self.parts)
            self._text = (len(self.parts), text)
        return text

    def turn(self, is_self: bool | None = None) -> Turn:
        return Turn(self.speaker, self.text, self.is_self if is_self is None else is_self)

    def owner_context(self) -> Turn:
        """This (finished) turn as context of an owner's sample: the owner's turns that could be
        samples themselves are targets too. Made once; a turn is context for many samples."""
        done = self._owner
        if done is None or done[0] != len(self.parts):
            turn = Turn(self.speaker, self.text, self.is_self,
                        self.is_self and all(p.target_reason is None for p in self.parts))
            done = self._owner = (len(self.parts), turn)
        return done[1]


def group_turns(messages: Iterable[Said], gap: timedelta) -> Iterator[TurnSpan]:
    """Consecutive messages of one speaker within ``gap`` of each other are one turn."""
    cur: TurnSpan | None = None
    for m in messages:
        if cur is not None and m.key == cur.key and m.at - cur.end <= gap:
            cur.parts.append(m)
            cur.end = m.at
            continue
        if cur is not None:
            yield cur
        cur = TurnSpan(m.at, m.at, m.key, m.speaker, m.is_self, [m])
    if cur is not None:
        yield cur


def in_window(history: Sequence[TurnSpan], now: datetime, cfg: ContextConfig) -> list[TurnSpan]:
    """The turns that ended within the window before ``now``, the newest ``max_turns`` of them."""
    window = cfg.window
    out: list[TurnSpan] = []
    for t in reversed(history):
        if now - t.end > window or len(out) >= cfg.max_turns:
            break
        out.append(t)
    out.reverse()
    return out


def facts_query(turns: Sequence[Turn]) -> tuple[str, list[str]] | None:
    """What the facts are retrieved for: the newest turn someone else wrote, and up to two turns
    before it as context. None when no one else wrote."""
    for i in range(len(turns) - 1, -1, -1):
        if not turns[i].is_self:
            return turns[i].text, [t.text for t in turns[max(0, i - 2):i]]
    return None
