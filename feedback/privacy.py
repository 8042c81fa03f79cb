"""What a person may ask of whoever keeps their messages: to be forgotten, and to see what is kept.

A *person* is one or more identities, each written ``PLATFORM:ID``:

- ``telegram:123`` — a Telegram user id. It matches live messages (sender id ``123``) and the
  owner's ingested Telegram exports (sender id ``user123``), and ratings and corrections made as
  ``telegram:123``;
- ``discord:456`` — a Discord user id, live and in exports alike;
- ``whatsapp:Bob Smith``, ``messenger:Bob Smith`` — those exports know people by name only;
- ``http:ID``, ``cli:NAME``, ``api:ID`` — the sender ids of the other faces;
- ``name:Bob Smith`` — a display name on any platform (use it with care: names are not unique).

Nothing links a person's identities on two platforms by itself: the owner links them in the
``people`` setting (a name -> that person's identities), and every identity of a group is then
covered when any one of them is named (see ``linked``).

``forget_person`` removes a person from every table, in the caller's transaction (all or nothing):
their messages (live and ingested), the twin's replies to them and the twin's messages that sent
those replies (with the ratings and corrections on them), their ratings and corrections, private
conversations with them (the other side's messages too: without them those are no one's context),
their lines inside the stored prompts of the twin's replies to others (each replaced by
``[removed]``), conversation titles and import paths that carry their name. ``forget_everywhere``
runs it in one transaction, together with an injected scrubber of files on disk (the training set).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import String, Text, and_, delete, func, inspect, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InputError
from common.secrets import redact as redact_secrets
from common.tombstones import chat_hash, key_hash
from feedback.models import Chat, Correction, Forgotten, Import, Message, Rating, Reply

log = logging.getLogger(__name__)

REMOVED = "[removed]"
PLATFORMS = ("telegram", "discord", "whatsapp", "messenger", "http", "cli", "api", "name")
IDENTITY_HINT = ("Write a person as PLATFORM:ID, e.g. telegram:123456789, discord:456, \"whatsapp:Bob Smith\" or "
                 "\"name:Bob Smith\" (platforms: " + ", ".join(PLATFORMS) + "), or as a name from the `people` setting.")
_CHUNK = 500  # ids per IN (...): well under every database's parameter limit


# --- who ---------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Identity:
    platform: str
    id: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.id}"


def parse_identity(text: str) -> Identity:
    """``telegram:123`` -> Identity("telegram", "123").

    Raises:
        InputError: not ``PLATFORM:ID`` with a known platform.
    """
    platform, sep, ident = text.strip().partition(":")
    platform, ident = platform.strip().lower(), ident.strip()
    if not sep or not ident or platform not in PLATFORMS:
        raise InputError(f"{text!r} does not name a person.", hint=IDENTITY_HINT)
    if platform == "telegram" and ident.startswith("user") and ident[4:].isdigit():
        ident = ident[4:]  # as exports write Telegram users
    return Identity(platform, ident)


def linked(names: Iterable[str], people: Mapping[str, Sequence[str]] | None = None) -> list[Identity]:
    """The identities ``names`` stand for: each is ``PLATFORM:ID`` or a name from ``people`` (the
    owner's map of who is who), and every identity of a group that any of them belongs to.

    Raises:
        InputError: a name is neither an identity nor a person of ``people``.
    """
    groups = {label.casefold(): [parse_identity(i) for i in ids] for label, ids in (people or {}).items()}
    out: set[Identity] = set()
    for name in names:
        if ":" not in name and name.strip().casefold() in groups:
            out.update(groups[name.strip().casefold()])
            continue
        ident = parse_identity(name)
        out.add(ident)
        for members in groups.values():
            if ident in members:
                out.update(members)
    if not out:
        raise InputError("No person given.", hint=IDENTITY_HINT)
    return sorted(out)


def _tg_ids(ident: str) -> set[str]:
    """A Telegram user as live updates (``123``) and exports (``user123``) write them."""
    bare = ident[4:] if ident.startswith("user") and ident[4:].isdigit() else ident
    return {bare, f"user{bare}"}


def _sender_clause(ident: Identity) -> Any:
    """Messages this identity wrote (the caller joins Chat)."""
    if ident.platform == "name":
        return func.lower(Message.sender_name) == ident.id.lower()
    on = Chat.platform == ident.platform
    if ident.platform == "telegram":
        return and_(on, Message.sender_id.in_(sorted(_tg_ids(ident.id))))
    if ident.platform in ("whatsapp", "messenger"):  # exports without ids: the name is the id
        return and_(on, or_(Message.sender_id == ident.id, func.lower(Message.sender_name) == ident.id.lower()))
    return and_(on, Message.sender_id == ident.id)


def _rater_ids(identities: Sequence[Identity]) -> list[str]:
    """How their ratings and corrections are signed: ``telegram:123`` by the bots; the HTTP API
    takes whatever the client sends, so ``http:ID`` and ``api:ID`` match ``ID`` too."""
    out: set[str] = set()
    for i in identities:
        if i.platform == "name":
            continue
        out.add(str(i))
        if i.platform == "telegram":
            out.update(f"telegram:{x}" for x in _tg_ids(i.id))
        if i.platform in ("http", "api"):
            out.add(i.id)
    return sorted(out)


# --- their lines inside prompts ----------------------------------------------------------------

_MARK = re.compile(r"<\|[^|<>\n]{1,40}\|>|</?s>")
_ROLES = {"system", "user", "assistant"}


def _split_marks(line: str) -> tuple[str, str, str]:
    """(leading template markers, the text, trailing markers) of one prompt line."""
    start, end = 0, len(line)
    while (m := _MARK.match(line, start)) is not None:
        start = m.end()
    while True:
        m = next((m for m in _MARK.finditer(line, start, end) if m.end() == end), None)
        if m is None:
            break
        end = m.start()
    return line[:start], line[start:end], line[end:]


@dataclass
class Quoted:
    """How a person appears in one chat's prompts: the labels their turns carry ("Name: text") and
    the lines they wrote; ``others`` are the other labels of the chat (where their turn ends)."""

    labels: set[str] = field(default_factory=set)
    lines: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)

    def label_of(self, text: str) -> tuple[str, bool] | None:
        """The speaker label ``text`` starts with ("Name: text", or a plain transcript's closing
        "Name:"), if it is a known one: (label, is theirs)."""
        head, sep, rest = text.partition(":")
        if not sep or (rest and not rest.startswith(" ")):
            return None
        if head in self.labels:
            return head, True
        if head in self.others:
            return head, False
        return None


def redact(text: str, quoted: Quoted) -> str:
    """``text`` (a prompt) with each of their turns replaced by one ``[removed]`` line. A turn is
    their label and text up to the next speaker's label or template marker; a line of theirs with
    no label (where a label got lost) is replaced too, outside other people's turns."""
    if not quoted.labels and not quoted.lines:
        return text
    out: list[str] = []
    state = None  # None: no speaker yet; True: inside their turn; False: inside someone else's
    for line in text.split("\n"):
        lead, body, tail = _split_marks(line)
        if lead:
            state = None
        if lead and body in _ROLES:  # a chat template's header: people's turns are the user's
            state = None if body == "user" else False
            out.append(line)
            continue
        label = quoted.label_of(body)
        if label is not None:
            state = label[1]
            out.append(lead + REMOVED + tail if state else line)
        elif state is True:  # a continuation of their turn: folded into its [removed]
            if tail or lead:
                out[-1] += lead + tail
            if tail:
                state = None
        elif state is None and body.strip() and body.strip() in quoted.lines:
            out.append(lead + REMOVED + tail)
        else:
            out.append(line)
        if tail and state is not None:
            state = None
    return "\n".join(out)


@dataclass
class Trace:
    """Where a person was found, for scrubbing what was built from the database (the training set
    on disk): the chats they wrote in, and how each one's prompts quote them."""

    quoted: dict[int, Quoted] = field(default_factory=dict)  # chat id -> labels and lines

    def speaks(self, chat_id: int, speaker: str) -> bool:
        q = self.quoted.get(chat_id)
        return q is not None and speaker in q.labels

    def redact(self, chat_id: int, text: str) -> str:
        q = self.quoted.get(chat_id)
        return text if q is None else redact(text, q)

    def quotes(self, chat_id: int, text: str) -> bool:
        return self.redact(chat_id, text) != text


# --- what was removed ----------------------------------------------------------------------------

KINDS = (  # count key, how the bot's answer names it (to them), how the command line does (to the owner)
    ("messages", "your messages", "their messages"),
    ("replies", "my replies to you", "the twin's replies to them"),
    ("twin_messages", "my messages that sent those replies", "the twin's messages that sent those replies"),
    ("reply_feedback", "ratings and corrections others gave those replies", "ratings and corrections of those replies"),
    ("prompts", "prompts of my replies to others (your lines replaced by [removed])",
     "prompts of replies to others (their lines replaced by [removed])"),
    ("ratings", "your ratings", "their ratings"),
    ("corrections", "your corrections", "their corrections"),
    ("chats", "private conversations with you (whole)", "private conversations with them (whole)"),
    ("chat_messages", "other messages in those conversations (mine and the owner's side)",
     "other messages in those conversations (the twin's and yours)"),
    ("titles", "conversation titles with your name (renamed)", "conversation titles with their name (renamed)"),
    ("imports", "import records naming you (renamed)", "import records naming them (renamed)"),
    ("samples", "training samples on disk that quoted you", "training samples on disk that quoted them"),
    ("cached_samples", "cached training samples that quoted you", "cached training samples that quoted them"),
)

ADAPTER_NOTE = ("An adapter already trained on conversations with you cannot be untrained: it keeps what it "
                "learned until the owner rebuilds the training set and trains again (`doppel dataset build`, "
                "then `doppel train`); the new adapter is made without you.")


@dataclass
class ForgetReport:
    identities: list[str]
    names: list[str] = field(default_factory=list)  # the names they wrote under
    platforms: list[str] = field(default_factory=list)  # where they were found
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k, _, _ in KINDS})
    owner_rows_skipped: int = 0  # rows of the owner's that an identity matched (never removed)
    trace: Trace = field(default_factory=Trace, repr=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self, to_owner: bool = False) -> list[str]:
        """One line per kind of thing removed (kinds with nothing are left out), said to the person
        or, ``to_owner``, about them."""
        return [f"{owner if to_owner else them}: {self.counts[k]}" for k, them, owner in KINDS if self.counts.get(k)]

    def message(self) -> str:
        """The bot's answer to /forget."""
        who = ", ".join(self.identities)
        if not self.total:
            return (f"I had nothing stored about you ({who}). If you talk to me on another platform too, "
                    "send /forget there as well, or ask the owner to link your accounts.")
        body = "\n".join(f"• {line}" for line in self.lines())
        return (f"Done. I deleted everything stored about you ({who}):\n{body}\n"
                f"If you talk to me on another platform too, send /forget there as well, or ask the owner to link "
                f"your accounts. {ADAPTER_NOTE}")

    def to_dict(self) -> dict[str, Any]:
        return {"identities": self.identities, "names": self.names, "platforms": self.platforms,
                "removed": {k: v for k, v in self.counts.items() if v}, "owner_rows_skipped": self.owner_rows_skipped}


