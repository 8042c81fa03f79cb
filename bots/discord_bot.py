"""The Discord face (discord.py): DMs and mentions get replies, raw reaction events on the twin's
replies become ratings, and the commands are slash commands.

``DiscordHandlers`` holds the logic against the few attributes of discord.py objects it reads;
``make_client`` wires it to a real ``discord.Client``. The tests drive the real client
(``tests/test_discord_real.py``: discord.py's own parsers and event dispatch, a stand-in for
Discord's REST API) and, for quick cases, the handlers with fakes of those interfaces.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from bots.core import BotCore, Incoming, safe_error_text

log = logging.getLogger(__name__)

DISCORD_LIMIT = 2000


@asynccontextmanager
async def typing(channel: Any) -> AsyncIterator[None]:
    """"typing…" in the channel while the body runs. Best effort: a channel that refuses it (the
    bot may not post there) still gets the reply attempted, which then says so in the log."""
    indicator = channel.typing()
    try:
        await indicator.__aenter__()
    except Exception as exc:  # discord.Forbidden, a network error: the reply matters, not this
        log.debug("channel %s: typing failed: %s", getattr(channel, "id", "?"), exc)
        yield
        return
    try:
        yield
    finally:
        await indicator.__aexit__(None, None, None)


async def send_texts(channel: Any, texts: Sequence[str]) -> list[str]:
    """Send ``texts`` in order; returns the ids of the messages that went out. What Discord refuses
    is logged, never retried: a channel the bot may not post in (403) gets nothing more, a message
    it rejects (400) is skipped. discord.py itself retries rate limits and server errors; a network
    that stays down loses the rest, logged."""
    from discord import Forbidden, HTTPException

    ids: list[str] = []
    where = getattr(channel, "id", "?")
    for i, text in enumerate(texts):
        try:
            sent = await channel.send(text)
        except Forbidden as exc:
            log.warning("channel %s: the bot may not post there (%s); the reply is not sent", where, exc.text)
            break
        except HTTPException as exc:
            log.warning("channel %s: Discord refused a message of %d characters (%s: %s); skipped",
                        where, len(text), exc.status, exc.text)
            continue
        except Exception as exc:  # the network (discord.py has retried already)
            log.warning("channel %s: sending failed (%s); %d message(s) not sent", where, exc, len(texts) - i)
            break
        ids.append(str(sent.id))
    return ids


def member_roles(member: Any) -> tuple[str, ...]:
    """A guild member's role ids and names (the allow list may name either); none outside a guild."""
    roles = list(getattr(member, "roles", None) or [])
    return tuple(str(r.id) for r in roles) + tuple(r.name for r in roles)


