"""The Discord bot through the real discord.py client: the client ``make_client`` builds logs in
against a local stand-in for Discord's REST API, gateway events go through discord.py's own parsers
(real ``Message``, ``Member`` with roles, ``RawReactionActionEvent`` with a ``PartialEmoji``,
``Interaction``), its event dispatch calls the bot's handlers, and its HTTP client sends what the
bot answers. No network."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bots.core import BotCore
from feedback.models import Message, Rating
from tests import fake_discord as d
from tests.test_bots import FRIEND, OWNER, core, sessions  # noqa: F401 (fixtures)

CHANNEL, DM = "7700", "7800"
FRIENDS = "555"  # the role the owner allowed
ANN, EVE = d.user(88, "ann"), d.user(89, "eve")


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def _ratings(sessions: Any) -> dict[str, int]:
    with sessions() as s:
        return {r.rater_id: r.value for r in s.query(Rating)}


async def _connected(core: BotCore, body: Callable[[Any, d.FakeDiscord, Callable[[str, dict[str, Any]], None]],
                                                   Awaitable[None]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The production client, logged in against the stand-in, READY and the guild delivered."""
    import discord

    from bots.discord_bot import make_client

    fake = d.FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api)
    client = make_client(core)
    client._connection.guild_ready_timeout = 0.05  # READY waits this long for more guilds

    def gateway(event: str, data: dict[str, Any]) -> None:  # what DiscordWebSocket.received_message does
        client._connection.parsers[event](data)

    try:
        await client.login("T0KEN")
        gateway("READY", d.ready())
        gateway("GUILD_CREATE", d.guild([d.role(FRIENDS, "friends")], {CHANNEL: "general"}))
        await _until(lambda: bool(fake.commands))  # on_ready synced the slash commands
        await body(client, fake, gateway)
    finally:
        await client.close()
        await fake.stop()