# --- forgetting ----------------------------------------------------------------------------------

def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    ids = list(ids)
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


def _delete(session: Session, column: Any, ids: Iterable[int]) -> int:
    n = 0
    for chunk in _chunks(sorted(set(ids))):
        n += session.execute(delete(column.class_).where(column.in_(chunk)),
                             execution_options={"synchronize_session": False}).rowcount or 0
    return n


def _label(m: Any) -> str:
    """A message's speaker as prompts write it (``agent.service``: name, else id)."""
    return m.sender_name or m.sender_id or "someone"


def _theirs(session: Session, identities: Sequence[Identity]) -> tuple[list[Any], int]:
    """(their messages, the owner's rows an identity matched)."""
    who = or_(*[_sender_clause(i) for i in identities])
    rows = session.execute(
        select(Message.id, Message.chat_id, Message.sender_id, Message.sender_name, Message.text, Message.is_owner,
               Message.source, Message.sent_at, Message.platform_message_id, Message.kind, Chat.platform)
        .join(Chat, Message.chat_id == Chat.id).where(who).order_by(Message.chat_id, Message.sent_at, Message.id)
    ).all()
    mine = [r for r in rows if not r.is_owner and r.source != "twin"]
    return mine, len(rows) - len(mine)


def _quoted(session: Session, theirs: Sequence[Any], self_names: Iterable[str]) -> dict[int, Quoted]:
    by_chat: dict[int, Quoted] = defaultdict(Quoted)
    for r in theirs:
        q = by_chat[r.chat_id]
        q.labels.add(_label(r))
        q.lines.update(ln.strip() for ln in (r.text or "").split("\n") if len(ln.strip()) >= 2)
    for chat_ids in _chunks(sorted(by_chat)):
        for chat_id, sid, name in session.execute(
                select(Message.chat_id, Message.sender_id, Message.sender_name).where(Message.chat_id.in_(chat_ids))
                .group_by(Message.chat_id, Message.sender_id, Message.sender_name)):
            label = name or sid or "someone"
            if label not in by_chat[chat_id].labels:
                by_chat[chat_id].others.add(label)
    for q in by_chat.values():
        q.others.update(n for n in self_names if n and n not in q.labels)
    return dict(by_chat)


