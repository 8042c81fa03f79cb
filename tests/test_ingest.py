"""Parsers over every sample in the corpus, and ingest into the database."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from common.errors import InputError
from tests.conftest import CORPUS
from feedback.models import Chat, Import, Message
from trainer.ingest.detect import open_unit
from trainer.ingest.records import ParseStats
from trainer.ingest.service import IngestOptions, ingest_unit, list_speakers

UTC = timezone.utc
CORPUS_FILES = sorted(
    p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.suffix in (".json", ".txt")
) if CORPUS.is_dir() else []


def parse(path: Path, fmt: str | None = None):  # type: ignore[no-untyped-def]
    stats = ParseStats()
    found, chats = open_unit([path], fmt, stats, UTC)
    out = [(c, list(c.messages)) for c in chats]
    return found, out, stats


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_every_corpus_file_parses_cleanly(corpus: Path, name: str) -> None:
    fmt, chats, stats = parse(corpus / name)
    assert fmt == name.split("/")[0]
    messages = [m for _, ms in chats for m in ms]
    assert messages, "no messages parsed"
    for m in messages:
        assert m.sent_at.tzinfo is not None
        assert 2010 <= m.sent_at.year <= 2030
        assert "{'type'" not in m.text and "[{" not in m.text  # no entity reprs
        assert "\u200e" not in m.text and "\u200e" not in (m.sender_name or "")
    # a message that parsed is never silently dropped: every skip has a reason
    assert all(isinstance(k, str) and v > 0 for k, v in stats.skipped.items())


def test_telegram_text_entities_stickers_forwards_replies(corpus: Path) -> None:
    _, [(chat, msgs)], _ = parse(corpus / "telegram/chatstyle__tests_fixtures_result__personal_chat.json")
    by_id = {m.platform_message_id: m for m in msgs}
    assert chat.external_id == "222" and chat.kind == "private"
    assert by_id["3"].text == "смотри https://example.com/a круто"
    assert by_id["4"].text == "ну реально норм, @boris_k глянь"
    assert by_id["8"].text == "😀"  # a sticker counts as its emoji
    assert by_id["7"].is_forwarded
    assert by_id["6"].kind == "service"
    assert by_id["12"].text == "ладно))\nщас дойду"
    _, [(_, msgs)], stats = parse(corpus / "telegram/Tkonverter__examples_result__personal_chat.json")
    by_id = {m.platform_message_id: m for m in msgs}
    assert by_id["2"].reply_to == "1" and by_id["2"].edited_at is not None
    assert stats.skipped["unsupported message type 'unsupported'"] == 1


def test_telegram_dates_with_and_without_unixtime(corpus: Path) -> None:
    _, [(_, msgs)], _ = parse(corpus / "telegram/mlomb-chat-analytics__DM_2A_7M__single_chat.json")
    by_id = {m.platform_message_id: m for m in msgs}
    assert by_id["3645"].sent_at == datetime(2022, 3, 8, 13, 7, 42, tzinfo=UTC)  # `date` only, in the given zone
    assert by_id["3662"].sent_at == datetime.fromtimestamp(1652135033, UTC)  # `date_unixtime` only


def test_telegram_full_account_names_its_owner(corpus: Path) -> None:
    _, chats, stats = parse(corpus / "telegram/mlomb-chat-analytics__MultiChat_2C_6M__full_account.json")
    assert stats.owner_hint == "user100000001"
    assert [c.external_id for c, _ in chats] == ["700000001", "700000002"]
    assert [c.kind for c, _ in chats] == ["private", "group"]


def test_discord_json(corpus: Path) -> None:
    _, [(chat, msgs)], _ = parse(corpus / "discord/mlomb-chat-analytics__GC_3A_5M.json")
    assert chat.kind == "group"
    assert msgs[1].sender_name == "theplant"  # nickname over name
    assert msgs[0].kind == "service"
    _, [(_, msgs)], _ = parse(corpus / "discord/chatpack-cli__tests_fixtures__discord_export__reduced.json")
    assert next(m for m in msgs if m.platform_message_id == "1005").reply_to == "1004"


def test_discord_plain_text_export(tmp_path: Path) -> None:
    rule = "=" * 62
    path = tmp_path / "dm.txt"
    path.write_text(f"{rule}\nGuild: Direct Messages\nChannel: alice\n{rule}\n\n"
                    "[1/4/2019 5:52 PM] alice#1234\nhello there\nsecond line\n\n"
                    "[1/4/2019 5:53 PM] bob#0001\n\n{Attachments}\nhttps://cdn.example/x.png\n\n"
                    "[1/4/2019 5:54 PM] bob#0001 (pinned)\nhi!\n\n", encoding="utf-8")
    fmt, [(chat, msgs)], _ = parse(path)
    assert fmt == "discord-txt" and chat.title == "alice"
    assert [m.text for m in msgs] == ["hello there\nsecond line", "[attachment]", "hi!"]
    assert msgs[0].sent_at == datetime(2019, 1, 4, 17, 52, tzinfo=UTC)
    assert msgs[2].sender_name == "bob"


def test_messenger_bom_order_and_mojibake(corpus: Path, tmp_path: Path) -> None:
    _, [(chat, msgs)], _ = parse(corpus / "messenger/mlomb-chat-analytics__2A_7M__message_1.json")
    assert [m.sent_at for m in msgs] == sorted(m.sent_at for m in msgs)  # newest-first files come out oldest-first
    assert msgs[-1].text == "Hello"
    thread = tmp_path / "inbox" / "anna_x"
    thread.mkdir(parents=True)
    mojibake = "Ahoj, jak se m\u00c3\u00a1\u00c5\u00a1?"  # "Ahoj, jak se máš?" as Meta writes it
    for n, (ts, text) in enumerate([(2000, mojibake), (1000, "first")], start=1):
        (thread / f"message_{n}.json").write_text(json.dumps({
            "participants": [{"name": "Anna"}, {"name": "Me"}], "title": "Anna", "thread_path": "inbox/anna_x",
            "messages": [{"sender_name": "Anna", "timestamp_ms": ts, "content": text}]}), encoding="utf-8")
    from trainer.ingest.detect import expand

    [unit] = expand([thread])
    _, chats = open_unit(unit, None, ParseStats(), UTC)
    [chat] = list(chats)
    assert [m.text for m in chat.messages] == ["first", "Ahoj, jak se máš?"]


def test_whatsapp_day_month_order_is_decided_from_the_file(corpus: Path) -> None:
    stamps = {}
    for name in ("chat-miner__test_ddmmyy_24hrs.txt", "chat-miner__test_mmddyy_24hrs.txt",
                 "chat-miner__test_yyyymmdd_24hrs.txt", "chat-miner__test_mmddyyyy_12hrs.txt",
                 "chat-miner__test_bracket_mmddyy_24hrs.txt"):
        _, [(_, msgs)], _ = parse(corpus / "whatsapp" / name)
        stamps[name] = [m.sent_at for m in msgs]
    first = next(iter(stamps.values()))
    assert all(v == first for v in stamps.values())
    assert first[1] == datetime(2019, 1, 20, 11, 23, tzinfo=UTC)
    assert first[2] == datetime(2019, 1, 30, 20, 49, tzinfo=UTC)  # "08:49 p. m." in the 12h file


def test_whatsapp_multiline_crlf_marks_and_system_lines(corpus: Path) -> None:
    _, [(chat, msgs)], _ = parse(corpus / "whatsapp/port-whatsapp-datadonation__ios_12h_crlf__chat_file5.txt")
    assert msgs[0].kind == "service" and msgs[0].sender_name is None
    assert msgs[1].text == "Hi \n\nshiva!" and msgs[1].sent_at == datetime(2022, 3, 16, 15, 20, 25, tzinfo=UTC)
    assert msgs[6].sender_name == "person4"  # the line starts with U+200E before "["
    _, [(_, msgs)], _ = parse(corpus / "whatsapp/chat-miner__test_ddmmyy_24hrs.txt")
    assert msgs[1].text == "."  # "John Doe:." has no space
    assert msgs[2].text.endswith("Duis libero.") and "\n" in msgs[2].text
    assert msgs[4].kind == "service" and msgs[4].sender_name is None  # "+12 345 578 created group"
    assert msgs[7].sender_name == "🤓"


def test_unknown_format_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"hello": "world"}')
    with pytest.raises(InputError, match="not an export Doppel knows"):
        parse(tmp_path / "x.json")
    (tmp_path / "y.txt").write_text("just some notes\n")
    with pytest.raises(InputError, match="unknown export format"):
        parse(tmp_path / "y.txt")


def test_a_small_export_cut_off_before_its_keys_is_told_truncated_not_unknown(tmp_path: Path) -> None:
    for cut in ('{\n "name": "Bo",\n "ty', '{"name": "Bo", ', '{"name": "B'):
        (tmp_path / "cut.json").write_text(cut)
        with pytest.raises(InputError, match=r"truncated") as info:
            parse(tmp_path / "cut.json")
        assert "Re-export the chat" in (info.value.hint or "")
    (tmp_path / "bad.json").write_text('{"name": "Bo" "type": 1}')
    with pytest.raises(InputError, match="is not valid JSON near character"):
        parse(tmp_path / "bad.json")
    (tmp_path / "z.json").write_text("")
    with pytest.raises(InputError, match="empty"):
        parse(tmp_path / "z.json")


def test_stream_reader_matches_json_load_across_chunk_boundaries(corpus: Path) -> None:
    from trainer.ingest.jsonstream import JsonStream

    path = corpus / "telegram/Tkonverter__examples_result__personal_chat.json"
    expected = json.loads(path.read_text(encoding="utf-8"))["messages"]
    for chunk in (7, 64, 1000):
        with path.open(encoding="utf-8") as fh:
            js = JsonStream(fh, chunk_chars=chunk)
            got = None
            for key in js.iter_object():
                if key == "messages":
                    got = list(js.iter_values())
                else:
                    js.skip_value()
        assert got == expected, chunk


# --- into the database ---
def _export(path: Path, messages: list[dict], owner_id: int | None = 1) -> Path:
    doc: dict = {"name": "Friend", "type": "personal_chat", "id": 55, "messages": messages}
    if owner_id is not None:
        doc = {"personal_information": {"user_id": owner_id}, "chats": {"list": [doc]}}
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def _msg(i: int, owner: bool, text: str = "hello", t0: int = 1_700_000_000) -> dict:
    return {"id": i, "type": "message", "date_unixtime": str(t0 + 60 * i), "from": "Me" if owner else "Friend",
            "from_id": "user1" if owner else "user2", "text": text}


def _count(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Message)).scalar_one()


def test_reingest_adds_nothing_and_overlap_adds_only_new(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = _export(tmp_path / "a.json", [_msg(i, i % 2 == 0) for i in range(1, 11)])
    r1 = ingest_unit(engine, [first], IngestOptions())
    assert (r1.new, r1.owner_messages, r1.owner) == (10, 5, "user1")
    r2 = ingest_unit(engine, [first], IngestOptions())
    assert (r2.new, r2.duplicates) == (0, 10)
    newer = _export(tmp_path / "b.json", [_msg(i, i % 2 == 0) for i in range(6, 16)])
    r3 = ingest_unit(engine, [newer], IngestOptions())
    assert (r3.new, r3.duplicates) == (5, 5)
    assert _count(engine) == 15
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Chat)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(Import)).scalar_one() == 3
        owners = conn.execute(select(func.count()).select_from(Message).where(Message.is_owner)).scalar_one()
    assert owners == 7


def test_whatsapp_identical_messages_stay_distinct_and_reingest_is_idempotent(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "WhatsApp Chat with Bo.txt"
    path.write_text("13/01/2024, 10:00 - Bo: ok\n13/01/2024, 10:00 - Bo: ok\n13/01/2024, 10:01 - Me: fine\n", encoding="utf-8")
    assert ingest_unit(engine, [path], IngestOptions(me="Me", local_tz=UTC)).new == 3
    assert ingest_unit(engine, [path], IngestOptions(me="Me", local_tz=UTC)).new == 0


def test_truncated_export_stores_nothing(engine, tmp_path: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    good = _export(tmp_path / "good.json", [_msg(i, i % 2 == 0) for i in range(1, 200)])
    data = good.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        ingest_unit(engine, [bad], IngestOptions())
    assert _count(engine) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Chat)).scalar_one() == 0


def test_malformed_json_in_the_middle_is_reported_with_its_place(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = _export(tmp_path / "good.json", [_msg(i, i % 2 == 0) for i in range(1, 50)])
    bad = tmp_path / "bad.json"
    bad.write_text(good.read_text().replace('"text": "hello"}, {"id": 20', '"text": "hello"} {"id": 20'))
    with pytest.raises(InputError, match="not valid JSON near character"):
        ingest_unit(engine, [bad], IngestOptions())
    assert _count(engine) == 0


def test_bad_encoding_is_a_clear_error(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps({"messages": [_msg(1, True, "caf\u00e9")]}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        ingest_unit(engine, [path], IngestOptions(me="Me"))
    assert _count(engine) == 0


def test_a_one_megabyte_message_is_a_counted_skip(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    msgs = [_msg(1, False), _msg(2, True, "x" * 1_000_000), _msg(3, True, "short")]
    report = ingest_unit(engine, [_export(tmp_path / "big.json", msgs)], IngestOptions())
    assert report.new == 2
    assert report.skipped == {"message longer than 65,536 characters": 1}


def test_unknown_me_lists_candidates_and_stores_nothing(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _export(tmp_path / "a.json", [_msg(i, i % 3 == 0) for i in range(1, 10)], owner_id=None)
    with pytest.raises(InputError) as info:
        ingest_unit(engine, [path], IngestOptions(me="Zed"))
    assert "Nobody called 'Zed'" in info.value.message and "Friend (user2, 6 messages)" in str(info.value)
    with pytest.raises(InputError, match="Which speaker is you"):
        ingest_unit(engine, [path], IngestOptions())
    assert _count(engine) == 0
    speakers, hint = list_speakers([path])
    assert [(s.key, s.messages) for s in speakers] == [("user2", 6), ("user1", 3)] and hint is None
    assert ingest_unit(engine, [path], IngestOptions(me="user1")).owner_messages == 3  # by id works too


@pytest.mark.postgres
def test_ingest_into_postgres(pg_url: str, tmp_path: Path) -> None:
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    engine = make_engine(pg_url)
    upgrade(engine)
    path = _export(tmp_path / "a.json", [_msg(i, i % 2 == 0) for i in range(1, 21)])
    assert ingest_unit(engine, [path], IngestOptions()).new == 20
    assert ingest_unit(engine, [path], IngestOptions()).new == 0
    with engine.connect() as conn:
        first = conn.execute(select(Message.sent_at).order_by(Message.sent_at)).scalars().first()
    assert first == datetime.fromtimestamp(1_700_000_060, UTC)
    engine.dispose()


def test_stored_times_read_back_exactly(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ingest_unit(engine, [_export(tmp_path / "a.json", [_msg(1, False), _msg(2, True)])], IngestOptions())
    with engine.connect() as conn:
        times = conn.execute(select(Message.sent_at).order_by(Message.id)).scalars().all()
    assert times == [datetime.fromtimestamp(1_700_000_060, UTC), datetime.fromtimestamp(1_700_000_120, UTC)]


def test_cli_ingest_on_corpus_prints_summary(corpus: Path, tmp_path: Path) -> None:
    from tests.helpers import run_cli

    assert run_cli("db", "upgrade", cwd=tmp_path).returncode == 0
    result = run_cli("ingest", str(corpus / "telegram/chatstyle__tests_fixtures_result__personal_chat.json"),
                     "--me", "Борис", cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "Ingest summary" in result.stdout and "Training samples from these chats: 3" in result.stdout
    listing = run_cli("ingest", "--list-speakers", str(corpus / "whatsapp/whatstk__pokemon.txt"), cwd=tmp_path,
                      env={"COLUMNS": "200"})
    assert "Ash Ketchum" in listing.stdout


def test_a_bad_file_among_several_is_reported_and_the_rest_ingested(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from trainer.ingest.service import ingest_paths

    folder = tmp_path / "exports"
    folder.mkdir()
    _export(folder / "a.json", [_msg(i, i % 2 == 0) for i in range(1, 5)])
    (folder / "b.json").write_text('{"personal_information": {"user_id": 1}, "chats": {"list": [{"id": 9, "messages": [')
    reports = ingest_paths(engine, [folder], IngestOptions())
    assert [r.error is None for r in reports] == [True, False]
    assert "truncated" in str(reports[1].error)
    assert _count(engine) == 4


# --- a large file is parsed in a process of its own; it must store exactly the same ---
PARALLEL = IngestOptions(parallel_min_bytes=0)  # every file takes the parser-process path


def _rows(engine) -> list[tuple]:  # type: ignore[no-untyped-def]
    cols = [c for c in Message.__table__.columns if c.name not in ("id", "chat_id")]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(*cols).order_by(Message.id))]


@pytest.mark.parametrize("name, me", [
    ("telegram/mlomb-chat-analytics__MultiChat_2C_6M__full_account.json", "Alice"),
    ("telegram/Tkonverter__examples_result__personal_chat.json", "Me"),
    ("discord/mlomb-chat-analytics__GC_3A_5M.json", None),
    ("whatsapp/port-whatsapp-datadonation__ios_12h_crlf__chat_file5.txt", None),
])
def test_the_parser_process_stores_exactly_what_parsing_in_process_stores(corpus: Path, tmp_path: Path,
                                                                          name: str, me: str | None) -> None:
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    path = corpus / name
    speakers, hint = list_speakers([path], local_tz=UTC)
    me = me or hint or speakers[0].key
    stored = []
    for i, min_bytes in enumerate((1 << 40, 0)):
        engine = make_engine(f"sqlite:///{tmp_path / f'{i}.db'}")
        upgrade(engine)
        report = ingest_unit(engine, [path], IngestOptions(me=me, local_tz=UTC, parallel_min_bytes=min_bytes))
        stored.append((report.parsed, report.new, report.owner_messages, dict(report.skipped), _rows(engine)))
        engine.dispose()
    assert stored[0] == stored[1] and stored[0][1] > 0
    # and the times read back as the parser gave them, sub-second parts included
    _, chats, _ = parse(path)
    parsed_times = sorted(m.sent_at for _, ms in chats for m in ms if len(m.text) <= 65_536)
    assert sorted(r[-3] for r in stored[1][4]) == parsed_times


def test_errors_from_the_parser_process_are_as_clear_and_store_nothing(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = _export(tmp_path / "good.json", [_msg(i, i % 2 == 0) for i in range(1, 200)])
    bad = tmp_path / "bad.json"
    bad.write_text(good.read_text()[:5000])
    with pytest.raises(InputError, match="truncated"):
        ingest_unit(engine, [bad], PARALLEL)
    anonymous = _export(tmp_path / "anon.json", [_msg(i, i % 3 == 0) for i in range(1, 10)], owner_id=None)
    with pytest.raises(InputError, match="Which speaker is you"):
        ingest_unit(engine, [anonymous], PARALLEL)
    with pytest.raises(InputError, match="Nobody called 'Zed'"):
        ingest_unit(engine, [anonymous], IngestOptions(me="Zed", parallel_min_bytes=0))
    assert _count(engine) == 0
    report = ingest_unit(engine, [good], PARALLEL)
    assert (report.new, report.owner_messages, report.chats) == (199, 99, 1)
    assert ingest_unit(engine, [good], PARALLEL).new == 0


# --- the fast paths (issue 17) keep what the careful paths give ---
def test_stream_reader_steps_over_indented_arrays_and_numbers_split_by_a_chunk() -> None:
    import io

    from trainer.ingest.jsonstream import JsonStream

    doc = {"messages": [1, 22, 333, -4.5e3, "x", {"a": [1, {"b": "},{"}]}, None, True, [], {}, 123456789]}
    for text in (json.dumps(doc), json.dumps(doc, indent=1), json.dumps(doc, indent="\t", separators=(" ,\n ", ": "))):
        for chunk in (1, 2, 3, 5, 8, 13, 64, 1 << 20):
            js = JsonStream(io.StringIO(text), chunk_chars=chunk)
            got = None
            for key in js.iter_object():
                got = list(js.iter_values())
            js.at_end()
            assert got == doc["messages"], (chunk, text[:40])


def test_a_literal_or_a_number_cut_by_the_buffer_end_is_read_whole() -> None:
    """"fal|se", "nu|ll" or "1.|5" at a chunk's end are not errors: with 1 MB chunks a large Discord
    export (booleans in every message) used to be refused as "not valid JSON" now and then."""
    import io

    from trainer.ingest.jsonstream import JsonStream

    msgs = [{"id": str(i), "isPinned": False, "isBot": True, "reactions": None, "x": 1.5, "y": -2e-05}
            for i in range(40)]
    text = json.dumps({"messages": msgs})
    for chunk in range(200, 300):
        js = JsonStream(io.StringIO(text), chunk_chars=chunk)
        for _ in js.iter_object():
            assert list(js.iter_values()) == msgs, chunk
        js.at_end()
        js = JsonStream(io.StringIO(text), chunk_chars=chunk)
        assert js.value() == {"messages": msgs}, chunk


def test_malformed_json_is_told_from_a_truncated_file_once_all_of_it_is_read() -> None:
    import io

    from trainer.ingest.jsonstream import JsonStream

    def read(text: str, chunk: int) -> None:
        js = JsonStream(io.StringIO(text), chunk_chars=chunk)
        for _ in js.iter_object():
            list(js.iter_values())
        js.at_end()

    items = ", ".join(json.dumps({"id": i, "text": "hello"}) for i in range(50))
    for chunk in (16, 1 << 20):  # the whole file is in the buffer (read to its end) or comes in pieces
        with pytest.raises(InputError, match="not valid JSON near character"):
            read('{"messages": [' + items.replace('}, {"id": 20', '} {"id": 20') + "]}", chunk)
        with pytest.raises(InputError, match="not valid JSON near character"):
            read('{"messages": [' + items + ", ]}", chunk)
        with pytest.raises(InputError, match="truncated"):
            read('{"messages": [' + items, chunk)
        with pytest.raises(InputError, match="truncated"):
            read('{"messages": [' + items + ', {"id": 50, "te', chunk)


def _telegram_variety() -> list[dict]:
    """One of each kind of Telegram message the fast path must hand on to the careful one."""
    base = {"type": "message", "date": "2023-11-14T22:13:20", "date_unixtime": "1700000000", "from": "Me",
            "from_id": "user1", "text": "plain", "text_entities": [{"type": "plain", "text": "plain"}]}
    variants = [
        {}, {"reply_to_message_id": 1}, {"text": ["see ", {"type": "link", "text": "https://x.org"}]},
        {"edited": "2023-11-14T22:14:00", "edited_unixtime": "1700000040"}, {"forwarded_from": "Bo"},
        {"text": "", "photo": "photos/1.jpg"}, {"text": "", "media_type": "sticker", "sticker_emoji": "😀"},
        {"text": "   "}, {"from_id": None}, {"from": None, "from_id": "user2"}, {"id": None},
        {"date_unixtime": "-86400"}, {"date_unixtime": "soon"}, {"date_unixtime": None, "date": "2023-11-14T22:13:20"},
        {"type": "service", "action": "phone_call", "actor": "Me", "actor_id": "user1", "text": ""},
        {"type": "unsupported"}, {"text": 42}, {"text": "🙂 ünïcödé\nline two"},
    ]
    out = []
    for i, extra in enumerate(variants, start=1):
        m = {"id": i, **base, **extra}
        out.append({k: v for k, v in m.items() if not (k in ("from_id", "date_unixtime") and v is None)})
    out.append({k: v for k, v in {"id": len(out) + 1, **base}.items() if k != "from_id"})  # no from_id at all
    return out


def test_telegram_fast_path_gives_what_the_careful_path_gives() -> None:
    from trainer.ingest import telegram

    kinds = set()
    for m in _telegram_variety():
        fast_stats, careful_stats = ParseStats(), ParseStats()
        got = telegram.normalize(m, fast_stats, UTC)
        # the careful path alone: "forwarded_from": null sends a message there and means "not forwarded"
        careful = telegram.normalize({"forwarded_from": None, **m}, careful_stats, UTC)
        assert got == careful, m
        assert fast_stats.skipped == careful_stats.skipped, m
        kinds.add(None if got is None else got.kind)
    assert kinds == {None, "text", "media", "service"}


def test_a_single_chat_indented_export_stores_the_same_in_the_parser_process(tmp_path: Path) -> None:
    """Telegram Desktop writes one chat indented, without personal_information; the parser process
    (a fresh interpreter, not a multiprocessing spawn) stores row for row what parsing in process
    stores, times before 1970 and after included."""
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    msgs = _telegram_variety() + [_msg(100 + i, i % 2 == 0, f"msg {i}", t0=-1_000_000 + 997 * i) for i in range(300)]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"name": "Bo", "type": "personal_chat", "id": 77, "messages": msgs}, ensure_ascii=False,
                               indent=1), encoding="utf-8")
    stored = []
    for i, min_bytes in enumerate((1 << 40, 0)):
        engine = make_engine(f"sqlite:///{tmp_path / f'{i}.db'}")
        upgrade(engine)
        report = ingest_unit(engine, [path], IngestOptions(me="Me", local_tz=UTC, parallel_min_bytes=min_bytes,
                                                           batch_size=7))
        stored.append((report.parsed, report.new, report.owner_messages, dict(report.skipped), _rows(engine)))
        with engine.connect() as conn:
            times = conn.execute(select(Message.sent_at).order_by(Message.id)).scalars().all()
        engine.dispose()
    assert stored[0] == stored[1] and stored[0][1] == len(msgs) - 2
    assert stored[0][3] == {"unsupported message type 'unsupported'": 1, "bad date": 1}
    assert datetime.fromtimestamp(-86400, UTC) in times and datetime.fromtimestamp(-1_000_000 + 6000, UTC) in times


def test_the_parser_process_imports_no_database_layer_and_no_command_line() -> None:
    """It starts as a fresh interpreter that imports the parsers only: a multiprocessing spawn child
    imports the parent's main module (for `doppel`, the whole command line) and, for a target in the
    service module, SQLAlchemy and the models; that cost a third of a 200,000-message ingest."""
    import subprocess
    import sys

    code = ("import sys, trainer.ingest.rows; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'feedback', 'doppel', 'typer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    from trainer.ingest import rows

    assert "trainer.ingest.rows import parser_main" in rows.BOOT and "multiprocessing.connection" in rows.BOOT


@pytest.mark.postgres
def test_the_parser_process_feeds_postgres_too(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL rows carry datetimes, which go over the pipe pickled (SQLite's go marshalled)."""
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    path = tmp_path / "result.json"
    msgs = _telegram_variety() + [_msg(100 + i, i % 2 == 0, f"msg {i}") for i in range(50)]
    path.write_text(json.dumps({"name": "Bo", "type": "personal_chat", "id": 77, "messages": msgs}, indent=1),
                    encoding="utf-8")
    engine = make_engine(pg_url)
    upgrade(engine)
    report = ingest_unit(engine, [path], IngestOptions(me="Me", parallel_min_bytes=0, batch_size=7))
    assert (report.parsed, report.new) == (len(msgs) - 2, len(msgs) - 2)
    with engine.connect() as conn:
        times = conn.execute(select(Message.sent_at).order_by(Message.id)).scalars().all()
    assert datetime.fromtimestamp(-86400, UTC) in times and datetime.fromtimestamp(1_700_000_000 + 6000, UTC) in times
    assert ingest_unit(engine, [path], IngestOptions(me="Me", parallel_min_bytes=0)).new == 0
    engine.dispose()