class DiscordHandlers:
    def __init__(self, core: BotCore, bot_user_id: int | None = None) -> None:
        self.core = core
        self.bot_user_id = bot_user_id
        self._channel_locks: dict[int, asyncio.Lock] = {}

    def _addressed(self, message: Any) -> bool:
        if message.guild is None:  # a DM
            return True
        if any(getattr(m, "id", None) == self.bot_user_id for m in message.mentions):
            return True
        ref = getattr(message, "reference", None)
        resolved = getattr(ref, "resolved", None) if ref else None  # a DeletedReferencedMessage has no author
        author_id = getattr(getattr(resolved, "author", None), "id", None)
        return author_id is not None and author_id == self.bot_user_id

    async def on_message(self, message: Any) -> None:
        if message.author.bot:
            return
        text = message.content or ""
        if self.bot_user_id is not None:
            text = text.replace(f"<@{self.bot_user_id}>", "").replace(f"<@!{self.bot_user_id}>", "").strip()
        ref = getattr(message, "reference", None)
        roles = member_roles(message.author)
        incoming = Incoming(
            platform="discord", chat_id=str(message.channel.id), chat_kind="private" if message.guild is None else "group",
            user_id=str(message.author.id), user_name=getattr(message.author, "display_name", None) or str(message.author),
            text=text, message_id=str(message.id), addressed=self._addressed(message),
            reply_to_message_id=str(ref.message_id) if ref and getattr(ref, "message_id", None) else None,
            roles=roles, chat_title=getattr(message.channel, "name", None),
        )
        # discord.py runs each event as its own task: one channel's messages are handled in order,
        # so its context is stored in the order it was written, while other channels go on
        async with self._channel_locks.setdefault(message.channel.id, asyncio.Lock()):
            await self._answer(message, incoming)

    async def _answer(self, message: Any, incoming: Incoming) -> None:
        try:
            if incoming.addressed and not incoming.text.startswith(("/", "!")):
                async with typing(message.channel):
                    out = await asyncio.to_thread(self.core.handle, incoming)
            else:
                out = await asyncio.to_thread(self.core.handle, incoming)
        except Exception as exc:
            log.exception("generating a reply failed")
            if incoming.addressed:
                await send_texts(message.channel, [safe_error_text(exc)])
            return
        # every answer, a command's too, in messages Discord takes (none empty, none over the limit)
        ids = await send_texts(message.channel, self.core.split(out.texts))
        if out.reply_id is not None:
            await asyncio.to_thread(self.core.sent, out.reply_id, ids)

    async def _reaction(self, payload: Any, added: bool) -> None:
        if payload.user_id == self.bot_user_id:
            return
        emoji = str(payload.emoji)
        # Discord sends one event per emoji; the rating follows the last one added, and removing
        # the emoji that set it withdraws it
        value = await asyncio.to_thread(self._apply, payload, emoji, added)
        lock = self._channel_locks.get(payload.channel_id)
        if value is None and lock is not None and lock.locked():
            # the reply it rates may be sent but not yet stored: once this channel's answer is done, again
            async with lock:
                pass
            value = await asyncio.to_thread(self._apply, payload, emoji, added)
        if value is not None:
            log.info("rating %s on message %s", value, payload.message_id)

    def _apply(self, payload: Any, emoji: str, added: bool) -> int | None:
        from bots.core import reaction_value

        value = reaction_value([emoji], self.core.positive, self.core.negative)
        if value == 0:
            return None
        if not added:  # removed: withdraw only if this emoji's meaning is the current rating
            current = self._current_rating(payload)
            if current != value:
                return None
            value = 0
        # an add event carries the member (with roles) in a guild; a remove event never does
        return self.core.reaction("discord", str(payload.channel_id), str(payload.message_id), str(payload.user_id),
                                  [emoji] if value else [], roles=member_roles(getattr(payload, "member", None)))

    def _current_rating(self, payload: Any) -> int | None:
        from sqlalchemy import select

        from bots.core import find_reply_by_message
        from feedback.models import Rating

        with self.core.agent.sessions() as session:
            reply = find_reply_by_message(session, "discord", str(payload.channel_id), str(payload.message_id))
            if reply is None:
                return None
            return session.scalar(select(Rating.value).where(Rating.reply_id == reply.id,
                                                             Rating.rater_id == f"discord:{payload.user_id}"))

    async def on_raw_reaction_add(self, payload: Any) -> None:
        await self._reaction(payload, True)

    async def on_raw_reaction_remove(self, payload: Any) -> None:
        await self._reaction(payload, False)

    async def slash(self, name: str, interaction: Any, arg: str = "") -> str:
        """A slash command, answered through the same command code as Telegram's."""
        incoming = Incoming(platform="discord", chat_id=str(interaction.channel_id),
                            chat_kind="private" if interaction.guild_id is None else "group",
                            user_id=str(interaction.user.id), user_name=str(interaction.user), text=f"/{name} {arg}".strip(),
                            roles=member_roles(interaction.user))
        out = await asyncio.to_thread(self.core.command, incoming)
        return "\n".join(out.texts)[:DISCORD_LIMIT]


def make_client(core: BotCore) -> Any:
    """A discord.py client with the handlers and slash commands attached."""
    import discord
    from discord import app_commands

    intents = discord.Intents.default()
    intents.message_content = True
    intents.dm_messages = True
    intents.reactions = True
    client = discord.Client(intents=intents)
    tree = app_commands.CommandTree(client)
    handlers = DiscordHandlers(core)

    def register(name: str, description: str, with_arg: bool = False) -> None:
        if with_arg:
            @tree.command(name=name, description=description)
            async def cmd(interaction: discord.Interaction, text: str = "") -> None:
                await interaction.response.send_message(await handlers.slash(name, interaction, text), ephemeral=True)
        else:
            @tree.command(name=name, description=description)
            async def cmd(interaction: discord.Interaction) -> None:  # type: ignore[no-redef]
                await interaction.response.send_message(await handlers.slash(name, interaction), ephemeral=True)

    for name, desc in (("help", "What the twin is and how to teach it"), ("reset", "Start a fresh conversation"),
                       ("status", "Model, adapter, facts, last retraining"),
                       ("forget", "Delete everything stored about you")):
        register(name, desc)
    register("facts", "Owner: list facts, or `add TEXT`", with_arg=True)
    register("permissions", "Owner: see or change who may talk to the twin", with_arg=True)

    synced: list[bool] = []

    @client.event
    async def on_ready() -> None:
        handlers.bot_user_id = client.user.id if client.user else None
        if not synced:  # READY comes again after every reconnect that could not resume; the commands do not change
            await tree.sync()
            synced.append(True)
        log.info("Discord bot %s is running", client.user)

    client.event(handlers.on_message)
    client.event(handlers.on_raw_reaction_add)
    client.event(handlers.on_raw_reaction_remove)
    return client