def _twin_copies(session: Session, replies: Sequence[Any]) -> list[int]:
    """The twin's own messages that sent ``replies`` (stored as the chat's messages, for context,
    right after the reply record, with its text)."""
    out: list[int] = []
    taken: set[int] = set()
    for r in replies:
        at: datetime = r.created_at
        rows = session.execute(
            select(Message.id).where(Message.chat_id == r.chat_id, Message.source == "twin", Message.text == r.text,
                                     Message.sent_at >= at - timedelta(seconds=5),
                                     Message.sent_at <= at + timedelta(minutes=2))
            .order_by(Message.sent_at, Message.id)).scalars().all()
        pick = next((i for i in rows if i not in taken), None)
        if pick is not None:
            taken.add(pick)
            out.append(pick)
    return out


def _private_with_them(session: Session, chats: Sequence[Chat], per_chat: Mapping[int, int]) -> list[int]:
    """The private chats where nobody but them and the twin's side (the twin, the owner) wrote."""
    private = [c.id for c in chats if c.kind == "private"]
    if not private:
        return []
    others = dict(session.execute(
        select(Message.chat_id, func.count()).where(Message.chat_id.in_(private), Message.is_owner.is_(False),
                                                    Message.source != "twin")
        .group_by(Message.chat_id)).all())
    return [c for c in private if others.get(c, 0) == per_chat.get(c, 0)]


