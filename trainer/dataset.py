"""From the stored history to training samples in the owner's voice.

Each owner turn (consecutive owner messages within ``turn_gap_minutes``) is a sample. Its context
is the chat's preceding turns inside the time window (``window_hours``, measured in real time so
it spans midnight), at most ``max_context_messages`` turns, each message cut to
``max_message_chars``; the token budget is applied by the one prompt builder in ``agent.prompt``.
The split is by time: the most recent ``validation_fraction`` of samples is validation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.prompt import Persona, PromptLimits, Turn, render_example
from feedback.models import Chat, Message


@dataclass(frozen=True)
class DatasetConfig:
    window_hours: float = field(default=3.0, metadata={"help": "Context: messages within this many hours before the turn."})
    max_context_messages: int = field(default=16, metadata={"help": "Context: at most this many preceding turns."})
    max_context_tokens: int = field(default=768, metadata={"help": "Context: token budget (the prompt builder drops the oldest first)."})
    max_length: int = field(default=1024, metadata={"help": "Whole example (prompt + reply) in tokens."})
    max_message_chars: int = field(default=1000, metadata={"help": "Each message is cut to this many characters."})
    turn_gap_minutes: float = field(default=5.0, metadata={"help": "Messages of one speaker within this gap form one turn."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Most recent share of samples for validation."})
    scrub_pii: bool = field(default=False, metadata={"help": "Replace e-mails, phone and card numbers."})
    skip_links_only: bool = field(default=True, metadata={"help": "Do not train on messages that are only links."})
    skip_forwarded: bool = field(default=True, metadata={"help": "Do not train on forwarded messages."})
    skip_service: bool = field(default=True, metadata={"help": "Leave service messages out entirely."})
    skip_media_only: bool = field(default=True, metadata={"help": "Do not train on media without text."})
    train_speakers: tuple[str, ...] = field(default=(), metadata={"help": "Other speakers whose turns are samples too."})

    def __post_init__(self) -> None:
        if self.window_hours <= 0:
            raise ValueError("window_hours must be > 0")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")


# --- PII ---
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w])\+?\d[\d ()-]{7,}\d(?![\w])")
_URL = re.compile(r"^\s*(?:(?:https?://|www\.)\S+\s*)+$", re.I)


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub(text: str) -> str:
    text = _EMAIL.sub("[email]", text)
    text = _CARD.sub(lambda m: "[card]" if _luhn(re.sub(r"\D", "", m.group())) else m.group(), text)
    return _PHONE.sub("[phone]", text)


# --- turns ---
@dataclass
class _Msg:
    at: datetime
    speaker: str
    key: str
    is_owner: bool
    text: str
    target_reason: str | None  # why this message cannot be a training target (None: it can)


@dataclass
class _Turn:
    start: datetime
    end: datetime
    speaker: str
    key: str
    is_owner: bool
    parts: list[_Msg]


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


def _cap(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _messages(session: Session, chat: Chat, cfg: DatasetConfig, counted: Counted) -> Iterator[_Msg]:
    q = select(Message.sent_at, Message.sender_id, Message.sender_name, Message.is_owner, Message.text,
               Message.kind, Message.is_forwarded).where(Message.chat_id == chat.id)
    if chat.context_reset_at is not None:
        q = q.where(Message.sent_at >= chat.context_reset_at)
    for row in session.execute(q.order_by(Message.sent_at, Message.id)).yield_per(5000):
        if row.kind == "service":
            if row.is_owner:
                counted.filtered["service message"] += 1
            if cfg.skip_service:
                continue
        text = row.text or ""
        reason = None
        if not text.strip():
            reason = "empty message"
        elif row.kind == "media" and cfg.skip_media_only:
            reason = "media without text"
        elif row.is_forwarded and cfg.skip_forwarded:
            reason = "forwarded message"
        elif cfg.skip_links_only and _URL.match(text):
            reason = "link only"
        elif row.kind == "service":
            reason = "service message"
        if reason == "empty message":
            if row.is_owner:
                counted.filtered[reason] += 1
            continue
        if cfg.scrub_pii:
            text = scrub(text)
        key = row.sender_id or row.sender_name or "?"
        yield _Msg(row.sent_at, row.sender_name or key, key, bool(row.is_owner),
                   _cap(text, cfg.max_message_chars), reason)


def _turns(msgs: Iterator[_Msg], gap: timedelta) -> Iterator[_Turn]:
    cur: _Turn | None = None
    for m in msgs:
        if cur is not None and m.key == cur.key and m.at - cur.end <= gap:
            cur.parts.append(m)
            cur.end = m.at
            continue
        if cur is not None:
            yield cur
        cur = _Turn(m.at, m.at, m.speaker, m.key, m.is_owner, [m])
    if cur is not None:
        yield cur


def _is_trained(turn: _Turn, cfg: DatasetConfig) -> bool:
    if turn.is_owner:
        return True
    wanted = {s.casefold() for s in cfg.train_speakers}
    return bool(wanted) and (turn.key.casefold() in wanted or turn.speaker.casefold() in wanted)


def iter_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None,
                 counted: Counted | None = None) -> Iterator[Sample]:
    counted = counted if counted is not None else Counted()
    window = timedelta(hours=cfg.window_hours)
    gap = timedelta(minutes=cfg.turn_gap_minutes)
    q = select(Chat).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    for chat in session.scalars(q).all():
        history: list[_Turn] = []
        for turn in _turns(_messages(session, chat, cfg, counted), gap):
            if _is_trained(turn, cfg):
                counted.turns += 1
                usable = [p for p in turn.parts if p.target_reason is None]
                for p in turn.parts:
                    if p.target_reason is not None:
                        counted.filtered[p.target_reason] += 1
                context = [t for t in history if turn.start - t.end <= window][-cfg.max_context_messages:]
                if not usable:
                    pass
                elif not any(not t.is_owner or t.key != turn.key for t in context):
                    counted.filtered["no one else wrote within the window"] += 1
                else:
                    counted.samples += 1
                    yield Sample(
                        chat_id=chat.id, at=turn.start.isoformat(), speaker=turn.speaker,
                        context=[{"speaker": t.speaker, "text": "\n".join(p.text for p in t.parts),
                                  "is_self": t.key == turn.key} for t in context],
                        reply="\n".join(p.text for p in usable),
                        owner=turn.is_owner,
                    )
            history.append(turn)
            if len(history) > 4 * cfg.max_context_messages:
                del history[: len(history) - cfg.max_context_messages]


def count_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None) -> Counted:
    counted = Counted()
    for _ in iter_samples(session, cfg, chat_ids, counted):
        pass
    return counted


@dataclass
class BuildResult:
    path: Path
    fingerprint: str
    train: int
    validation: int
    counted: Counted


def build(session: Session, cfg: DatasetConfig, tokenizer: Any, persona: Persona, out: Path) -> BuildResult:
    """Write the training set as JSONL (train then validation, each in time order) with a fingerprint."""
    counted = Counted()
    samples = sorted(iter_samples(session, cfg, None, counted), key=lambda s: (s.at, s.chat_id))
    n_val = int(round(len(samples) * cfg.validation_fraction))
    if cfg.validation_fraction > 0 and len(samples) >= 2:
        n_val = max(n_val, 1)
    cut = len(samples) - n_val
    limits = PromptLimits(max_context_tokens=cfg.max_context_tokens, max_length=cfg.max_length,
                          reserve_for_reply=min(256, cfg.max_length // 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    h = hashlib.sha256()
    with tmp.open("w", encoding="utf-8") as fh:
        for i, s in enumerate(samples):
            s.split = "validation" if i >= cut else "train"
            turns = [Turn(c["speaker"], c["text"], c["is_self"]) for c in s.context]
            who = persona if s.owner else Persona(s.speaker, "")
            ex = render_example(tokenizer, who, [], turns, s.reply, limits)
            record = {**asdict(s), "prompt": ex.prompt, "completion": ex.completion,
                      "prompt_tokens": ex.labels.count(-100), "completion_tokens": len(ex.labels) - ex.labels.count(-100)}
            line = json.dumps(record, ensure_ascii=False, sort_keys=True)
            h.update(line.encode())
            fh.write(line + "\n")
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=list).encode())
    fingerprint = h.hexdigest()[:16]
    tmp.replace(out)  # atomic: a crash never leaves half a dataset
    meta = {"fingerprint": fingerprint, "config": asdict(cfg), "train": cut, "validation": n_val,
            "filtered": dict(counted.filtered), "built_at": datetime.now().astimezone().isoformat()}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2, default=list), encoding="utf-8")
    return BuildResult(out, fingerprint, cut, n_val, counted)


def read_stats(path: Path) -> dict[str, Any]:
    """Counts and token-length histogram of a built set."""
    splits: Counter[str] = Counter()
    lengths: list[int] = []
    for line in path.open(encoding="utf-8"):
        rec = json.loads(line)
        splits[rec["split"]] += 1
        lengths.append(rec["prompt_tokens"] + rec["completion_tokens"])
    edges = [0, 64, 128, 256, 512, 1024, 2048, 10**9]
    hist = Counter()
    for n in lengths:
        for lo, hi in zip(edges, edges[1:]):
            if lo <= n < hi:
                hist[(lo, hi)] += 1
    return {"splits": dict(splits), "total": len(lengths),
            "histogram": [(lo, hi, hist[(lo, hi)]) for lo, hi in zip(edges, edges[1:])],
            "max_tokens": max(lengths, default=0), "mean_tokens": (sum(lengths) / len(lengths)) if lengths else 0}
