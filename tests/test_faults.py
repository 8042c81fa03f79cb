"""Races and faults: concurrent and reordered reactions, a reindex beside the serving index, a
registry that survives a killed process, and a Telegram bot that outlives the errors Telegram sends."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.service import Agent
from bots.core import BotCore
from feedback import store
from feedback.db import make_engine, make_session_factory
from feedback.models import Rating
from tests.fake_telegram import FakeBotAPI
from tests.helpers import FakeEmbedder
from tests.test_bots import FRIEND, _rating, _until, _with_bot, core, sessions  # noqa: F401 (fixtures)

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