def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)


def _rename(text: str, names: Iterable[str]) -> str:
    for n in sorted(names, key=len, reverse=True):
        if len(n) >= 3 or text.strip().casefold() == n.casefold():
            text = _word(n).sub(REMOVED, text)
    return text


def forget_person(session: Session, identities: Sequence[Identity], *, self_names: Iterable[str] = ()) -> ForgetReport:
    """Remove everything stored about the person ``identities`` name, in the caller's transaction.
    ``self_names``: the twin's own speaker names (a plain-transcript prompt labels its turns so).

    Args:
        session: an open session; the caller commits (or rolls back: a dry run).
        identities: the person's identities (``linked`` expands a name of the ``people`` setting).
        self_names: labels that end one of their turns in a prompt besides the chat's other people.

    Returns:
        What was removed, per kind, and a ``Trace`` to scrub what was built from it.
    """
    report = ForgetReport([str(i) for i in identities])
    theirs, report.owner_rows_skipped = _theirs(session, identities)
    raters = _rater_ids(identities)
    names = sorted({r.sender_name for r in theirs if r.sender_name}
                   | {i.id for i in identities if i.platform in ("name", "whatsapp", "messenger")})
    report.names = names
    report.platforms = sorted({r.platform for r in theirs})
    trace = report.trace
    trace.quoted = _quoted(session, theirs, self_names)
    per_chat: dict[int, int] = defaultdict(int)
    for r in theirs:
        per_chat[r.chat_id] += 1
    their_ids = [r.id for r in theirs]
    chats = [c for ids in _chunks(sorted(per_chat)) for c in session.scalars(select(Chat).where(Chat.id.in_(ids)))]
    whole = set(_private_with_them(session, chats, per_chat))
    c = report.counts

    # their ratings and corrections, wherever they are
    if raters:
        c["ratings"] = session.execute(delete(Rating).where(Rating.rater_id.in_(raters)),
                                       execution_options={"synchronize_session": False}).rowcount or 0
        c["corrections"] = session.execute(delete(Correction).where(Correction.author_id.in_(raters)),
                                           execution_options={"synchronize_session": False}).rowcount or 0

    # the twin's replies to them (and its messages that sent them), outside the chats deleted whole
    answered = [r for ids in _chunks(their_ids) for r in session.execute(
        select(Reply.id, Reply.chat_id, Reply.text, Reply.created_at).where(Reply.in_reply_to_id.in_(ids))).all()
        if r.chat_id not in whole]
    answered_ids = [r.id for r in answered]
    c["reply_feedback"] = (_delete(session, Rating.reply_id, answered_ids)
                           + _delete(session, Correction.reply_id, answered_ids))
    c["twin_messages"] = _delete(session, Message.id, _twin_copies(session, answered))
    c["replies"] = _delete(session, Reply.id, answered_ids)

    # their lines in the prompts of the replies to others, in the chats kept
    for chat_id, quoted in trace.quoted.items():
        if chat_id in whole:
            continue
        for rid, prompt in session.execute(select(Reply.id, Reply.prompt).where(Reply.chat_id == chat_id)).all():
            clean = redact(prompt, quoted)
            if clean != prompt:
                session.execute(update(Reply).where(Reply.id == rid).values(prompt=clean),
                                execution_options={"synchronize_session": False})
                c["prompts"] += 1

    # private conversations with them: everything in them
    if whole:
        ids = sorted(whole)
        replies = [i for chunk in _chunks(ids) for i in session.scalars(select(Reply.id).where(Reply.chat_id.in_(chunk)))]
        c["reply_feedback"] += _delete(session, Rating.reply_id, replies) + _delete(session, Correction.reply_id, replies)
        in_whole = sum(per_chat[i] for i in ids)
        c["replies"] += _delete(session, Reply.id, replies)
        c["chat_messages"] = _delete(session, Message.chat_id, ids) - in_whole
        c["messages"] += in_whole
        c["chats"] = _delete(session, Chat.id, ids)

    # their messages in the chats kept
    c["messages"] += _delete(session, Message.id, [r.id for r in theirs if r.chat_id not in whole])

    # titles and import paths that carry their name
    if names:
        for chat in chats:
            if chat.id in whole or not chat.title:
                continue
            renamed = _rename(chat.title, names)
            if renamed != chat.title:
                session.execute(update(Chat).where(Chat.id == chat.id).values(title=renamed),
                                execution_options={"synchronize_session": False})
                c["titles"] += 1
        likes = or_(*[func.lower(Import.path).contains(n.lower(), autoescape=True) for n in names if len(n) >= 3])
        if any(len(n) >= 3 for n in names):
            for imp in session.execute(select(Import.id, Import.path).where(likes)).all():
                renamed = _rename(imp.path, names)
                if renamed != imp.path:
                    session.execute(update(Import).where(Import.id == imp.id).values(path=renamed),
                                    execution_options={"synchronize_session": False})
                    c["imports"] += 1
    # what a later import of the same export must skip (hashes only)
    keys = {key_hash(i.platform, i.id): "person" for i in identities}
    keys.update({chat_hash(ch.platform, ch.external_id): "chat" for ch in chats if ch.id in whole})
    known = {k for chunk in _chunks(sorted(keys)) for k in session.scalars(select(Forgotten.key).where(Forgotten.key.in_(chunk)))}
    session.add_all([Forgotten(key=k, kind=kind) for k, kind in keys.items() if k not in known])
    session.flush()
    session.expire_all()
    return report


