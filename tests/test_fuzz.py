"""Hostile and broken export files: a fast, derandomized fuzz run of every parser (``bench/fuzz.py``
runs the same for minutes), the database left exactly as it was by a refused file, and the minimal
inputs of every crash the fuzzing found, kept as regression tests."""

from __future__ import annotations

import json
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import InputError
from tests.conftest import CORPUS
from tests.fuzzing import (
    FILE_NAMES,
    FORMATS,
    ZONES,
    chunk_chars,
    dump_database,
    hostile_file,
    ingest_check,
    parse_file,
    seeds,
)
from trainer.ingest.detect import open_unit
from trainer.ingest.records import MAX_SKIP_REASONS, ParseStats
from trainer.ingest.service import IngestOptions, ingest_unit

UTC = timezone.utc
SEEDS = seeds(CORPUS) if CORPUS.is_dir() else {}
FAST = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_files_are_read_or_refused_with_a_clear_input_error(corpus: Path, tmp_path: Path, fmt: str) -> None:
    """Every row fits its column, or the file is refused with an InputError; reading the JSON a few
    characters at a time gives what reading it whole gives."""
    path = tmp_path / FILE_NAMES[fmt]
    outcomes: list[bool] = []

    @FAST
    @given(hostile_file(fmt, SEEDS[fmt]), st.sampled_from(ZONES), st.sampled_from([None, fmt]),
           st.sampled_from([1 << 20, 7, 64]))
    def run(file: tuple[bytes, str], tz: Any, forced: str | None, chunk: int) -> None:
        data, me = file
        path.write_bytes(data)
        with chunk_chars(chunk):
            got = parse_file(path, forced, me, tz)
        whole = parse_file(path, forced, me, tz)
        assert isinstance(got, InputError) == isinstance(whole, InputError)
        assert isinstance(got, InputError) or got == whole
        outcomes.append(isinstance(got, InputError))

    run()
    assert 0 < sum(outcomes) < len(outcomes)  # both kinds were seen: the run tested something


def test_a_refused_file_leaves_the_database_exactly_as_it_was(corpus: Path, engine: Any, tmp_path: Path) -> None:
    ingest_unit(engine, [corpus / "telegram/mlomb-chat-analytics__MultiChat_2C_6M__full_account.json"],
                IngestOptions(me="Alice"))
    outcomes: list[str] = []
    any_file = st.sampled_from(FORMATS).flatmap(lambda f: hostile_file(f, SEEDS[f]).map(lambda d: (f, *d)))

    @settings(FAST, max_examples=40)
    @given(any_file, st.sampled_from(ZONES))
    def run(file: tuple[str, bytes, str], tz: Any) -> None:
        fmt, data, me = file
        path = tmp_path / FILE_NAMES[fmt]
        path.write_bytes(data)
        outcomes.append(ingest_check(engine, path, None, me, tz))

    run()
    assert "refused" in outcomes and "accepted" in outcomes


