"""What both bots share: permissions, rate limits, commands, reactions as ratings, /forget.

The platform modules only translate: a platform event becomes a call here, and the answer (a list
of texts) goes back out. Nothing here knows Telegram or Discord.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select

from agent.service import Agent
from common.errors import DoppelError
from common.secrets import redact
from feedback import privacy, store
from feedback.models import Chat, Correction, Message, Rating, Reply, TrainingRun

log = logging.getLogger(__name__)

POSITIVE = ("👍", "❤", "❤️", "🔥", "👏", "😍")
NEGATIVE = ("👎", "💩", "🤮", "😡")


# --- permissions ---------------------------------------------------------------------------------

@dataclass
class PermissionConfig:
    owners: set[str] = field(default_factory=set)
    allow_users: set[str] = field(default_factory=set)
    block_users: set[str] = field(default_factory=set)
    allow_chats: set[str] = field(default_factory=set)
    block_chats: set[str] = field(default_factory=set)
    allow_roles: set[str] = field(default_factory=set)  # Discord role ids or names
    mode: str = "closed"  # closed: owners and the allow lists only; open: everyone not blocked
    rate_limit_per_minute: int = 10

    def to_json(self) -> str:
        return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in asdict(self).items()}, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PermissionConfig:
        out = cls()
        for k, v in data.items():
            if hasattr(out, k):
                setattr(out, k, set(map(str, v)) if isinstance(getattr(out, k), set) else v)
        return out


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class Permissions:
    """Owners, allow and block lists, open or closed mode, a per-user rate limit. Changes made with
    /permissions are saved to a JSON file (atomically) and win over the settings they started from."""

    def __init__(self, config: PermissionConfig, path: Path | None = None) -> None:
        self.path = path
        self.config = config
        if path is not None and path.is_file():
            try:
                saved = PermissionConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
                saved.owners = set(config.owners)  # owners come from the settings only
                self.config = saved
            except (ValueError, OSError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def is_owner(self, user_id: str) -> bool:
        return str(user_id) in self.config.owners

    def check(self, user_id: str, chat_id: str, roles: Iterable[str] = ()) -> Decision:
        c, user, chat = self.config, str(user_id), str(chat_id)
        if user in c.owners:
            return Decision(True)
        if user in c.block_users or chat in c.block_chats:
            return Decision(False, "blocked")
        if c.mode == "closed" and not (user in c.allow_users or chat in c.allow_chats
                                       or set(map(str, roles)) & c.allow_roles):
            return Decision(False, "not allowed")
        return Decision(True)

    def rate_ok(self, user_id: str, now: float | None = None) -> bool:
        if self.is_owner(user_id) or self.config.rate_limit_per_minute <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._hits[str(user_id)]
            while q and now - q[0] > 60:
                q.popleft()
            if len(q) >= self.config.rate_limit_per_minute:
                return False
            q.append(now)
            return True

    def change(self, action: str, target: str = "") -> str:
        c = self.config
        lists = {"allow": c.allow_users, "block": c.block_users, "allow-chat": c.allow_chats,
                 "block-chat": c.block_chats, "allow-role": c.allow_roles}
        if action in ("open", "closed"):
            c.mode = action
            msg = f"Mode is now {action}."
        elif action in lists and target:
            lists[action].add(target)
            if action == "allow":
                c.block_users.discard(target)
            if action == "allow-chat":
                c.block_chats.discard(target)
            msg = f"{action} {target}: done."
        elif action in ("unallow", "unblock") and target:
            for s in (c.allow_users, c.allow_chats, c.allow_roles) if action == "unallow" else (c.block_users, c.block_chats):
                s.discard(target)
            msg = f"{action} {target}: done."
        else:
            return self.describe() + "\n\n" + PERMISSIONS_HELP
        if self.path is not None:
            from knowledge.facts import write_atomic

            write_atomic(self.path, self.config.to_json().encode())
        return msg

    def describe(self) -> str:
        c = self.config
        return (f"mode: {c.mode}; owners: {', '.join(sorted(c.owners)) or '-'}\n"
                f"allowed users: {', '.join(sorted(c.allow_users)) or '-'}; chats: {', '.join(sorted(c.allow_chats)) or '-'}; "
                f"roles: {', '.join(sorted(c.allow_roles)) or '-'}\n"
                f"blocked users: {', '.join(sorted(c.block_users)) or '-'}; chats: {', '.join(sorted(c.block_chats)) or '-'}\n"
                f"rate limit: {c.rate_limit_per_minute} messages a minute per person")


PERMISSIONS_HELP = ("/permissions open | closed | allow USER_ID | block USER_ID | allow-chat CHAT_ID | "
                    "block-chat CHAT_ID | allow-role ROLE | unallow ID | unblock ID")

HELP = """I'm {name}'s digital twin: I answer the way {name} writes.
React to my replies with 👍 or 👎 to teach me; I retrain every night.
Commands:
/reset – start a fresh conversation
/status – model, adapter, facts, last retraining
/forget – delete everything stored about you
/better TEXT – (as a reply to one of my messages) what I should have said
Start a message with ! and I'll stay quiet.
Owner only: /facts [add TEXT], /permissions"""


def reaction_value(emojis: Sequence[str], positive: Sequence[str] = POSITIVE, negative: Sequence[str] = NEGATIVE) -> int:
    """The rating a set of reactions means: +1, -1, or 0 (none of ours, or removed). When someone
    leaves both kinds, the newest (last) one counts."""
    norm = lambda e: e.replace("\ufe0f", "")  # noqa: E731  (❤️ and ❤ are the same heart)
    pos, neg = {norm(e) for e in positive}, {norm(e) for e in negative}
    for e in reversed(list(emojis)):
        if norm(e) in pos:
            return 1
        if norm(e) in neg:
            return -1
    return 0


@dataclass
class Incoming:
    platform: str
    chat_id: str
    chat_kind: str  # private | group
    user_id: str
    user_name: str
    text: str
    message_id: str | None = None
    addressed: bool = True  # private chat, a mention, or a reply to the twin
    reply_to_message_id: str | None = None  # the message it replies to, if any
    roles: tuple[str, ...] = ()
    chat_title: str | None = None


@dataclass
class Outgoing:
    texts: list[str]
    reply_id: int | None = None  # when the texts are a twin reply (reactions on them become ratings)


class BotCore:
    def __init__(self, agent: Agent, permissions: Permissions, *, positive: Sequence[str] = POSITIVE,
                 negative: Sequence[str] = NEGATIVE, max_message_chars: int = 4096,
                 people: Mapping[str, Sequence[str]] | None = None,
                 forget_files: privacy.FileScrubber | None = None) -> None:
        self.agent = agent
        self.permissions = permissions
        self.positive, self.negative = tuple(positive), tuple(negative)
        self.max_message_chars = max_message_chars
        self.people = dict(people or {})  # who is who across platforms (the `people` setting), for /forget
        self.forget_files = forget_files  # scrubs the training set on disk (injected: bots know no trainer)

    # messages ------------------------------------------------------------------------------------

    def refused(self, msg: Incoming) -> Outgoing | None:
        decision = self.permissions.check(msg.user_id, msg.chat_id, msg.roles)
        if not decision.allowed:
            if not msg.addressed:
                return Outgoing([])
            return Outgoing([f"Sorry, I only talk with people {self.agent.config.persona.name} has allowed. "
                             f"Ask them to allow this chat (chat id {msg.chat_id}, your id {msg.user_id})."])
        return None

    def handle(self, msg: Incoming) -> Outgoing:
        """A text message: a command, an aside, context, or a reply from the twin."""
        text = msg.text.strip()
        if not text:
            return Outgoing([])
        if text.startswith("/"):
            return self.command(msg)
        denied = self.refused(msg)
        if denied is not None:
            return denied
        if text.startswith("!"):
            return Outgoing([])  # an aside: not for the twin, not even context
        if not msg.addressed:
            self.agent.observe(msg.chat_id, msg.user_name, text, platform=msg.platform, sender_id=msg.user_id,
                               message_id=msg.message_id, chat_title=msg.chat_title, kind=msg.chat_kind)
            return Outgoing([])
        if not self.permissions.rate_ok(msg.user_id):
            return Outgoing(["You're writing faster than I can think — give me a minute."])
        reply = self.agent.reply(msg.chat_id, msg.user_name, text, platform=msg.platform, sender_id=msg.user_id,
                                 message_id=msg.message_id, chat_title=msg.chat_title, kind=msg.chat_kind)
        return Outgoing(self.split(reply.messages), reply.id)

    def split(self, parts: Sequence[str]) -> list[str]:
        """Messages no longer than the platform allows, cut at a line or a space where possible;
        blank ones are left out (platforms refuse an empty message)."""
        out: list[str] = []
        limit = self.max_message_chars
        for part in parts:
            while len(part) > limit:
                cut = max(part.rfind("\n", 0, limit), part.rfind(" ", 0, limit))
                cut = cut if cut > limit // 2 else limit
                out.append(part[:cut].rstrip())
                part = part[cut:].lstrip()
            out.append(part)
        return [p for p in out if p.strip()]

    def sent(self, reply_id: int | None, message_ids: Sequence[str]) -> None:
        if reply_id is not None and message_ids:
            self.agent.sent(reply_id, [str(m) for m in message_ids])

    # commands ------------------------------------------------------------------------------------

    def command(self, msg: Incoming) -> Outgoing:
        name, _, arg = msg.text.strip().partition(" ")
        name = name.split("@", 1)[0].lower()  # /status@doppel_bot in groups
        arg = arg.strip()
        persona = self.agent.config.persona.name
        if name in ("/start", "/help"):
            return Outgoing([HELP.format(name=persona)])
        owner_only = name in ("/facts", "/permissions")
        if owner_only and not self.permissions.is_owner(msg.user_id):
            return Outgoing([f"Only {persona} can do that."])
        if name != "/forget":  # anyone may ask to be forgotten
            denied = self.refused(msg)
            if denied is not None:
                return denied
        if name == "/reset":
            self.agent.reset(msg.chat_id, platform=msg.platform)
            return Outgoing(["Fresh start: I've forgotten this conversation's context."])
        if name == "/status":
            return Outgoing([self.status()])
        if name == "/forget":
            return Outgoing([self.forget(msg.platform, msg.user_id)])
        if name == "/better":
            return Outgoing([self.better(msg, arg)])
        if name == "/facts":
            return Outgoing([self.facts_command(arg)])
        if name == "/permissions":
            action, _, target = arg.partition(" ")
            return Outgoing([self.permissions.change(action.lower(), target.strip())])
        return Outgoing([f"I don't know {name}. /help lists what I understand."])

    def status(self) -> str:
        rt = self.agent.runtime
        facts = self.agent.facts
        n_facts = len(facts.facts()) if facts is not None and hasattr(facts, "facts") else 0
        with self.agent.sessions() as session:
            last = session.scalars(select(TrainingRun).where(TrainingRun.status != "running")
                                   .order_by(TrainingRun.id.desc()).limit(1)).first()
            last_line = (f"{last.kind} {last.status} on {last.finished_at:%Y-%m-%d %H:%M} UTC" if last and last.finished_at
                         else "never")
        model = getattr(getattr(rt, "base", None), "name_or_path", None) or "the base model"
        return (f"model: {Path(str(model)).name}\nadapter: {rt.adapter_version or 'none (base model)'}\n"
                f"facts: {n_facts}\nlast retraining: {last_line}")

    def facts_command(self, arg: str) -> str:
        kb = self.agent.facts
        if kb is None:
            return "No facts file is loaded."
        sub, _, rest = arg.partition(" ")
        if sub == "add" and rest.strip():
            fact, new = kb.add(rest.strip())  # type: ignore[attr-defined]
            return f"Added: {fact.text}" if new else f"I knew that already: {fact.text}"
        facts = kb.facts()  # type: ignore[attr-defined]
        if not facts:
            return "No facts yet. /facts add I live in Prague."
        lines = [f"• {f.text}" + (f" ({f.topic})" if f.topic else "") for f in facts[:50]]
        more = f"\n…and {len(facts) - 50} more" if len(facts) > 50 else ""
        return "\n".join(lines) + more + "\n\n/facts add TEXT adds one."

    def better(self, msg: Incoming, text: str) -> str:
        if not text:
            return "Reply to one of my messages with /better and what I should have said."
        if not msg.reply_to_message_id:
            return "Use /better as a reply to the message of mine you are correcting."
        with self.agent.sessions() as session:
            reply = find_reply_by_message(session, msg.platform, msg.chat_id, msg.reply_to_message_id)
            reply_id = reply.id if reply else None
        if reply_id is None:
            return "That message isn't one of my replies."
        self.agent.correct(reply_id, f"{msg.platform}:{msg.user_id}", text)
        return "Thanks — I'll learn from that tonight."

    def forget(self, platform: str, user_id: str) -> str:
        """Delete everything stored about the sender (see ``feedback.privacy``), on every platform
        the owner linked to this identity in the ``people`` setting; the answer lists what went."""
        me = f"{platform}:{user_id}"
        try:
            identities = privacy.linked([me], self.people)
        except DoppelError:  # a platform the privacy vocabulary does not know: this identity alone
            identities = [privacy.Identity(platform, str(user_id))]
        report = privacy.forget_everywhere(self.agent.sessions, identities, files=self.forget_files,
                                           self_names=[self.agent.config.persona.name])
        log.info("/forget: removed %s", report.to_dict()["removed"])  # counts only: not who
        return report.message()

    # reactions -----------------------------------------------------------------------------------

    def reaction(self, platform: str, chat_id: str, message_id: str, user_id: str, emojis: Sequence[str],
                 at: datetime | None = None, roles: Iterable[str] = ()) -> int | None:
        """A person's reactions on a message changed to ``emojis``. On one of the twin's replies this
        sets their rating (0 when no rating reaction is left); on other messages it does nothing.
        Rating takes the same permission as talking to the twin (``roles``: the person's Discord
        roles); taking one's own rating back needs none (Discord's remove events carry no roles).
        ``at``: when they reacted, by the platform's clock (an event older than the recorded one is
        ignored). Returns the rating the event asked for, or None."""
        value = reaction_value(emojis, self.positive, self.negative)
        allowed = self.permissions.check(user_id, chat_id, roles).allowed
        if not allowed and value != 0:
            return None
        rater = f"{platform}:{user_id}"
        with self.agent.sessions() as session:
            reply = find_reply_by_message(session, platform, chat_id, message_id)
            reply_id = reply.id if reply else None
            if reply_id is not None and not allowed and not session.scalar(
                    select(Rating.value).where(Rating.reply_id == reply_id, Rating.rater_id == rater)):
                return None  # nothing of theirs to take back
        if reply_id is None:
            return None
        self.agent.rate(reply_id, rater, value, at)
        return value

    def rate_button(self, platform: str, chat_id: str, user_id: str, reply_id: int, value: int,
                    roles: Iterable[str] = ()) -> str:
        """A rating button under one of the twin's replies: the permission a reaction takes, and only
        for a reply the twin sent in that chat. Returns the short answer to show the person."""
        if not self.permissions.check(user_id, chat_id, roles).allowed:
            return f"Sorry, only people {self.agent.config.persona.name} has allowed can rate my replies."
        with self.agent.sessions() as session:
            reply = session.get(Reply, reply_id)
            chat = session.get(Chat, reply.chat_id) if reply is not None else None
            ours = chat is not None and chat.platform == platform and chat.external_id == str(chat_id)
        if not ours:
            return "That isn't one of my replies in this chat."
        return "Thanks!" if self.agent.rate(reply_id, f"{platform}:{user_id}", value) else "Already counted."


def find_reply_by_message(session: Any, platform: str, chat_id: str, message_id: str) -> Reply | None:
    chat = store.get_chat(session, platform, str(chat_id), create=False)
    if chat is None:
        return None
    mid = str(message_id)
    return session.scalars(select(Reply).where(
        Reply.chat_id == chat.id,
        or_(Reply.platform_message_id == mid, Reply.platform_message_id.like(f"{mid},%"),
            Reply.platform_message_id.like(f"%,{mid}"), Reply.platform_message_id.like(f"%,{mid},%")),
    ).order_by(Reply.id.desc()).limit(1)).first()


def safe_error_text(exc: BaseException) -> str:
    if isinstance(exc, DoppelError):
        return f"Sorry — {redact(exc.message)}"
    return "Sorry, something went wrong on my side; it was logged."