def forgotten_keys(session: Session) -> frozenset[str]:
    """The hashes the ingest skips (see ``common.tombstones``)."""
    return frozenset(session.scalars(select(Forgotten.key)))


# --- files built from the database (the training set) ------------------------------------------

class PreparedFiles(Protocol):
    """Scrubbed copies of files, written beside them, not yet in place."""

    counts: dict[str, int]

    def commit(self) -> None: ...  # put the copies in place (after the database commit)
    def abort(self) -> None: ...  # throw the copies away


FileScrubber = Callable[[Trace], PreparedFiles]


def forget_everywhere(sessions: sessionmaker[Session], identities: Sequence[Identity], *,
                      files: FileScrubber | None = None, self_names: Iterable[str] = (),
                      dry_run: bool = False) -> ForgetReport:
    """``forget_person`` in one transaction, and ``files`` (scrubbed copies of the training set)
    put in place only once it committed: a failure on either side leaves everything as it was.
    ``dry_run``: count what would be removed, change nothing."""
    prepared: PreparedFiles | None = None
    session = sessions()
    sqlite = session.get_bind().dialect.name == "sqlite"
    try:
        if sqlite:  # deleted rows are overwritten with zeros, not left readable in free pages
            session.execute(text("PRAGMA secure_delete = ON"))
        report = forget_person(session, identities, self_names=self_names)
        if files is not None:
            prepared = files(report.trace)
            for k, v in prepared.counts.items():
                report.counts[k] = report.counts.get(k, 0) + v
        if dry_run:
            session.rollback()
        else:
            session.commit()
    except BaseException:
        session.rollback()
        if prepared is not None:
            prepared.abort()
        raise
    finally:
        session.close()
    if prepared is not None:
        if dry_run:
            prepared.abort()
        else:
            prepared.commit()
    if sqlite and not dry_run:
        _checkpoint(sessions)
    return report


