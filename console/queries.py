"""The reads behind the console's pages: one query per list, keyset or offset pages, and the rows
a page shows fetched in batches by id (never one query per row)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, load_only

from feedback.models import Adapter, Chat, Correction, Message, Rating, Reply, TrainingRun

PAGE = 50
MESSAGES_PAGE = 100


@dataclass
class ChatRow:
    id: int
    platform: str
    title: str
    kind: str
    last_at: datetime | None
    messages: int = 0
    replies: int = 0


@dataclass
class ReplyView:
    """A reply the twin sent, with what the console shows beside it."""

    id: int
    chat_id: int
    in_reply_to_id: int | None
    text: str
    fact_ids: list[str]
    adapter_version: str | None
    latency_ms: float
    created_at: datetime
    ratings: list[Rating] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)

    def rating_by(self, rater: str) -> int | None:
        return next((r.value for r in self.ratings if r.rater_id == rater), None)


def _page(n: Any) -> int:
    try:
        return max(1, int(n))
    except (TypeError, ValueError):
        return 1


# --- conversations ------------------------------------------------------------------------------

def platforms(session: Session) -> list[str]:
    return sorted(session.scalars(select(Chat.platform).distinct()))


def list_chats(session: Session, platform: str | None, page: int) -> tuple[list[ChatRow], int]:
    """Chats with their last activity, newest first (a page of them), and how many there are."""
    last = (select(func.max(Message.sent_at)).where(Message.chat_id == Chat.id)
            .correlate(Chat).scalar_subquery())
    q = select(Chat.id, Chat.platform, Chat.title, Chat.external_id, Chat.kind, last.label("last_at"))
    count_q = select(func.count(Chat.id))
    if platform:
        q = q.where(Chat.platform == platform)
        count_q = count_q.where(Chat.platform == platform)
    q = q.order_by(func.coalesce(last, Chat.created_at).desc(), Chat.id.desc()).limit(PAGE).offset((page - 1) * PAGE)
    rows = [ChatRow(r.id, r.platform, r.title or r.external_id, r.kind, _utc(r.last_at)) for r in session.execute(q)]
    ids = [r.id for r in rows]
    if ids:
        messages = dict(session.execute(select(Message.chat_id, func.count()).where(Message.chat_id.in_(ids))
                                        .group_by(Message.chat_id)).all())
        replies = dict(session.execute(select(Reply.chat_id, func.count()).where(Reply.chat_id.in_(ids))
                                       .group_by(Reply.chat_id)).all())
        for r in rows:
            r.messages, r.replies = messages.get(r.id, 0), replies.get(r.id, 0)
    return rows, int(session.scalar(count_q) or 0)


def _utc(value: Any) -> datetime | None:
    """A raw aggregate of a UTC column (the type decorator does not apply to max())."""
    from datetime import timezone

    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def chat_messages(session: Session, chat_id: int, before: int | None = None, since: datetime | None = None,
                  limit: int = MESSAGES_PAGE) -> tuple[list[Message], int | None]:
    """The newest ``limit`` messages of a chat (before message ``before``, after ``since``), oldest
    first, and the id to ask for the page before them (None: this is the first page)."""
    q = select(Message).where(Message.chat_id == chat_id)
    if since is not None:
        q = q.where(Message.sent_at >= since)
    if before is not None:
        anchor = session.get(Message, before)
        if anchor is not None and anchor.chat_id == chat_id:
            q = q.where(or_(Message.sent_at < anchor.sent_at,
                            and_(Message.sent_at == anchor.sent_at, Message.id < anchor.id)))
    rows = list(session.scalars(q.order_by(Message.sent_at.desc(), Message.id.desc()).limit(limit + 1)))
    older = rows[limit - 1].id if len(rows) > limit else None
    return list(reversed(rows[:limit])), older


_REPLY_COLUMNS = (Reply.id, Reply.chat_id, Reply.in_reply_to_id, Reply.text, Reply.fact_ids, Reply.adapter_version,
                  Reply.latency_ms, Reply.created_at)  # not the prompt: it is long, and shown on the reply's own page


def _views(session: Session, replies: list[Reply]) -> list[ReplyView]:
    views = [ReplyView(r.id, r.chat_id, r.in_reply_to_id, r.text, list(r.fact_ids or []), r.adapter_version,
                       r.latency_ms, r.created_at) for r in replies]
    ids = [v.id for v in views]
    if ids:
        ratings: dict[int, list[Rating]] = defaultdict(list)
        for rating in session.scalars(select(Rating).where(Rating.reply_id.in_(ids)).order_by(Rating.updated_at)):
            ratings[rating.reply_id].append(rating)
        corrections: dict[int, list[Correction]] = defaultdict(list)
        for c in session.scalars(select(Correction).where(Correction.reply_id.in_(ids)).order_by(Correction.id)):
            corrections[c.reply_id].append(c)
        for v in views:
            v.ratings, v.corrections = ratings.get(v.id, []), corrections.get(v.id, [])
    return views


def replies_to(session: Session, message_ids: list[int]) -> dict[int, list[ReplyView]]:
    """The twin's replies to these messages, with their ratings and corrections: three queries."""
    if not message_ids:
        return {}
    rows = session.scalars(select(Reply).options(load_only(*_REPLY_COLUMNS))
                           .where(Reply.in_reply_to_id.in_(message_ids)).order_by(Reply.id)).all()
    out: dict[int, list[ReplyView]] = defaultdict(list)
    for v in _views(session, list(rows)):
        out[v.in_reply_to_id or 0].append(v)
    return out


