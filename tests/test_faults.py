"""Races and faults: concurrent and reordered reactions, a reindex beside the serving index, a
registry that survives a killed process, and a Telegram bot that outlives the errors Telegram sends."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.service import Agent
from bots.core import BotCore
from feedback import store
from feedback.db import make_engine, make_session_factory
from feedback.models import Rating, TrainingRun
from tests.fake_telegram import BOT_USER, FakeBotAPI
from tests.helpers import FakeEmbedder
from tests.test_bots import FRIEND, OWNER, STRANGER, _rating, _until, _with_bot, core, sessions  # noqa: F401 (fixtures)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


# --- ratings: one row per (reply, rater), whatever arrives at once or out of order ---
@pytest.fixture(params=["sqlite", "postgresql"])
def db_sessions(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    from doppel.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'race.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _replies(sessions: Any, n: int) -> list[int]:
    with sessions.begin() as s:
        chat = store.get_chat(s, "telegram", "race")
        return [store.record_reply(s, chat, None, f"reply {i}", "prompt", [], None, 1.0).id for i in range(n)]


def test_concurrent_reactions_of_one_person_make_one_rating(db_sessions: Any) -> None:
    """A quick change and a redelivered update, at once, on separate connections: no IntegrityError,
    one row, and exactly one of several identical events counts as a change."""
    agent = Agent(None, None, db_sessions)  # type: ignore[arg-type]
    rounds, workers = 8, 6
    errors: list[BaseException] = []
    for reply_id in _replies(db_sessions, rounds):
        barrier = threading.Barrier(workers)
        changed: list[bool] = []

        def hit(value: int) -> None:
            try:
                barrier.wait(5)
                changed.append(agent.rate(reply_id, "telegram:7", value))
            except BaseException as exc:  # noqa: BLE001 - the test reports every failure
                errors.append(exc)

        threads = [threading.Thread(target=hit, args=(1,)) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert changed.count(True) == 1  # the same 👍 six times is one rating
    with db_sessions() as s:
        rows = s.query(Rating).all()
        assert len(rows) == rounds and {r.value for r in rows} == {1}


def test_concurrent_changes_settle_on_one_row(db_sessions: Any) -> None:
    agent = Agent(None, None, db_sessions)  # type: ignore[arg-type]
    (reply_id,) = _replies(db_sessions, 1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def hit(value: int) -> None:
        try:
            barrier.wait(5)
            for _ in range(5):
                agent.rate(reply_id, "telegram:7", value)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hit, args=(1 if i % 2 else -1,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with db_sessions() as s:
        assert [r.value in (1, -1) for r in s.query(Rating)] == [True]


def test_an_older_reaction_event_does_not_undo_a_newer_one(db_sessions: Any) -> None:
    """Telegram does not order reactions: 👍 (12:00) then 👎 (12:05) may arrive reversed."""
    agent = Agent(None, None, db_sessions)  # type: ignore[arg-type]
    a, b = _replies(db_sessions, 2)
    assert agent.rate(a, "telegram:7", -1, at=T0 + timedelta(minutes=5)) is True
    assert agent.rate(a, "telegram:7", 1, at=T0) is False  # older: ignored
    # 👍 12:00, 👎 12:01, 👍 12:02 arriving as 12:00, 12:02, 12:01: the 👍 of 12:02 stands
    assert agent.rate(b, "telegram:7", 1, at=T0) is True
    assert agent.rate(b, "telegram:7", 1, at=T0 + timedelta(minutes=2)) is False  # the same, newer
    assert agent.rate(b, "telegram:7", -1, at=T0 + timedelta(minutes=1)) is False
    agent.rate(b, "eve", -1)  # no event time (the HTTP API, the console): applied as it comes
    with db_sessions() as s:
        got = {(r.reply_id, r.rater_id): r.value for r in s.query(Rating)}
    assert got == {(a, "telegram:7"): -1, (b, "telegram:7"): 1, (b, "eve"): -1}
    assert agent.rate(b, "telegram:7", -1) is True  # a timeless event (a rating button) always applies
    assert agent.rate(b, "telegram:7", 1, at=T0 + timedelta(minutes=1)) is False  # still older than 12:02


def test_a_reaction_before_its_reply_is_stored_still_counts(core: BotCore, sessions: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply's message ids are stored after Telegram took the send; a 👍 handled in between
    (updates run concurrently; a slow database makes the gap seconds) waits for the store."""
    import time as _time

    stored = core.sent

    def slow_store(reply_id: Any, message_ids: Any) -> None:
        _time.sleep(1.0)
        stored(reply_id, message_ids)

    monkeypatch.setattr(core, "sent", slow_store)
    api = FakeBotAPI()

    async def body() -> None:
        api.message(int(FRIEND), int(FRIEND), "hi")
        sent = await api.wait_sent(1)
        api.reaction(int(FRIEND), sent[0]["message_id"], int(FRIEND), ["👍"])  # while the ids are being stored
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", 1)], timeout=10.0)

    asyncio.run(_with_bot(core, api, body))