def test_a_file_refused_by_the_parser_process_leaves_the_database_as_it_was(corpus: Path, engine: Any,
                                                                          tmp_path: Path) -> None:
    ingest_unit(engine, [corpus / "telegram/mlomb-chat-analytics__MultiChat_2C_6M__full_account.json"],
                IngestOptions(me="Alice"))
    good = (corpus / "telegram/Tkonverter__examples_result__personal_chat.json").read_bytes()
    for n, bad in enumerate([good[: len(good) // 2], good.replace(b'"id": 7', b'"id": ' + b"7" * 5000, 1),
                             good.replace(b'"messages": [', b'"messages": [' + b"[" * 5000, 1)]):
        path = tmp_path / f"bad{n}.json"
        path.write_bytes(bad)
        assert ingest_check(engine, path, None, "Me", UTC, parser_process=True) == "refused"


# --- what the fuzzing found: each crash's minimal input, now read or refused cleanly -------------
def _write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def _read(path: Path, fmt: str | None = None, tz: Any = UTC) -> tuple[list[Any], ParseStats]:
    stats = ParseStats()
    _, chats = open_unit([path], fmt, stats, tz)
    return [(c, list(c.messages)) for c in chats], stats


TG_MESSAGE = {"id": 1, "type": "message", "date_unixtime": "1700000000", "from": "Me", "from_id": "user1", "text": "hi"}
DC_MESSAGE = {"id": "5", "type": "Default", "timestamp": "2024-01-15T10:30:00+00:00", "content": "hello",
              "author": {"id": "1", "name": "Me"}}
DC_CHANNEL = {"id": "9", "type": "GuildTextChat", "name": "general"}


def _telegram(**chat: Any) -> dict[str, Any]:
    return {"name": "Bo", "type": "personal_chat", "id": 7, **chat, "messages": chat.get("messages", [TG_MESSAGE])}


def _discord(*messages: dict[str, Any], guild: Any = None, channel: Any = None) -> dict[str, Any]:
    return {"guild": {"id": "1", "name": "G"} if guild is None else guild,
            "channel": DC_CHANNEL if channel is None else channel, "messages": list(messages) or [DC_MESSAGE]}


def _messenger(**thread: Any) -> dict[str, Any]:
    return {"participants": [{"name": "Me"}, {"name": "Bo"}], "title": "Bo", "thread_path": "inbox/bo_1", **thread,
            "messages": thread.get("messages", [{"sender_name": "Me", "timestamp_ms": 1700000000000, "content": "hi"}])}


@pytest.mark.parametrize("name, content, check", [
    # a chat's name, type or id of another JSON type: TypeError (unhashable), or a list handed to the database
    ("result.json", _telegram(name=["x"]), lambda chat, msgs: chat.title is None and chat.external_id == "7"),
    ("result.json", _telegram(type=[]), lambda chat, msgs: chat.kind == "private"),
    ("result.json", _telegram(id={"a": 1}, name="Bo"), lambda chat, msgs: chat.external_id == "name:Bo"),
    # a sender id that is a number took the fast path and failed in the owner test (int has no casefold)
    ("result.json", _telegram(messages=[{**TG_MESSAGE, "from_id": 42}]), lambda chat, msgs: msgs[0].sender_id == "42"),
    ("result.json", _telegram(messages=[{**TG_MESSAGE, "from": ["Me"]}]), lambda chat, msgs: msgs[0].sender_name is None),
    # a date of another type (AttributeError), an impossible one, an entity whose text is an object
    ("result.json", _telegram(messages=[{**TG_MESSAGE, "date_unixtime": None}, {"type": "message", "date": 5},
                                        {**TG_MESSAGE, "date_unixtime": "99999999999999999999"}]),
     lambda chat, msgs: msgs == []),
    ("result.json", _telegram(messages=[{**TG_MESSAGE, "text": [{"type": "bold", "text": {"x": 1}}, "!"],
                                         "edited": 12, "media_type": ["x"]}]),
     lambda chat, msgs: msgs[0].text == "!" and msgs[0].edited_at is None),
    ("result.json", _telegram(messages=[{**TG_MESSAGE, "text": "", "media_type": ["x"]},
                                        {**TG_MESSAGE, "id": 2, "text": "", "media_type": "sticker", "sticker_emoji": 5}]),
     lambda chat, msgs: [m.text for m in msgs] == ["[media]", "[sticker]"]),
    # Discord: a guild or channel that is no object (AttributeError), a type of null (a None text), a
    # nickname that is a list (unhashable), an unreadable edit time (ValueError for the whole file),
    # a time in the year 1 that the offset pushes out of the calendar (OverflowError)
    ("channel.json", _discord(guild=[None]), lambda chat, msgs: chat.title == "general"),
    ("channel.json", _discord(channel={"id": "9", "type": [], "name": ["x"]}),
     lambda chat, msgs: chat.title is None and chat.kind == "group"),
    ("channel.json", _discord({**DC_MESSAGE, "type": None}), lambda chat, msgs: msgs[0].text == "hello"),
    ("channel.json", _discord({**DC_MESSAGE, "author": {"id": 3, "nickname": ["x"], "name": "Me"}}),
     lambda chat, msgs: (msgs[0].sender_id, msgs[0].sender_name) == ("3", "Me")),
    ("channel.json", _discord({**DC_MESSAGE, "author": "Me", "reference": [1], "content": 5, "stickers": "x"}),
     lambda chat, msgs: msgs[0].sender_name is None and msgs[0].text == ""),
    ("channel.json", _discord({**DC_MESSAGE, "timestampEdited": "yesterday"}), lambda chat, msgs: msgs[0].edited_at is None),
    ("channel.json", _discord({**DC_MESSAGE, "timestamp": "0001-01-01T00:00:00+05:00"}), lambda chat, msgs: msgs == []),
    # Messenger: participants that are null, a string or nameless (TypeError, AttributeError), a
    # thread path that is a boolean (stored as the chat's id)
    ("message_1.json", _messenger(participants=None), lambda chat, msgs: chat.external_id == "inbox/bo_1"),
    ("message_1.json", _messenger(participants=["x", {"name": None}, {"name": "Bo"}]),
     lambda chat, msgs: chat.kind == "private"),
    ("message_1.json", _messenger(thread_path=True, title=7),
     lambda chat, msgs: chat.external_id.startswith("dir:") and chat.title == "Me, Bo"),
    ("message_1.json", _messenger(messages=[{"sender_name": 5, "timestamp_ms": "1e3"}, 7,
                                            {"sender_name": None, "timestamp_ms": 1, "type": ["Call"], "call_duration": 1}]),
     lambda chat, msgs: [m.text for m in msgs] == ["call"]),
])
def test_found_by_fuzzing_values_of_the_wrong_type_are_read_or_skipped(tmp_path: Path, name: str, content: Any,
                                                                       check: Any) -> None:
    [(chat, msgs)], _ = _read(_write(tmp_path, name, content), tz=timezone(timedelta(hours=14)))
    assert check(chat, msgs)


@pytest.mark.parametrize("name, content, error", [
    # Python reads no integer of over 4,300 digits: a ValueError that is not a JSONDecodeError
    ("result.json", '{"type": "personal_chat", "name": ' + "1" * 5000 + ', "messages": []}', "over 4,300 digits"),
    ("channel.json", '{"guild": ' + "1" * 5000 + ', "channel": {}, "messages": []}', "over 4,300 digits"),
    ("message_1.json", '{"participants": ' + "1" * 5000 + ', "messages": []}', "over 4,300 digits"),
    # deep nesting: RecursionError from the JSON scanner
    ("result.json", '{"type": "personal_chat", "messages": [' + "[" * 100_000 + "]" * 100_000 + "]}",
     "nested too deeply"),
    ("channel.json", '{"guild": {}, "channel": {}, "messages": [{"content": ' + "[" * 100_000 + "]" * 100_000 + "}]}",
     "nested too deeply"),
    ("message_1.json", '{"participants": [], "messages": [' + "{}," * 3 + "[" * 100_000 + "]" * 100_000 + "]}",
     "nested too deeply"),
    # a Discord text export that is not UTF-8: UnicodeDecodeError
    ("channel.txt", b"=" * 62 + b"\nGuild: G\nChannel: c\n" + b"=" * 62 + b"\n\n[1/4/2019 5:52 PM] a\ncaf\xe9\n",
     "not valid UTF-8"),
    ("message_1.json", {"participants": [], "messages": {"a": 1}}, "no 'messages' list"),
])
def test_found_by_fuzzing_malformed_files_are_refused_with_an_input_error(tmp_path: Path, name: str, content: Any,
                                                                          error: str) -> None:
    with pytest.raises(InputError, match=error):
        _read(_write(tmp_path, name, content))


def test_found_by_fuzzing_a_whatsapp_date_at_the_end_of_the_calendar_is_a_bad_date(tmp_path: Path) -> None:
    path = _write(tmp_path, "WhatsApp Chat with Bo.txt", "31/12/9999, 23:59 - Bo: late\n01/01/2024, 10:00 - Me: hi\n")
    [(_, msgs)], stats = _read(path, tz=timezone(timedelta(hours=-12)))  # 9999-12-31 23:59 -12:00 is 10000 in UTC
    assert [m.text for m in msgs] == ["hi"] and stats.skipped["bad date"] == 1


def test_found_by_fuzzing_a_discord_text_date_pushed_out_of_the_calendar_is_no_header(tmp_path: Path) -> None:
    rule = "=" * 62
    path = _write(tmp_path, "c.txt", f"{rule}\nGuild: G\nChannel: c\n{rule}\n\n[1/1/2020 1:00 AM] Me\nhi\n"
                                     "[1/1/0001 1:00 AM] Bo\nold\n")
    [(_, msgs)], _ = _read(path, tz=timezone(timedelta(hours=14)))
    assert [m.text for m in msgs] == ["hi\n[1/1/0001 1:00 AM] Bo\nold"]


def test_lone_surrogates_nul_and_overlong_values_fit_the_database(engine: Any, tmp_path: Path) -> None:
    """A "\\ud800" escape decodes to a string no database can encode (UnicodeEncodeError on insert);
    ids, names and titles longer than their columns fail on PostgreSQL (and NUL in any text: see the
    next test). Each is stored, repaired."""
    from sqlalchemy import select

    from feedback.models import Chat, Import, Message

    messages = [
        {**TG_MESSAGE, "text": "a\ud800b"},
        {**TG_MESSAGE, "id": "x" * 100, "reply_to_message_id": "y" * 100, "text": "long ids", "from": "N" * 300},
        {**TG_MESSAGE, "id": 3, "text": "fine", "from_id": "user" + "9" * 300},
    ]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(_telegram(id="c" * 300, name="T" * 600, messages=messages)), encoding="utf-8")
    report = ingest_unit(engine, [path], IngestOptions(me="Me"))
    assert report.new == 3
    with engine.connect() as conn:
        chat = conn.execute(select(Chat.external_id, Chat.title)).one()
        rows = conn.execute(select(Message.text, Message.platform_message_id, Message.reply_to, Message.sender_name,
                                   Message.sender_id).order_by(Message.id)).all()
        assert conn.execute(select(Import.path)).scalar_one() == str(path)
    assert chat.external_id.startswith("sha1:") and len(chat.title) == 512
    assert rows[0].text == "a\ufffdb"
    assert rows[1].platform_message_id is None and rows[1].reply_to is None and len(rows[1].sender_name) == 255
    assert rows[2].text == "fine" and len(rows[2].sender_id) == 255
    assert ingest_unit(engine, [path], IngestOptions(me="Me")).new == 0  # the same keys again