def reply_view(session: Session, reply_id: int) -> tuple[ReplyView, Reply] | None:
    row = session.get(Reply, reply_id)
    if row is None:
        return None
    return _views(session, [row])[0], row


# --- feedback -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeedbackFilter:
    value: str = "all"  # all | up | down | withdrawn
    platform: str = ""
    adapter: str = ""  # "" any, "-" none (the base model), else a version
    since: datetime | None = None  # only what came after this (the last retraining)

    def apply(self, q: Any, time_column: Any) -> Any:
        if self.platform:
            q = q.where(Chat.platform == self.platform)
        if self.adapter == "-":
            q = q.where(Reply.adapter_version.is_(None))
        elif self.adapter:
            q = q.where(Reply.adapter_version == self.adapter)
        if self.since is not None:
            q = q.where(time_column > self.since)
        return q


VALUES = {"up": 1, "down": -1, "withdrawn": 0}


@dataclass
class FeedbackRow:
    id: int
    reply_id: int
    who: str
    value: int | None  # None for a correction
    text: str  # the correction's text, or nothing
    reply_text: str
    adapter_version: str | None
    platform: str
    chat_id: int
    chat_title: str
    at: datetime


def feedback_ratings(session: Session, f: FeedbackFilter, page: int) -> tuple[list[FeedbackRow], int]:
    base = (select(Rating.id, Rating.reply_id, Rating.rater_id, Rating.value, Rating.updated_at, Reply.text,
                   Reply.adapter_version, Chat.platform, Chat.id.label("chat_id"), Chat.title, Chat.external_id)
            .join(Reply, Rating.reply_id == Reply.id).join(Chat, Reply.chat_id == Chat.id))
    base = f.apply(base, Rating.updated_at)
    if f.value in VALUES:
        base = base.where(Rating.value == VALUES[f.value])
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    q = base.order_by(Rating.updated_at.desc(), Rating.id.desc()).limit(PAGE).offset((page - 1) * PAGE)
    rows = [FeedbackRow(r.id, r.reply_id, r.rater_id, r.value, "", r.text, r.adapter_version, r.platform, r.chat_id,
                        r.title or r.external_id, r.updated_at) for r in session.execute(q)]
    return _aware(rows), int(total)


def feedback_corrections(session: Session, f: FeedbackFilter, page: int) -> tuple[list[FeedbackRow], int]:
    base = (select(Correction.id, Correction.reply_id, Correction.author_id, Correction.text, Correction.created_at,
                   Reply.text.label("reply_text"), Reply.adapter_version, Chat.platform, Chat.id.label("chat_id"),
                   Chat.title, Chat.external_id)
            .join(Reply, Correction.reply_id == Reply.id).join(Chat, Reply.chat_id == Chat.id))
    base = f.apply(base, Correction.created_at)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    q = base.order_by(Correction.id.desc()).limit(PAGE).offset((page - 1) * PAGE)
    rows = [FeedbackRow(r.id, r.reply_id, r.author_id, None, r.text, r.reply_text, r.adapter_version, r.platform,
                        r.chat_id, r.title or r.external_id, r.created_at) for r in session.execute(q)]
    return _aware(rows), int(total)


def _aware(rows: list[FeedbackRow]) -> list[FeedbackRow]:
    for r in rows:
        r.at = _utc(r.at)  # type: ignore[assignment]
    return rows


def rated_adapter_versions(session: Session) -> list[str | None]:
    """The adapter versions that wrote a rated or corrected reply (for the filter)."""
    rated = select(Reply.adapter_version).join(Rating, Rating.reply_id == Reply.id)
    corrected = select(Reply.adapter_version).join(Correction, Correction.reply_id == Reply.id)
    found = set(session.scalars(rated.distinct())) | set(session.scalars(corrected.distinct()))
    return sorted(found, key=lambda v: (v is None, _version_key(v)))


def _version_key(v: str | None) -> tuple[int, str]:
    if v and v[1:].isdigit():
        return (int(v[1:]), v)
    return (10**9, v or "")


@dataclass
class Outlook:
    """Whether tonight's run happens: the count that decides it."""

    fresh: int  # ratings (not withdrawn) changed since the last retraining started
    needed: int
    since: datetime | None  # when the last retraining started; None: never

    @property
    def will_run(self) -> bool:
        return self.fresh >= self.needed


def outlook(session: Session, needed: int) -> Outlook:
    from trainer.pipeline import last_run_started, new_ratings_since_last_retrain

    return Outlook(new_ratings_since_last_retrain(session), needed, last_run_started(session, "retrain"))


# --- learning -----------------------------------------------------------------------------------

def runs(session: Session, page: int) -> tuple[list[tuple[TrainingRun, Adapter | None]], int]:
    q = (select(TrainingRun, Adapter).outerjoin(Adapter, TrainingRun.adapter_id == Adapter.id)
         .order_by(TrainingRun.id.desc()).limit(PAGE // 2).offset((page - 1) * (PAGE // 2)))
    rows = [(r, a) for r, a in session.execute(q)]
    return rows, int(session.scalar(select(func.count(TrainingRun.id))) or 0)


def run(session: Session, run_id: int) -> tuple[TrainingRun, Adapter | None] | None:
    row = session.get(TrainingRun, run_id)
    if row is None:
        return None
    return row, (session.get(Adapter, row.adapter_id) if row.adapter_id else None)


def totals(session: Session) -> dict[str, int]:
    """Row counts for the status page."""
    out = {}
    for name, column in (("chats", Chat.id), ("messages", Message.id), ("replies", Reply.id),
                         ("ratings", Rating.id), ("corrections", Correction.id), ("runs", TrainingRun.id)):
        out[name] = int(session.scalar(select(func.count(column))) or 0)
    return out
