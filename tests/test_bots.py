"""Bots: the real aiogram client against a local Bot API server; Discord handlers with fakes of the
discord.py interfaces; permissions, reactions, commands."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.prompt import Persona
from agent.service import Agent, AgentConfig
from bots.core import BotCore, Incoming, PermissionConfig, Permissions, reaction_value
from feedback.db import make_session_factory
from feedback.models import Correction, Message, Rating, Reply
from knowledge.index import KnowledgeBase
from tests.fake_telegram import BOT_USER, FakeBotAPI
from tests.helpers import FakeEmbedder, ScriptedRuntime, run_cli

OWNER, FRIEND, STRANGER = "1", "7", "666"


@pytest.fixture
def sessions(engine):  # type: ignore[no-untyped-def]
    return make_session_factory(engine)


@pytest.fixture
def core(tokenizer: Any, sessions: Any, tmp_path: Path) -> BotCore:
    facts = tmp_path / "facts.md"
    facts.write_text("## Pets\n- My cat is called Knedlík.\n")
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    agent = Agent(ScriptedRuntime(tokenizer), kb, sessions, AgentConfig(persona=Persona("Alex")))  # type: ignore[arg-type]
    perms = Permissions(PermissionConfig(owners={OWNER}, allow_users={FRIEND}, rate_limit_per_minute=100),
                        tmp_path / "permissions.json")
    return BotCore(agent, perms)


# --- shared logic ---
def test_reaction_values() -> None:
    assert reaction_value(["👍"]) == 1 and reaction_value(["❤️"]) == 1 and reaction_value(["💩"]) == -1
    assert reaction_value(["🤔"]) == 0 and reaction_value([]) == 0
    assert reaction_value(["👍", "👎"]) == -1  # the newest counts
    assert reaction_value(["🎉"], positive=["🎉"], negative=[]) == 1


def test_permissions_modes_lists_and_rate_limit(tmp_path: Path) -> None:
    p = Permissions(PermissionConfig(owners={"1"}, allow_users={"7"}, allow_chats={"-100"}, allow_roles={"friends"},
                                     block_users={"8"}, rate_limit_per_minute=2), tmp_path / "perm.json")
    assert p.check("1", "x").allowed and p.check("7", "x").allowed and p.check("9", "-100").allowed
    assert p.check("9", "x", roles=["friends"]).allowed
    assert not p.check("9", "x").allowed and not p.check("8", "-100").allowed  # block wins over the chat
    assert p.rate_ok("7", 0) and p.rate_ok("7", 1) and not p.rate_ok("7", 2) and p.rate_ok("7", 61.5)
    assert all(p.rate_ok("1", float(i)) for i in range(10))  # owners are never limited
    p.change("open")
    p.change("block", "9")
    assert p.check("5", "x").allowed and not p.check("9", "x").allowed
    # the change survives a restart; owners still come from the settings
    again = Permissions(PermissionConfig(owners={"2"}), tmp_path / "perm.json")
    assert again.config.mode == "open" and again.is_owner("1") is False and again.is_owner("2")
    assert "9" in again.config.block_users


def test_commands_and_forget(core: BotCore, sessions: Any) -> None:
    def say(user: str, text: str, **kw: Any) -> list[str]:
        return core.handle(Incoming("telegram", "c1", "private", user, "Bob", text, **kw)).texts

    assert "digital twin" in say(FRIEND, "/help")[0]
    assert say(STRANGER, "hello")[0].startswith("Sorry") and "c1" in say(STRANGER, "hello")[0]
    assert say(FRIEND, "!note to self") == []
    out = core.handle(Incoming("telegram", "c1", "private", FRIEND, "Bob", "hi", message_id="10"))
    core.sent(out.reply_id, ["5001"])
    assert "adapter: v7" in say(FRIEND, "/status")[0]
    assert say(FRIEND, "/facts")[0] == "Only Alex can do that."
    assert "Knedlík" in say(OWNER, "/facts")[0]
    assert say(OWNER, "/facts add I live in Brno.")[0] == "Added: I live in Brno."
    assert "closed" in say(OWNER, "/permissions")[0]
    assert say(OWNER, "/permissions allow 666")[0].startswith("allow 666")
    assert not say(STRANGER, "hello again")[0].startswith("Sorry")
    # a correction, as a reply to the twin's message
    assert "learn" in say(FRIEND, "/better nah, tomorrow", reply_to_message_id="5001")[0]
    assert core.reaction("telegram", "c1", "5001", FRIEND, ["👍"]) == 1
    gone = say(FRIEND, "/forget")[0]
    assert "your messages: 1\n• my replies to you: 1" in gone and "your ratings: 1\n• your corrections: 1" in gone
    with sessions() as s:
        assert s.query(Message).filter(Message.sender_id == FRIEND).count() == 0
        assert s.query(Rating).count() == 0 and s.query(Correction).count() == 0


def test_long_replies_are_split(core: BotCore) -> None:
    core.max_message_chars = 50
    parts = core.split(["word " * 30])
    assert len(parts) == 3 and all(len(p) <= 50 for p in parts) and " ".join(parts).split() == ["word"] * 30


# --- Telegram, through the real aiogram client ---
async def _with_bot(core: BotCore, api: FakeBotAPI, body: Any, buttons: bool = False) -> None:
    from bots.telegram import ALLOWED_UPDATES, build_dispatcher, make_bot

    await api.start()
    bot = make_bot(api.token, api.url)
    me = await bot.get_me()
    dp = build_dispatcher(core, me, buttons)
    task = asyncio.create_task(dp.start_polling(bot, handle_signals=False, allowed_updates=ALLOWED_UPDATES, polling_timeout=1))
    try:
        await body()
    finally:
        await dp.stop_polling()
        await asyncio.wait_for(task, 10)
        await api.stop()


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


def _rating(sessions: Any) -> list[tuple[str, int]]:
    with sessions() as s:
        return [(r.rater_id, r.value) for r in s.query(Rating)]


def test_telegram_message_reply_and_reactions(core: BotCore, sessions: Any) -> None:
    api = FakeBotAPI()
    core.agent.runtime.replies = ["sure!\nsee you at 7"]  # type: ignore[attr-defined]

    async def body() -> None:
        api.message(int(FRIEND), int(FRIEND), "are you coming tonight?")
        sent = await api.wait_sent(2)
        assert [m["text"] for m in sent] == ["sure!", "see you at 7"]
        assert any(a.get("action") == "typing" for a in api.actions)
        first = sent[0]["message_id"]
        api.reaction(int(FRIEND), first, int(FRIEND), ["👍"])
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", 1)])
        api.reaction(int(FRIEND), sent[1]["message_id"], int(FRIEND), ["👎"], old=["👍"])  # changed, on the other part
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", -1)])
        api.reaction(int(FRIEND), sent[1]["message_id"], int(FRIEND), [], old=["👎"])  # removed
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", 0)])
        api.reaction(int(FRIEND), 12345, int(FRIEND), ["👍"])  # not the twin's message
        api.message(int(FRIEND), int(FRIEND), "/status")
        await api.wait_sent(3)
        assert _rating(sessions) == [(f"telegram:{FRIEND}", 0)]

    asyncio.run(_with_bot(core, api, body))
    with sessions() as s:
        reply = s.query(Reply).one()
        assert reply.platform_message_id == ",".join(str(m["message_id"]) for m in api.sent[:2])


def test_telegram_groups_asides_refusals_and_flood_wait(core: BotCore, sessions: Any) -> None:
    api = FakeBotAPI()

    async def body() -> None:
        group = -100
        api.message(group, int(FRIEND), "just chatting among ourselves", chat_type="group")
        api.message(group, int(FRIEND), "!aside", chat_type="group")
        api.message(group, int(FRIEND), "@doppel_bot what do you think?", chat_type="group")
        sent = await api.wait_sent(1)
        assert sent[0]["chat_id"] == group
        prompt = core.agent.runtime.prompts[-1]  # type: ignore[attr-defined]
        assert "just chatting among ourselves" in prompt and "aside" not in prompt
        assert "@doppel_bot" not in prompt
        # a reply to the twin's message in the group addresses it too
        api.message(group, int(FRIEND), "and then?", chat_type="group",
                    reply_to={"message_id": sent[0]["message_id"], "date": 0, "chat": {"id": group, "type": "group", "title": "G"},
                              "from": BOT_USER, "text": sent[0]["text"]})
        await api.wait_sent(2)
        api.message(int(STRANGER), int(STRANGER), "hello?")
        refusal = (await api.wait_sent(3))[2]
        assert refusal["chat_id"] == int(STRANGER) and STRANGER in refusal["text"]
        api.flood_once = True  # Telegram says: retry after 1 s
        t0 = time.monotonic()
        api.message(int(FRIEND), int(FRIEND), "still there?")
        await api.wait_sent(4)
        assert time.monotonic() - t0 >= 1.0

    asyncio.run(_with_bot(core, api, body))
    assert len(core.agent.runtime.prompts) == 3  # type: ignore[attr-defined]


def test_telegram_generation_error_sends_an_apology(core: BotCore) -> None:
    api = FakeBotAPI()
    core.agent.runtime.fail = RuntimeError("CUDA exploded")  # type: ignore[attr-defined]

    async def body() -> None:
        api.message(int(FRIEND), int(FRIEND), "hi")
        sent = await api.wait_sent(1)
        assert sent[0]["text"].startswith("Sorry") and "CUDA" not in sent[0]["text"]

    asyncio.run(_with_bot(core, api, body))


def test_telegram_rating_buttons(core: BotCore, sessions: Any) -> None:
    api = FakeBotAPI()

    async def body() -> None:
        api.message(int(FRIEND), int(FRIEND), "hi")
        sent = await api.wait_sent(1)
        buttons = sent[0]["reply_markup"]["inline_keyboard"][0]
        assert [b["text"] for b in buttons] == ["👍", "👎"]
        api.push(callback_query={"id": "q1", "from": {"id": int(FRIEND), "is_bot": False, "first_name": "Bob"},
                                 "chat_instance": "x", "data": buttons[1]["callback_data"],
                                 "message": {"message_id": sent[0]["message_id"], "date": 0, "text": sent[0]["text"],
                                             "chat": {"id": int(FRIEND), "type": "private", "first_name": "Bob"},
                                             "from": BOT_USER}})
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", -1)])

    asyncio.run(_with_bot(core, api, body, buttons=True))


# --- Discord, with fakes of the discord.py interfaces ---
class FakeChannel:
    def __init__(self, cid: int, name: str = "general") -> None:
        self.id, self.name = cid, name
        self.sent: list[str] = []
        self.typing_used = 0

    async def send(self, text: str) -> Any:
        self.sent.append(text)
        return SimpleNamespace(id=9000 + len(self.sent))

    def typing(self) -> Any:
        channel = self

        class _Typing:
            async def __aenter__(self) -> None:
                channel.typing_used += 1

            async def __aexit__(self, *exc: Any) -> None:
                return None

        return _Typing()


def _dmsg(channel: FakeChannel, author_id: int, text: str, guild: Any = None, mentions: list[Any] = (), mid: int = 1) -> Any:  # type: ignore[assignment]
    author = SimpleNamespace(id=author_id, bot=False, display_name="Bob", roles=[])
    return SimpleNamespace(author=author, content=text, channel=channel, guild=guild, mentions=list(mentions), id=mid,
                           reference=None)


def test_discord_dm_mentions_reactions_and_slash(core: BotCore, sessions: Any) -> None:
    from bots.discord_bot import DiscordHandlers

    h = DiscordHandlers(core, bot_user_id=4242)
    dm = FakeChannel(55)

    async def flow() -> None:
        await h.on_message(_dmsg(dm, int(FRIEND), "hey there"))
        assert dm.sent == ["reply 1"] and dm.typing_used == 1
        payload = SimpleNamespace(user_id=int(FRIEND), channel_id=55, message_id=9001, emoji="👍")
        await h.on_raw_reaction_add(payload)
        assert _rating(sessions) == [(f"discord:{FRIEND}", 1)]
        await h.on_raw_reaction_add(SimpleNamespace(user_id=int(FRIEND), channel_id=55, message_id=9001, emoji="🤔"))
        assert _rating(sessions) == [(f"discord:{FRIEND}", 1)]  # not a rating emoji
        await h.on_raw_reaction_remove(payload)
        assert _rating(sessions) == [(f"discord:{FRIEND}", 0)]
        await h.on_raw_reaction_add(SimpleNamespace(user_id=int(FRIEND), channel_id=55, message_id=1234, emoji="👍"))
        assert _rating(sessions) == [(f"discord:{FRIEND}", 0)]  # someone else's message
        guild_ch = FakeChannel(77)
        guild = SimpleNamespace(id=1)
        await h.on_message(_dmsg(guild_ch, int(FRIEND), "talking to people", guild=guild, mid=2))
        await h.on_message(_dmsg(guild_ch, int(FRIEND), "!aside", guild=guild, mid=3))
        assert guild_ch.sent == []
        await h.on_message(_dmsg(guild_ch, int(FRIEND), "<@4242> you there?", guild=guild,
                                 mentions=[SimpleNamespace(id=4242)], mid=4))
        assert guild_ch.sent == ["reply 2"]
        assert "talking to people" in core.agent.runtime.prompts[-1]  # type: ignore[attr-defined]
        assert "<@4242>" not in core.agent.runtime.prompts[-1]  # type: ignore[attr-defined]
        interaction = SimpleNamespace(channel_id=77, guild_id=1, user=SimpleNamespace(id=int(FRIEND), roles=[]))
        assert "adapter: v7" in await h.slash("status", interaction)
        bot_msg = _dmsg(dm, 4242, "echo", mid=5)
        bot_msg.author.bot = True
        await h.on_message(bot_msg)
        assert dm.sent == ["reply 1"]

    asyncio.run(flow())


def test_discord_client_builds_with_slash_commands(core: BotCore) -> None:
    from bots.discord_bot import make_client

    async def build() -> list[str]:
        client = make_client(core)
        return sorted(c.name for c in client._connection._command_tree.get_commands())  # type: ignore[attr-defined]

    names = asyncio.run(build())
    assert names == ["facts", "forget", "help", "permissions", "reset", "status"]


# --- command line ---
def test_feedback_list_and_bot_errors(engine: Any, sessions: Any, core: BotCore, monkeypatch: pytest.MonkeyPatch) -> None:
    out = core.handle(Incoming("http", "c9", "private", FRIEND, "Bob", "hi there", message_id="1"))
    core.agent.rate(out.reply_id, "telegram:7", -1)  # type: ignore[arg-type]
    core.agent.correct(out.reply_id, "telegram:7", "hello!")  # type: ignore[arg-type]
    env = {"DOPPEL_DATABASE_URL": str(engine.url)}
    listed = run_cli("feedback", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["kind"] for r in rows} == {"rating", "correction"}
    assert all(r["message"] == "hi there" and r["reply"] == "reply 1" for r in rows)
    no_token = run_cli("bot", "telegram", env=env)
    assert no_token.returncode == 2 and "DOPPEL_TELEGRAM_TOKEN" in no_token.stderr
    assert "DOPPEL_DISCORD_TOKEN" in run_cli("bot", "discord", env=env).stderr


@pytest.mark.postgres
def test_live_path_on_postgres(pg_url: str, tokenizer: Any, tmp_path: Path) -> None:
    """Replies, reactions, corrections, /forget and the scheduler's table on PostgreSQL."""
    import threading

    from doppel.migrate import drift, upgrade
    from feedback.db import make_engine

    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    agent = Agent(ScriptedRuntime(tokenizer), None, sessions, AgentConfig(persona=Persona("Alex")))  # type: ignore[arg-type]
    core = BotCore(agent, Permissions(PermissionConfig(mode="open", rate_limit_per_minute=0)))
    # first messages of a new chat, at once: the chat is created once
    outs: list[Any] = []
    threads = [threading.Thread(target=lambda i=i: outs.append(core.handle(
        Incoming("telegram", "pg", "group", FRIEND, "Bob", f"msg {i}", message_id=str(i))))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outs) == 4
    core.sent(outs[0].reply_id, ["900", "901"])
    assert core.reaction("telegram", "pg", "901", FRIEND, ["👎"]) == -1
    assert core.reaction("telegram", "pg", "901", FRIEND, []) == 0
    assert core.reaction("telegram", "pg", "9011", FRIEND, ["👍"]) is None  # a prefix is not a match
    core.agent.correct(outs[0].reply_id, f"telegram:{FRIEND}", "better text")  # type: ignore[arg-type]
    gone = core.forget("telegram", FRIEND)
    assert "your messages: 4\n• my replies to you: 4" in gone and "your ratings: 1\n• your corrections: 1" in gone
    assert drift(engine) == []
    engine.dispose()