def _checkpoint(sessions: sessionmaker[Session]) -> None:
    """Copy SQLite's write-ahead log into the database and empty it: the log still holds the pages
    as they were before the delete until then."""
    with sessions() as session:
        try:
            session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        except Exception as exc:  # a reader holding the log open: it is emptied at the next checkpoint
            log.warning("could not checkpoint the database's write-ahead log now (%s); it is at the next one", exc)


# --- what is stored about someone ----------------------------------------------------------------

def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def export_person(session: Session, identities: Sequence[Identity]) -> dict[str, Any]:
    """Everything stored about the person, as JSON-ready data: their messages (with the chat each
    is in), the twin's replies to them, their ratings and corrections (with the reply each is on),
    and which other replies' prompts quote them. Other people's words are not included."""
    theirs, skipped = _theirs(session, identities)
    chat_ids = sorted({r.chat_id for r in theirs})
    chats = {c.id: c for ids in _chunks(chat_ids) for c in session.scalars(select(Chat).where(Chat.id.in_(ids)))}

    def chat_ref(chat_id: int) -> dict[str, Any]:
        ch = chats.get(chat_id) or session.get(Chat, chat_id)
        return {"platform": ch.platform, "id": ch.external_id, "title": ch.title, "kind": ch.kind} if ch else {}

    messages = [{"chat": chat_ref(r.chat_id), "sent_at": _iso(r.sent_at), "sender_id": r.sender_id,
                 "sender_name": r.sender_name, "text": r.text, "kind": r.kind, "source": r.source,
                 "platform_message_id": r.platform_message_id} for r in theirs]
    their_ids = [r.id for r in theirs]
    replies = [{"reply_id": r.id, "chat": chat_ref(r.chat_id), "created_at": _iso(r.created_at), "text": r.text,
                "adapter_version": r.adapter_version}
               for ids in _chunks(their_ids)
               for r in session.scalars(select(Reply).where(Reply.in_reply_to_id.in_(ids)).order_by(Reply.id))]
    raters = _rater_ids(identities)
    ratings = [{"reply_id": rt.reply_id, "reply": rp.text, "value": rt.value, "rater": rt.rater_id,
                "updated_at": _iso(rt.updated_at)}
               for rt, rp in session.execute(select(Rating, Reply).join(Reply, Rating.reply_id == Reply.id)
                                             .where(Rating.rater_id.in_(raters)).order_by(Rating.id))] if raters else []
    corrections = [{"reply_id": co.reply_id, "reply": rp.text, "text": co.text, "author": co.author_id,
                    "created_at": _iso(co.created_at)}
                   for co, rp in session.execute(select(Correction, Reply).join(Reply, Correction.reply_id == Reply.id)
                                                 .where(Correction.author_id.in_(raters)).order_by(Correction.id))] if raters else []
    quoted = _quoted(session, theirs, ())
    answered = {r["reply_id"] for r in replies}
    quoting = sorted(rid for chat_id, q in quoted.items()
                     for rid, prompt in session.execute(select(Reply.id, Reply.prompt).where(Reply.chat_id == chat_id))
                     if rid not in answered and redact(prompt, q) != prompt)
    return {
        "identities": [str(i) for i in identities],
        "names": sorted({r.sender_name for r in theirs if r.sender_name}),
        "platforms": sorted({r.platform for r in theirs}),
        "chats": [chat_ref(i) for i in chat_ids],
        "messages": messages,
        "replies_to_them": replies,
        "ratings": ratings,
        "corrections": corrections,
        "replies_whose_prompt_quotes_them": quoting,
        "counts": {"messages": len(messages), "replies_to_them": len(replies), "ratings": len(ratings),
                   "corrections": len(corrections), "prompts_quoting_them": len(quoting), "chats": len(chat_ids)},
        "owner_rows_not_theirs": skipped,
        "note": "Training samples on disk are built from these rows; an adapter trained on them holds no rows "
                "that could be exported.",
    }