@pytest.mark.postgres
def test_lone_surrogates_nul_and_overlong_values_fit_postgres(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy import select

    from doppel.migrate import upgrade
    from feedback.db import make_engine
    from feedback.models import Message

    engine = make_engine(pg_url)
    upgrade(engine)
    messages = [{**TG_MESSAGE, "text": "a\ud800b"}, {**TG_MESSAGE, "id": 2, "text": "nul\x00here", "from": "N" * 300},
                {**TG_MESSAGE, "id": "x" * 100, "reply_to_message_id": "y" * 100, "text": "long ids"}]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(_telegram(id="c" * 300, name="T" * 600, messages=messages)), encoding="utf-8")
    for parallel in (1 << 40, 0):  # in this process, and in the parser process
        ingest_unit(engine, [path], IngestOptions(me="Me", parallel_min_bytes=parallel))
    with engine.connect() as conn:
        texts = conn.execute(select(Message.text).order_by(Message.id)).scalars().all()
    assert texts == ["a\ufffdb", "nul\ufffdhere", "long ids"]
    engine.dispose()


def test_skip_reasons_from_a_hostile_file_stay_few_and_short(tmp_path: Path) -> None:
    messages = [{**TG_MESSAGE, "id": i, "type": f"kind{i}" + "x" * 1000} for i in range(100)] + [TG_MESSAGE]
    [(_, msgs)], stats = _read(_write(tmp_path, "result.json", _telegram(messages=messages)))
    assert len(msgs) == 1 and sum(stats.skipped.values()) == 100
    assert len(stats.skipped) == MAX_SKIP_REASONS and stats.skipped["other reasons"] == 100 - MAX_SKIP_REASONS + 1
    assert max(len(r) for r in stats.skipped) < 80


def test_an_unknown_owner_in_a_file_of_huge_names_gives_a_short_message(engine: Any, tmp_path: Path) -> None:
    messages = [{**TG_MESSAGE, "id": i, "from": "N" * 100_000, "from_id": f"user{i}"} for i in range(3)]
    path = _write(tmp_path, "result.json", _telegram(messages=messages))
    before = dump_database(engine)
    with pytest.raises(InputError, match="Nobody called 'Zed'") as info:
        ingest_unit(engine, [path], IngestOptions(me="Zed"))
    assert len(str(info.value)) < 1000 and dump_database(engine) == before