def test_real_client_messages_replies_reactions_and_slash_commands(
        core: BotCore, sessions: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    core.permissions.change("allow-role", "friends")
    caplog.set_level(logging.INFO)
    bot_mention = d.user(4242, "doppel") | {"bot": True}

    async def body(client: Any, fake: d.FakeDiscord, gateway: Callable[[str, dict[str, Any]], None]) -> None:
        assert sorted(c["name"] for c in fake.commands) == ["facts", "forget", "help", "permissions", "reset", "status"]
        # a member with an allowed role mentions the twin in the guild: it types, then answers
        gateway("MESSAGE_CREATE", d.message(CHANNEL, ANN, "<@4242> are you coming tonight?", roles=[FRIENDS],
                                            mentions=[bot_mention]))
        sent = await fake.wait_sent(1)
        assert sent[0]["channel_id"] == CHANNEL and sent[0]["content"] == "reply 1" and CHANNEL in fake.typing
        # talk among people is context, not a question (unless they may not talk to the twin); an aside is neither
        gateway("MESSAGE_CREATE", d.message(CHANNEL, ANN, "she always says that", roles=[FRIENDS], mid="1"))
        gateway("MESSAGE_CREATE", d.message(CHANNEL, EVE, "eve was here", mid="4"))
        gateway("MESSAGE_CREATE", d.message(CHANNEL, ANN, "!aside", roles=[FRIENDS], mid="2"))
        # a reply to the twin's message addresses it; a reply to a deleted message does not
        gateway("MESSAGE_CREATE", d.message(CHANNEL, ANN, "what about after?", roles=[FRIENDS], reply_to=sent[0]))
        await fake.wait_sent(2)
        prompt = core.agent.runtime.prompts[-1]  # type: ignore[attr-defined]
        assert "she always says that" in prompt and "aside" not in prompt and "eve was here" not in prompt
        assert "are you coming tonight?" in prompt and "<@4242>" not in prompt
        gateway("MESSAGE_CREATE", d.message(CHANNEL, ANN, "and the deleted one?", roles=[FRIENDS], reply_to=None, mid="3"))
        await _until(lambda: _stored(sessions, "and the deleted one?"))
        # reactions: an allowed role rates; a member without it does not; a removal withdraws
        first = sent[0]["id"]
        gateway("MESSAGE_REACTION_ADD", d.reaction("add", CHANNEL, first, 88, "👍", roles=[FRIENDS], name="ann"))
        await _until(lambda: _ratings(sessions) == {"discord:88": 1})
        gateway("MESSAGE_REACTION_ADD", d.reaction("add", CHANNEL, first, 89, "👎", name="eve"))
        gateway("MESSAGE_REACTION_ADD", d.reaction("add", CHANNEL, first, 88, "🤔", roles=[FRIENDS], name="ann"))
        gateway("MESSAGE_REACTION_REMOVE", d.reaction("remove", CHANNEL, first, 88, "👍"))
        await _until(lambda: _ratings(sessions) == {"discord:88": 0})
        gateway("MESSAGE_REACTION_ADD", d.reaction("add", CHANNEL, sent[1]["id"], 88, "❤️", roles=[FRIENDS], name="ann"))
        await _until(lambda: _ratings(sessions) == {"discord:88": 1})
        # slash commands answer ephemerally through the interaction's callback
        gateway("INTERACTION_CREATE", d.slash("status", CHANNEL, ANN, roles=[FRIENDS]))
        gateway("INTERACTION_CREATE", d.slash("facts", CHANNEL, ANN, roles=[FRIENDS], text="add I own a kayak."))
        gateway("INTERACTION_CREATE", d.slash("facts", CHANNEL, d.user(OWNER, "owner"), text="add I own a kayak."))
        await _until(lambda: len(fake.responses) == 3)
        answers = {r["data"]["content"] for r in fake.responses}
        assert all(r["type"] == 4 and r["data"]["flags"] == 64 for r in fake.responses)  # ephemeral messages
        assert any("adapter: v7" in a for a in answers) and "Only Alex can do that." in answers
        assert "Added: I own a kayak." in answers
        # a direct message from an allowed user, and the bot's own messages are never answered
        gateway("MESSAGE_CREATE", d.message(DM, d.user(FRIEND), "hey there", in_guild=False))
        await fake.wait_sent(3)
        assert fake.sent[2]["channel_id"] == DM
        gateway("MESSAGE_CREATE", d.message(CHANNEL, bot_mention, "<@4242> echo", mentions=[bot_mention]))
        await asyncio.sleep(0.3)
        assert len(fake.sent) == 3
        # a reconnect that could not resume: READY again, and the slash commands are not synced again
        gateway("READY", d.ready())
        gateway("GUILD_CREATE", d.guild([d.role(FRIENDS, "friends")], {CHANNEL: "general"}))
        await _until(lambda: sum("running" in r.getMessage() for r in caplog.records) == 2)
        assert sum(r.startswith("PUT /applications/") for r in fake.requests) == 1

    asyncio.run(_connected(core, body, monkeypatch))
    assert _ratings(sessions) == {"discord:88": 1}
    unhandled = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert unhandled == []


def _stored(sessions: Any, text: str) -> bool:
    with sessions() as s:
        return s.query(Message).filter(Message.text == text).count() == 1


def test_real_client_survives_what_discord_refuses(
        core: BotCore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A channel the bot may not post in (403) and an answer over 2000 characters (Discord's 400)."""
    core.max_message_chars = 2000  # as `doppel bot discord` builds it
    kb = core.agent.facts
    kb.facts_path.write_text(kb.facts_path.read_text() + "".join(  # type: ignore[union-attr]
        f"- Fact {i}: something worth remembering about me, and then some more of it.\n" for i in range(40)))
    caplog.set_level(logging.INFO)

    async def body(client: Any, fake: d.FakeDiscord, gateway: Callable[[str, dict[str, Any]], None]) -> None:
        fake.forbidden.add(CHANNEL)
        gateway("MESSAGE_CREATE", d.message(CHANNEL, d.user(FRIEND), "<@4242> hi", mentions=[d.user(4242, "doppel")]))
        await _until(lambda: any("may not" in r.getMessage() for r in caplog.records if r.name == "bots.discord_bot"))
        gateway("MESSAGE_CREATE", d.message(DM, d.user(OWNER, "owner"), "/facts", in_guild=False))
        sent = await fake.wait_sent(2)
        assert all(len(m["content"]) <= 2000 for m in sent) and "Fact 39:" in sent[-1]["content"]

    asyncio.run(_connected(core, body, monkeypatch))
    unhandled = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert unhandled == []
