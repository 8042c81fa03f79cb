"""Races and faults: concurrent and reordered reactions, a reindex beside the serving index, a
registry that survives a killed process, and a Telegram bot that outlives the errors Telegram sends."""

from __future__ import annotations

import asyncio
import threading
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
