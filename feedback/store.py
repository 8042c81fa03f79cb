"""Recording the live side: chats, messages seen, replies sent, ratings and corrections.

Every function takes an open ``Session``; the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import InputError, NotFoundError
from feedback.models import Chat, Correction, Message, Rating, Reply, utcnow

TWIN_SENDER = "doppel"


def get_chat(session: Session, platform: str, external_id: str, title: str | None = None,
             kind: str = "private", create: bool = True) -> Chat | None:
    query = select(Chat).where(Chat.platform == platform, Chat.external_id == external_id)
    chat = session.scalar(query)
    if chat is None and create:
        chat = Chat(platform=platform, external_id=external_id, title=title or external_id, kind=kind)
        try:
            with session.begin_nested():  # two first messages of a new chat can race to create it
                session.add(chat)
        except IntegrityError:
            chat = session.scalar(query)
    elif chat is not None and title and chat.title != title:
        chat.title = title
    return chat


def add_message(session: Session, chat: Chat, text: str, sender_id: str | None, sender_name: str | None,
                *, from_twin: bool = False, platform_message_id: str | None = None,
                reply_to: str | None = None, sent_at: datetime | None = None) -> Message:
    """A message seen live (or written by the twin). Deduplicated on the platform's message id."""
    key = (f"live:{platform_message_id}" if platform_message_id
           else f"live:{uuid.uuid4().hex}")[:64]
    if platform_message_id:
        existing = session.scalar(select(Message).where(Message.chat_id == chat.id, Message.dedup_key == key))
        if existing is not None:
            return existing
    msg = Message(chat_id=chat.id, dedup_key=key, platform_message_id=platform_message_id, sender_id=sender_id,
                  sender_name=sender_name, is_owner=from_twin, text=text, kind="text", reply_to=reply_to,
                  sent_at=sent_at or utcnow(), source="twin" if from_twin else "live")
    session.add(msg)
    session.flush()
    return msg


def recent_messages(session: Session, chat: Chat, now: datetime, window: timedelta, limit: int) -> list[Message]:
    """The chat's messages inside the time window (and after a /reset), oldest first: the newest
    ``limit`` of them. The caller decides what each is (see ``agent.conversation``)."""
    since = now - window
    if chat.context_reset_at is not None and chat.context_reset_at > since:
        since = chat.context_reset_at
    rows = session.scalars(
        select(Message)
        .where(Message.chat_id == chat.id, Message.sent_at >= since, Message.sent_at <= now)
        .order_by(Message.sent_at.desc(), Message.id.desc())
        .limit(limit)
    ).all()
    return list(reversed(rows))


def record_reply(session: Session, chat: Chat, in_reply_to: Message | None, text: str, prompt: str,
                 fact_ids: list[str], adapter_version: str | None, latency_ms: float,
                 platform_message_id: str | None = None) -> Reply:
    reply = Reply(chat_id=chat.id, in_reply_to_id=in_reply_to.id if in_reply_to else None, text=text,
                  prompt=prompt, fact_ids=fact_ids, adapter_version=adapter_version, latency_ms=latency_ms,
                  platform_message_id=platform_message_id)
    session.add(reply)
    session.flush()
    return reply


def find_reply(session: Session, reply_id: int) -> Reply:
    reply = session.get(Reply, reply_id)
    if reply is None:
        raise NotFoundError(f"No reply {reply_id}.", hint="Rate a reply the twin sent; its id is in the reply.")
    return reply


def rate(session: Session, reply: Reply, rater_id: str, value: int,
         at: datetime | None = None) -> tuple[Rating, bool]:
    """Set ``rater_id``'s rating of ``reply`` (+1, -1, or 0 to withdraw it). One row per rater and
    reply: a changed reaction updates it. ``at`` is when the person reacted, by the platform's clock:
    an event older than the one the row holds is ignored (reactions arrive out of order); events
    without a time apply as they come. Returns the row and whether its value changed.

    One ``INSERT ... ON CONFLICT DO UPDATE``, so two events of one person at once (a quick change,
    a redelivered update) cannot both insert."""
    if value not in (-1, 0, 1):
        raise InputError(f"A rating is +1, -1 or 0, not {value!r}.")
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the two databases Doppel supports
        raise InputError(f"Ratings need SQLite or PostgreSQL, not {dialect}.")
    now = utcnow()
    table = Rating.__table__
    stmt = insert(Rating).values(reply_id=reply.id, rater_id=rater_id, value=value, created_at=now,
                                 updated_at=now, reacted_at=at)
    new, old = stmt.excluded, table.c
    differs = old.value != new.value
    newer = and_(new.reacted_at.is_not(None), or_(old.reacted_at.is_(None), old.reacted_at < new.reacted_at))
    stmt = stmt.on_conflict_do_update(
        index_elements=[old.reply_id, old.rater_id],
        set_={"value": new.value,
              # updated_at is when the value last changed (the nightly job counts ratings since a run)
              "updated_at": case((differs, new.updated_at), else_=old.updated_at),
              "reacted_at": func.coalesce(new.reacted_at, old.reacted_at)},
        # not older than what the row holds, and something to change (the value, or a newer time)
        where=and_(or_(new.reacted_at.is_(None), old.reacted_at.is_(None), old.reacted_at <= new.reacted_at),
                   or_(differs, newer)),
    ).returning(old.id, old.updated_at)
    written = session.execute(stmt).first()
    if written is None:  # nothing to do: the same value, or an older event
        row = session.scalar(select(Rating).where(Rating.reply_id == reply.id, Rating.rater_id == rater_id)
                             .execution_options(populate_existing=True))
        assert row is not None
        return row, False
    row = session.get(Rating, written.id, populate_existing=True)
    assert row is not None
    # updated_at moves only with the value, so it tells whether this statement changed the value
    # (and not only the event time)
    return row, written.updated_at == now


def correct(session: Session, reply: Reply, author_id: str, text: str) -> Correction:
    text = text.strip()
    if not text:
        raise InputError("A correction needs the text the reply should have been.")
    row = Correction(reply_id=reply.id, author_id=author_id, text=text)
    session.add(row)
    session.flush()
    return row


def reset(session: Session, chat: Chat, at: datetime | None = None) -> None:
    chat.context_reset_at = at or utcnow()


def anonymous_id(value: str) -> str:
    """A stable pseudonym for a rater who gave no id (e.g. an HTTP client)."""
    return "anon:" + hashlib.sha1(value.encode()).hexdigest()[:12]


def reply_record(reply: Reply) -> dict[str, Any]:
    return {"id": reply.id, "text": reply.text, "fact_ids": list(reply.fact_ids or []),
            "adapter_version": reply.adapter_version, "latency_ms": round(reply.latency_ms, 1)}
