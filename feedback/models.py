"""Typed SQLAlchemy 2.0 models for everything Doppel stores.

Times are stored as naive UTC (``UTCDateTime`` converts on the way in and out) so SQLite and
PostgreSQL hold the same values. The schema changes only through Alembic migrations.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    LargeBinary,
    Unicode,
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware datetime stored as naive UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Chat(Base):
    """A conversation on one platform: an ingested export's chat or a live chat."""

    __tablename__ = "chats"
    __table_args__ = (UniqueConstraint("platform", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))  # telegram, discord, messenger, whatsapp, cli, http
    external_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str | None] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(16), default="private")  # private | group
    context_reset_at: Mapped[datetime | None]  # /reset: messages before this are not context
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    messages: Mapped[list[Message]] = relationship(back_populates="chat", passive_deletes=True)


class Message(Base):
    """One message: ingested from an export (source='ingest') or seen live (source='live')."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("chat_id", "dedup_key"),
        Index("ix_messages_chat_id_sent_at", "chat_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    # Stable identity inside the chat, so re-ingesting an export adds nothing.
    dedup_key: Mapped[str] = mapped_column(String(64))
    platform_message_id: Mapped[str | None] = mapped_column(String(64))
    sender_id: Mapped[str | None] = mapped_column(String(255))
    sender_name: Mapped[str | None] = mapped_column(String(255))
    is_owner: Mapped[bool] = mapped_column(Boolean, default=False)
    text: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(16), default="text")  # text | media | service
    is_forwarded: Mapped[bool] = mapped_column(Boolean, default=False)
    reply_to: Mapped[str | None] = mapped_column(String(64))  # platform message id replied to
    sent_at: Mapped[datetime]
    edited_at: Mapped[datetime | None]
    source: Mapped[str] = mapped_column(String(16), default="ingest")  # ingest | live

    chat: Mapped[Chat] = relationship(back_populates="messages")


class Import(Base):
    """One ingested export file, with what was done with it."""

    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(32))
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Forgotten(Base):
    """Someone who asked to be forgotten, or a private conversation deleted with them: a SHA-256 of
    the key only (``common.tombstones``), so a later import of the same export skips them."""

    __tablename__ = "forgotten"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "person" or "chat"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reply(Base):
    """A reply the twin sent, with exactly what it was generated from (DESIGN promise 2)."""

    __tablename__ = "replies"

    id: Mapped[int] = mapped_column(primary_key=True)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), index=True)
    in_reply_to_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("messages.id", ondelete="SET NULL"),
        index=True,  # a conversation page finds the replies to its messages
    )
    text: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    fact_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    adapter_version: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    # the platform ids of the message(s) the reply went out as, comma-separated
    platform_message_id: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    ratings: Mapped[list[Rating]] = relationship(back_populates="reply", passive_deletes=True)
    corrections: Mapped[list[Correction]] = relationship(back_populates="reply", passive_deletes=True)


class Rating(Base):
    """One person's current rating of one reply: +1 or -1 (a changed reaction updates the row)."""

    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("reply_id", "rater_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    reply_id: Mapped[int] = mapped_column(ForeignKey("replies.id", ondelete="CASCADE"))
    rater_id: Mapped[str] = mapped_column(String(255))
    value: Mapped[int] = mapped_column(SmallInteger)  # +1, -1; 0 once the reaction was removed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the nightly count and the feedback page ask for ratings since the last retraining, newest first
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)
    # when the person reacted, by the platform's clock (Telegram's update date): platforms do not
    # deliver reactions in order, and an event older than this one is ignored; None: unknown
    reacted_at: Mapped[datetime | None]

    reply: Mapped[Reply] = relationship(back_populates="ratings")


class Correction(Base):
    """What the reply should have said, written by a person."""

    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(primary_key=True)
    reply_id: Mapped[int] = mapped_column(ForeignKey("replies.id", ondelete="CASCADE"), index=True)
    author_id: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    reply: Mapped[Reply] = relationship(back_populates="corrections")


class Adapter(Base):
    """A trained LoRA adapter in the registry."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # candidate|active|rejected|retired
    reason: Mapped[str | None] = mapped_column(Text)
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """One run of the trainer (manual or nightly), with its outcome."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # train | retrain
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|succeeded|rejected|failed
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rating_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))


class SchedulerJob(Base):
    """APScheduler's job store (the nightly retraining), declared here so that the schema changes
    only through migrations; the layout is APScheduler 3's ``SQLAlchemyJobStore`` table."""

    __tablename__ = "apscheduler_jobs"

    id: Mapped[str] = mapped_column(Unicode(191), primary_key=True)
    next_run_time: Mapped[float | None] = mapped_column(Float(25), index=True)
    job_state: Mapped[bytes] = mapped_column(LargeBinary)