# --- secrets in rows ---------------------------------------------------------------------------

_guarded = False
_text_columns: dict[Any, list[str]] = {}  # mapper -> its text attributes


def _text_keys(mapper: Any) -> list[str]:
    keys = _text_columns.get(mapper)
    if keys is None:
        keys = _text_columns[mapper] = [
            prop.key for prop in mapper.column_attrs if isinstance(prop.columns[0].type, (String, Text))]
    return keys


def _scrub_row(mapper: Any, connection: Any, target: Any) -> None:
    loaded = inspect(target).dict
    for key in _text_keys(mapper):
        value = loaded.get(key)
        if isinstance(value, str) and value:
            clean = redact_secrets(value)
            if clean != value:
                setattr(target, key, clean)


def guard_rows() -> None:
    """Redact every text column of every row the ORM writes (``common.secrets``): a token pasted
    into a chat is stored, prompted and shown as ``[REDACTED]``. Installed once by the composition
    root; ingest, which writes rows without the ORM, redacts its texts itself."""
    global _guarded
    if _guarded:
        return
    _guarded = True
    from sqlalchemy import event

    from feedback.models import Base

    event.listen(Base, "before_insert", _scrub_row, propagate=True)
    event.listen(Base, "before_update", _scrub_row, propagate=True)