def test_telegram_reactions_delivered_in_reverse_keep_the_newest(core: BotCore, sessions: Any) -> None:
    """👍 at 12:00 then 👎 at 12:05, delivered 👎 first: the rating stays 👎."""
    api = FakeBotAPI()
    noon = int(T0.timestamp())

    async def body() -> None:
        api.message(int(FRIEND), int(FRIEND), "hi")
        sent = await api.wait_sent(1)
        mid = sent[0]["message_id"]
        api.reaction(int(FRIEND), mid, int(FRIEND), ["👎"], old=["👍"], date=noon + 300)
        await _until(lambda: _rating(sessions) == [(f"telegram:{FRIEND}", -1)])
        api.reaction(int(FRIEND), mid, int(FRIEND), ["👍"], date=noon)  # the older event, late
        api.message(int(FRIEND), int(FRIEND), "/help")  # handled after the reaction (one poll, in order)
        await api.wait_sent(2)
        await asyncio.sleep(0.3)

    asyncio.run(_with_bot(core, api, body))
    assert _rating(sessions) == [(f"telegram:{FRIEND}", -1)]
    with sessions() as s:
        assert s.query(Rating).one().reacted_at == T0 + timedelta(minutes=5)


# --- the facts index: a reindex builds beside the serving snapshot ---
class GatedEmbedder(FakeEmbedder):
    """Blocks on ``release`` when asked for more than a query's two texts (a reindex)."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, texts: Any, batch_size: int = 64, progress: Any = None) -> Any:
        if self.gated and len(texts) > 2:
            self.started.set()
            assert self.release.wait(30), "never released"
        return super().encode(texts, batch_size, progress)


def test_a_reindex_does_not_hold_up_replies(tmp_path: Path) -> None:
    from knowledge.index import KnowledgeBase, RetrievalConfig

    facts = tmp_path / "facts.md"
    facts.write_text("## Pets\n- My cat is called Knedlík.\n- I walk the neighbour's dog on Sundays.\n")
    emb = GatedEmbedder()
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", emb, RetrievalConfig(min_score=0.0))
    kb.refresh()
    emb.gated = True
    errors: list[BaseException] = []

    def reindex() -> None:
        try:
            kb.refresh(force=True, reuse=False)  # `doppel facts reindex --full` in the serving process
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    builder = threading.Thread(target=reindex)
    builder.start()
    try:
        assert emb.started.wait(10)
        facts.write_text(facts.read_text() + "- My dog is called Buřt.\n")  # and the owner edits meanwhile
        answered: list[Any] = []

        def ask() -> None:
            answered.append(kb.search("what is your cat called"))
            answered.append(kb.facts())
            answered.append(kb.current())

        t0 = time.monotonic()
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        asker.join(3)
        assert len(answered) == 3, "a search waited for the reindex"
        assert time.monotonic() - t0 < 1.0
        hits, listed, snapshot = answered
        assert hits[0].fact.text == "My cat is called Knedlík."  # from the snapshot that was serving
        assert [f.text for f in listed] == ["My cat is called Knedlík.", "I walk the neighbour's dog on Sundays."]
    finally:
        emb.release.set()
        builder.join(30)
    assert not errors, errors
    assert kb.search("what is your dog called")[0].fact.text == "My dog is called Buřt."  # the edit, after


# --- the registry and the runs, after a process killed at a known point ---
REPO = Path(__file__).resolve().parents[1]


def kill_when_paused(*args: str, timeout: float = 180) -> str:
    """Run ``python -m tests.crashing ARGS`` until it says it paused, then SIGKILL it there."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.crashing", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("PAUSED"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        timer.cancel()
    proc.wait(30)
    err = proc.stderr.read() if proc.stderr else ""
    assert lines and lines[-1].startswith("PAUSED"), f"it never reached the point: {lines}\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    return lines[-1]


def _adapter_files(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def _adapters_list() -> list[tuple[int, str, str]]:
    import json

    from tests.helpers import run_cli

    listed = run_cli("adapters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [(r["version"], r["status"], r["reason"] or "") for r in json.loads(listed.stdout)]


@pytest.mark.parametrize("point", ["moved", "before-pointer", "after-pointer"])
def test_registry_killed_mid_activation_is_reconciled(point: str, engine: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.registry import Registry

    monkeypatch.setenv("DOPPEL_DATABASE_URL", str(engine.url))
    adapters = tmp_path / "data" / "adapters"  # the data directory's registry, as the CLI sees it
    reg = Registry(adapters, make_session_factory(engine))
    reg.register(_adapter_files(tmp_path / "s1"), status="active", reason="first", metrics={}, fingerprint="f", config={})
    kill_when_paused("register", str(engine.url), str(adapters), str(_adapter_files(tmp_path / "s2")), point)

    rows = _adapters_list()  # `doppel adapters list` reconciles first
    assert _adapters_list() == rows  # and a second look finds nothing more to do
    serving = reg.active_version()
    assert [v for v, status, _ in rows if status == "active"] == ([serving] if serving else [])
    assert [v for v, _, _ in rows] == [1, 2] and (adapters / "v2" / "adapter_config.json").is_file()
    v2 = rows[1]
    assert "interrupted" in v2[2]
    if point == "after-pointer":  # the pointer is the commit point: v2 served, and the database says so
        assert serving == 2 and rows[0][1] == "retired" and v2[1] == "active"
    else:  # v2 never served: v1 still does, and v2 says how to serve it
        assert serving == 1 and v2[1] == "candidate" and "doppel adapters activate 2" in v2[2]
        assert reg.activate(2).status == "active" and reg.active_version() == 2
    # and the registry goes on: the next adapter gets the next version
    nxt = reg.register(_adapter_files(tmp_path / "s3"), status="active", reason="third", metrics={}, fingerprint="f",
                       config={})
    assert nxt.version == 3 and reg.active_version() == 3
    assert [(v, s) for v, s, _ in _adapters_list()] == [(1, "retired"), (2, "retired"), (3, "active")]


def test_a_killed_training_run_is_marked_and_a_changed_resume_starts_fresh(
        engine: Any, tokenizer: Any, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import json
    import shutil

    from tests.helpers import run_cli
    from tests.test_trainer import _dataset
    from trainer.config import TrainConfig
    from trainer.pipeline import TrainingDeps, run_training
    from trainer.registry import Registry

    monkeypatch.setenv("DOPPEL_DATABASE_URL", str(engine.url))
    data = tmp_path / "data"
    adapters, lock = data / "adapters", data / "train.lock"  # where the CLI looks
    dataset = _dataset(tmp_path / "ds" / "samples.jsonl", tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "model")
    assert kill_when_paused("train", str(engine.url), str(adapters), str(lock), str(dataset), str(tmp_path / "tok"),
                            str(tmp_path / "model"), "2") == "PAUSED step 2"

    # the run the dead process left: nobody holds the training lock, so `doppel runs list` says it failed
    listed = run_cli("runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "failed" and run["error"] == ["interrupted: the process died before the run finished"]
    assert run["finished_at"] is not None
    work = adapters / ".staging" / "train-checkpoints"
    assert any(work.glob("checkpoint-*"))
    shutil.copytree(work, tmp_path / "left")  # what the dead run left, for each case below

    sessions = make_session_factory(engine)
    deps = TrainingDeps(sessions=sessions, registry=Registry(adapters, sessions), tokenizer=tokenizer,
                        load_base=lambda: copy.deepcopy(tiny_model), dataset_path=dataset, lock_path=lock)
    from tests.crashing import FAST

    def again(**changes: Any) -> Any:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "left", work)
        return run_training(deps, "train", TrainConfig(**{**FAST, "max_steps": 4, **changes}))

    # the dataset was rebuilt meanwhile: not resumed on different data
    meta = dataset.with_suffix(".meta.json")
    meta.write_text(json.dumps({"fingerprint": "def456"}))
    fresh = again()
    assert fresh.metrics["resumed"] is False and fresh.metrics["steps"] == 4
    assert fresh.metrics["fresh_start"] == "the training set changed (fingerprint abc123 -> def456)"
    assert "started fresh" in fresh.message and "training set changed" in fresh.message
    meta.write_text(json.dumps({"fingerprint": "abc123"}))
    # the training config changed
    fresh = again(learning_rate=1e-3)
    assert fresh.metrics["resumed"] is False
    assert fresh.metrics["fresh_start"] == "the training config changed (learning_rate 0.005 -> 0.001)"
    # the same data and settings: resumed, as before
    same = again(loss_tolerance=0.9)  # the gate's settings judge the result; they do not make checkpoints stale
    assert same.metrics["resumed"] is True and "fresh_start" not in same.metrics and "fresh" not in same.message
    with sessions() as s:
        assert [r.status for r in s.query(TrainingRun).order_by(TrainingRun.id)] == ["failed"] + ["succeeded"] * 3


# --- Telegram: what Telegram answers, and a network that fails ---
def test_telegram_refusals_and_network_loss_are_logged_and_polling_goes_on(
        core: BotCore, sessions: Any, caplog: pytest.LogCaptureFixture) -> None:
    from tests.fake_telegram import BLOCKED, MAX_TEXT

    blocker = 31
    api = FakeBotAPI()
    api.blocked.add(blocker)
    core.permissions.change("allow", str(blocker))
    kb = core.agent.facts
    long_facts = [f"Fact {i}: " + "something worth remembering about me, " * 4 for i in range(40)]
    kb.facts_path.write_text(kb.facts_path.read_text() + "".join(f"- {f.strip()}\n" for f in long_facts))  # type: ignore[union-attr]
    caplog.set_level(logging.INFO)

    async def body() -> None:
        api.message(blocker, blocker, "hi")  # they wrote, then blocked the bot before the reply
        await _until(lambda: ("sendMessage", *BLOCKED) in api.refused)
        api.message(int(OWNER), int(OWNER), "/facts")  # an answer longer than one Telegram message
        sent = await api.wait_sent(2)
        assert [m["chat_id"] for m in sent] == [int(OWNER)] * 2 and all(len(m["text"]) <= MAX_TEXT for m in sent)
        assert all(f.split(":")[0] + ":" in sent[0]["text"] + sent[1]["text"] for f in long_facts)
        api.reset_calls = 3  # connections reset under the bot's feet
        api.message(int(FRIEND), int(FRIEND), "still there?")
        await api.wait_sent(3, timeout=30)
        outage = asyncio.create_task(api.offline(1.5))  # and then the network is gone for a while
        await asyncio.sleep(0.2)
        api.message(int(FRIEND), int(FRIEND), "hello after the outage")
        await outage
        await api.wait_sent(4, timeout=30)
        api.push(edited_message={"message_id": 1, "date": 0, "text": "edited", "chat": {"id": 1, "type": "private"}})
        api.message(int(FRIEND), int(FRIEND), "/help")
        await api.wait_sent(5)

    asyncio.run(_with_bot(core, api, body))
    assert [m["chat_id"] for m in api.sent[2:]] == [int(FRIEND)] * 3
    assert api.refused.count(("sendMessage", *BLOCKED)) == 1  # a 403 is not retried
    assert "edited_message" in api.dropped  # the bot did not ask for edits: Telegram never sends them
    ours = [r.getMessage() for r in caplog.records if r.name == "bots.telegram"]
    assert any("blocked the bot" in m for m in ours), ours
    unhandled = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
                 and r.name != "aiogram.dispatcher"]  # aiogram's "Failed to fetch updates" while offline
    assert unhandled == []


def test_no_empty_or_overlong_message_is_sent(core: BotCore) -> None:
    core.max_message_chars = 4096
    parts = core.split(["  \n ", "", "fine", "x" * 5000])
    assert parts == ["fine", "x" * 4096, "x" * 904]


# --- permissions on every way in ---
def test_telegram_rating_buttons_check_permissions(core: BotCore, sessions: Any) -> None:
    api = FakeBotAPI()
    group = -100

    def press(user: int, data: str, qid: str) -> None:
        api.push(callback_query={"id": qid, "from": {"id": user, "is_bot": False, "first_name": "X"},
                                 "chat_instance": "x", "data": data,
                                 "message": {"message_id": api.sent[0]["message_id"], "date": 0, "text": "reply 1",
                                             "chat": {"id": group, "type": "group", "title": "G"}, "from": BOT_USER}})

    async def body() -> None:
        api.message(group, int(FRIEND), "@doppel_bot hi", chat_type="group")
        sent = await api.wait_sent(1)
        thumbs_down = sent[0]["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
        press(int(STRANGER), thumbs_down, "q1")  # in the group, but not allowed to talk to the twin
        await _until(lambda: len(api.answers) == 1)
        press(int(FRIEND), thumbs_down.replace("rate:", "rate:999"), "q2")  # a reply that is not there
        await _until(lambda: len(api.answers) == 2)
        press(int(FRIEND), thumbs_down, "q3")
        await _until(lambda: len(api.answers) == 3)

    asyncio.run(_with_bot(core, api, body, buttons=True))
    assert _rating(sessions) == [(f"telegram:{FRIEND}", -1)]
    refused, missing, thanked = (a.get("text") for a in api.answers)
    assert "allowed" in refused and "Thanks" in thanked and "Thanks" not in missing


def test_discord_reactions_honour_allowed_roles(core: BotCore, sessions: Any) -> None:
    from bots.discord_bot import DiscordHandlers
    from tests.test_bots import FakeChannel

    core.permissions.change("allow-role", "friends")
    h = DiscordHandlers(core, bot_user_id=4242)
    channel, guild = FakeChannel(77), SimpleNamespace(id=1)
    friends = SimpleNamespace(id=555, name="friends")
    member = SimpleNamespace(id=88, bot=False, display_name="Ann", roles=[friends])
    outsider = SimpleNamespace(id=89, bot=False, display_name="Eve", roles=[SimpleNamespace(id=556, name="@everyone")])

    def reaction(who: Any, emoji: str, with_member: bool = True) -> Any:
        return SimpleNamespace(user_id=who.id, channel_id=77, message_id=9001, guild_id=1, emoji=emoji,
                               member=who if with_member else None)

    async def flow() -> None:
        await h.on_message(SimpleNamespace(author=member, content="<@4242> hi", channel=channel, guild=guild,
                                           mentions=[SimpleNamespace(id=4242)], id=1, reference=None))
        assert channel.sent == ["reply 1"]  # the role lets Ann talk to the twin
        await h.on_raw_reaction_add(reaction(member, "👍"))  # and rate its replies
        assert _rating(sessions) == [("discord:88", 1)]
        await h.on_raw_reaction_add(reaction(outsider, "👎"))
        await h.on_raw_reaction_remove(reaction(member, "👍", with_member=False))  # remove events carry no member
        assert _rating(sessions) == [("discord:88", 0)]

    asyncio.run(flow())
