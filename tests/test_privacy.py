"""Privacy: /forget and `doppel forget` leave nothing of a person behind (on SQLite and PostgreSQL),
`doppel export` shows what is kept about them, and tokens never reach what a run writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agent.prompt import Persona
from agent.service import Agent, AgentConfig
from bots.core import BotCore, Incoming, PermissionConfig, Permissions
from feedback.db import make_engine, make_session_factory
from feedback.models import Base, Chat, Correction, Message, Rating, Reply
from trainer.forget import EMBEDDINGS
from tests.helpers import FakeEmbedder, ScriptedRuntime, run_cli

ALICE, BOB, CAROL = ("11", "21", "Alice Adams"), ("12", "22", "Bob Brown"), ("13", "23", "Carol Clark")
PEOPLE = {"bob": ["telegram:12", "discord:22"]}


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An upgraded database: a SQLite file, and a PostgreSQL schema (skipped when none answers)."""
    from doppel.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'doppel.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _export(path: Path) -> Path:
    """The owner's Telegram export: a group with Alice and Bob (Carol later), and a private chat with Bob."""
    t0 = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)

    def msg(i: int, at: datetime, who: tuple[str, str, str] | None, text: str) -> dict[str, Any]:
        name, uid = ("Alex", "user1") if who is None else (who[2], f"user{who[0]}")
        return {"id": i, "type": "message", "date": at.strftime("%Y-%m-%dT%H:%M:%S"),
                "date_unixtime": str(int(at.timestamp())), "from": name, "from_id": uid, "text": text}

    group = [msg(1, t0, ALICE, "alicemarker1 who's coming on saturday?"),
             msg(2, t0 + timedelta(minutes=1), BOB, "bobmarker6 my knee still hurts"),
             msg(3, t0 + timedelta(minutes=2), None, "owner reply one"),
             msg(4, t0 + timedelta(hours=5), CAROL, "carolmarker1 pizza tonight?"),
             msg(5, t0 + timedelta(hours=5, minutes=1), None, "owner reply two")]
    private = [msg(1, t0, BOB, "bobmarker7 from the export"), msg(2, t0 + timedelta(minutes=1), None, "owner reply three")]
    data = {"personal_information": {"user_id": 1, "first_name": "Alex"},
            "chats": {"list": [{"name": "Hiking crew", "type": "private_group", "id": 100, "messages": group},
                               {"name": "Bob Brown", "type": "personal_chat", "id": 12, "messages": private}]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@dataclass
class World:
    core: BotCore
    sessions: Any
    replies: dict[str, int]
    dataset: Path


def _world(engine: Any, tokenizer: Any, data: Path, people: dict[str, list[str]] | None = PEOPLE) -> World:
    """A Telegram group and a Discord channel, each with Alice, Bob and Carol; Bob's private chat with the
    twin; the owner's export holding Bob too; ratings and corrections; a built training set."""
    from trainer.dataset import DatasetConfig, build
    from trainer.forget import dataset_scrubber
    from trainer.ingest.service import IngestOptions, ingest_paths

    sessions = make_session_factory(engine)
    agent = Agent(ScriptedRuntime(tokenizer), None, sessions, AgentConfig(persona=Persona("Alex")))  # type: ignore[arg-type]
    core = BotCore(agent, Permissions(PermissionConfig(mode="open", rate_limit_per_minute=0)), people=people,
                   forget_files=dataset_scrubber(data / "dataset"))
    ingest_paths(engine, [_export(data / "exports" / "chats with Bob Brown" / "result.json")], IngestOptions(me="user1"))
    replies: dict[str, int] = {}

    def say(platform: str, chat: str, kind: str, who: tuple[str, str, str], text: str, mid: str, addressed: bool = False,
            title: str | None = None, key: str | None = None) -> None:
        uid = who[0] if platform == "telegram" else who[1]
        out = core.handle(Incoming(platform, chat, kind, uid, who[2], text, message_id=mid, addressed=addressed,
                                   chat_title=title))
        if key:
            replies[key] = out.reply_id  # type: ignore[assignment]
            core.sent(out.reply_id, [f"9{mid}"])

    g = "Bob Brown's birthday"
    say("telegram", "-100", "group", ALICE, "alicemarker2 anyone up for hiking saturday?", "1", title=g)
    say("telegram", "-100", "group", BOB, "bobmarker1 my knee still hurts", "2", title=g)
    say("telegram", "-100", "group", CAROL, "carolmarker2 what do you think, twin?", "3", True, g, "carol")
    say("telegram", "-100", "group", BOB, "bobmarker2 twin, are you coming?", "4", True, g, "bob_group")
    say("telegram", "12", "private", BOB, "bobmarker3 my secret plans", "5", True, "Bob Brown", "bob_private")
    say("discord", "77", "group", BOB, "bobmarker4 on discord now", "6", title="general")
    say("discord", "77", "group", ALICE, "alicemarker3 what's up?", "7", True, "general", "alice_discord")
    say("discord", "77", "group", BOB, "bobmarker5 hey twin", "8", True, "general", "bob_discord")
    agent.rate(replies["carol"], "telegram:12", 1)  # Bob's rating of a reply to Carol
    agent.rate(replies["carol"], "telegram:13", 1)  # Carol's own
    agent.rate(replies["bob_group"], "telegram:11", -1)  # Alice's rating of a reply to Bob
    agent.correct(replies["alice_discord"], "discord:22", "bobmarker8 you should have said hi")  # Bob's correction
    agent.correct(replies["bob_discord"], "discord:23", "carol's correction of a reply to Bob")
    dataset = data / "dataset" / "samples.jsonl"
    with sessions() as s:
        build(s, DatasetConfig(validation_fraction=0), tokenizer, Persona("Alex"), dataset)
        texts = [m.text for m in s.scalars(select(Message))]
    import sqlite3  # the facts-query vectors an older build cached beside the training set

    with sqlite3.connect(data / "dataset" / EMBEDDINGS) as old:
        old.execute("CREATE TABLE vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")
        old.executemany("INSERT INTO vectors VALUES (?, ?)", [(t.encode(), FakeEmbedder().encode([t]).tobytes())
                                                              for t in dict.fromkeys(texts)])
    # a build that crashed mid-transaction leaves SQLite's rollback journal, old pages of the cache
    (data / "dataset" / (EMBEDDINGS + "-journal")).write_bytes(b"bobmarker9 old page")
    return World(core, sessions, replies, dataset)


def _dump(engine: Any) -> str:
    """Every row of every table, as text."""
    out = []
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            out += [f"{table.name}: {tuple(row)!r}" for row in conn.execute(select(table))]
    return "\n".join(out)


def _count(sessions: Any, *where: Any) -> int:
    with sessions() as s:
        return s.query(Message).filter(*where).count()


def test_forget_leaves_nothing_of_a_person_on_two_platforms(db: Any, tokenizer: Any, tmp_path: Path) -> None:
    """Bob sends /forget on Telegram: his messages (live on both platforms, and in the owner's export),
    the twin's replies to him and its messages that sent them, his ratings and corrections, his private
    chat, his lines in the prompts of replies to Alice and Carol, the group title with his name and the
    training samples quoting him all go; Alice's and Carol's data stays."""
    w = _world(db, tokenizer, tmp_path / "data")
    before = _dump(db)
    assert before.count("bobmarker") >= 8 and "Bob Brown" in before and "telegram:12" in before
    others = _count(w.sessions, Message.sender_id.in_(["11", "13", "21", "23", "user11", "user13"]))
    samples = [json.loads(line) for line in w.dataset.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 3 and sum("bobmarker" in s["prompt"] for s in samples) == 2

    answer = w.core.handle(Incoming("telegram", "12", "private", "12", "Bob Brown", "/forget")).texts[0]

    for line in ("• your messages: 7", "• my replies to you: 3", "• my messages that sent those replies: 2",
                 "• ratings and corrections others gave those replies: 2", "(your lines replaced by [removed]): 2",
                 "• your ratings: 1", "• your corrections: 1", "• private conversations with you (whole): 1",
                 "(mine and the owner's side): 2", "• conversation titles with your name (renamed): 1",
                 "• import records naming you (renamed): 1", "• training samples on disk that quoted you: 2",
                 "• cached training samples that quoted you: 2"):
        assert line in answer, (line, answer)
    assert "telegram:12" in answer and "discord:22" in answer and "cannot be untrained" in answer
    after = _dump(db)
    for trace in ("bobmarker", "Bob Brown", "telegram:12", "discord:22", "'user12'"):
        assert trace not in after, trace
    assert _count(w.sessions, Message.sender_id.in_(["12", "22", "user12"])) == 0
    # everyone else's messages, ratings and corrections stay; Bob's lines in their prompts are [removed]
    assert _count(w.sessions, Message.sender_id.in_(["11", "13", "21", "23", "user11", "user13"])) == others
    with w.sessions() as s:
        carol = s.get(Reply, w.replies["carol"])
        assert carol is not None and "alicemarker2" in carol.prompt and "carolmarker2" in carol.prompt
        assert "[removed]" in carol.prompt
        assert [(r.rater_id, r.value) for r in s.scalars(select(Rating))] == [("telegram:13", 1)]
        assert [c.author_id for c in s.scalars(select(Correction))] == []  # Carol's went with the reply to Bob
        assert s.get(Reply, w.replies["alice_discord"]) is not None
        assert s.get(Reply, w.replies["bob_group"]) is None and s.get(Reply, w.replies["bob_private"]) is None
        group = s.scalar(select(Chat).where(Chat.external_id == "-100"))
        assert group is not None and group.title == "[removed]'s birthday"
        assert s.scalar(select(Chat).where(Chat.platform == "telegram", Chat.external_id == "12")) is None
    # the training set and its cache: the samples quoting Bob are gone, the other one stays
    left = w.dataset.read_text(encoding="utf-8")
    assert "bobmarker" not in left and "Bob Brown" not in left and "carolmarker1" in left
    meta = json.loads(w.dataset.with_suffix(".meta.json").read_text(encoding="utf-8"))
    assert meta["train"] == 1 and meta["forgotten_samples"] == 2
    assert not (w.dataset.parent / EMBEDDINGS).exists()  # vectors of Bob's texts: the cache goes whole
    assert not (w.dataset.parent / (EMBEDDINGS + "-journal")).exists()  # and its journal with it
    data_files = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and "exports" not in p.parts]
    assert not [p for p in data_files if p.name.endswith(".tmp")]
    for p in data_files:
        assert b"bobmarker" not in p.read_bytes(), p
    if db.dialect.name == "sqlite":  # not even in the database file's free pages or its write-ahead log
        for p in tmp_path.glob("doppel.db*"):
            assert b"bobmarker" not in p.read_bytes(), p
    # a second /forget finds nothing
    again = w.core.handle(Incoming("discord", "77", "group", "22", "Bob Brown", "/forget")).texts[0]
    assert again.startswith("I had nothing stored about you")
    # the owner imports the same export again: Bob does not come back, nor his private chat, nor the old title
    from trainer.ingest.service import IngestOptions, ingest_paths

    export = tmp_path / "data" / "exports" / "chats with Bob Brown" / "result.json"
    [report] = ingest_paths(db, [export], IngestOptions(me="user1"))
    assert report.skipped["written by someone who asked to be forgotten"] == 1
    assert report.skipped["in a conversation forgotten at its other person's request"] == 2
    again = _dump(db)
    for trace in ("bobmarker", "telegram:12", "'user12'"):
        assert trace not in again, trace
    # (only the path of the new import names him: the owner's own folder name, which no hash can rename)
    assert "Bob Brown" not in "\n".join(line for line in again.splitlines() if not line.startswith("imports:"))
    assert _count(w.sessions, Message.sender_id.in_(["11", "13", "21", "23", "user11", "user13"])) == others
    with w.sessions() as s:
        assert [c.title for c in s.scalars(select(Chat).where(Chat.external_id == "-100"))] == ["[removed]'s birthday"]
        assert s.scalar(select(Chat).where(Chat.platform == "telegram", Chat.external_id == "12")) is None


def test_forget_is_all_or_nothing(engine: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way (after the rows were deleted in the transaction, and the scrubbed training
    set written beside the old one) leaves the database and the files as they were."""
    from feedback import privacy

    w = _world(engine, tokenizer, tmp_path / "data")
    before, dataset = _dump(engine), w.dataset.read_bytes()

    def broken(*args: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(privacy, "_rename", broken)
    with pytest.raises(RuntimeError):
        w.core.forget("telegram", "12")
    assert _dump(engine) == before and w.dataset.read_bytes() == dataset
    assert (w.dataset.parent / EMBEDDINGS).is_file()
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_forget_without_linked_accounts_covers_one_platform_and_the_exports(engine: Any, tokenizer: Any,
                                                                            tmp_path: Path) -> None:
    """Without the `people` setting, /forget on Telegram covers Bob's Telegram messages, live and from
    the owner's export, and says how to reach the rest."""
    w = _world(engine, tokenizer, tmp_path / "data", people=None)
    answer = w.core.forget("telegram", "12")
    assert "your messages: 5" in answer and "send /forget there as well" in answer
    assert _count(w.sessions, Message.sender_id.in_(["12", "user12"])) == 0
    assert _count(w.sessions, Message.sender_id == "22") == 2


def test_redact_prompt_lines() -> None:
    from feedback.privacy import Quoted, redact

    q = Quoted(labels={"Bob"}, lines={"hi there", "second line"}, others={"Carol", "Alex"})
    chatml = ("<|im_start|>system\nYou are Alex.<|im_end|>\n<|im_start|>user\nBob: hi there\nsecond line<|im_end|>\n"
              "<|im_start|>assistant\nsecond line<|im_end|>\n<|im_start|>user\nCarol: hey\nBob: again\nmore<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert redact(chatml, q) == (
        "<|im_start|>system\nYou are Alex.<|im_end|>\n<|im_start|>user\n[removed]<|im_end|>\n"
        "<|im_start|>assistant\nsecond line<|im_end|>\n<|im_start|>user\nCarol: hey\n[removed]<|im_end|>\n"
        "<|im_start|>assistant\n")
    plain = "You are Alex.\n\nBob: hi there\nsecond line\nCarol: hey\nAlex: yo\nBob: …end\nAlex:"
    assert redact(plain, q) == "You are Alex.\n\n[removed]\nCarol: hey\nAlex: yo\n[removed]\nAlex:"


def test_identities_and_linked_accounts() -> None:
    from common.errors import InputError
    from feedback.privacy import Identity, linked

    people = {"Bob": ["telegram:12", "discord:22", "whatsapp:Bob Brown"]}
    assert linked(["bob"], people) == linked(["telegram:user12"], people) == linked(["discord:22"], people)
    assert Identity("whatsapp", "Bob Brown") in linked(["telegram:12"], people)
    assert linked(["discord:99"], people) == [Identity("discord", "99")]
    with pytest.raises(InputError, match="PLATFORM:ID"):
        linked(["skype:bob"], people)
    with pytest.raises(InputError):
        linked(["robert"], people)


def test_forget_and_export_commands(engine: Any, tokenizer: Any, tmp_path: Path) -> None:
    """`doppel export --person bob` shows what is stored about Bob; `doppel forget` asks first (and
    deletes nothing when the answer is no), shows what it would remove, then removes it."""
    data = tmp_path / "data"
    w = _world(engine, tokenizer, data)
    env = {"DOPPEL_DATABASE_URL": str(engine.url), "DOPPEL_DATA_DIR": str(data), "DOPPEL_PEOPLE": json.dumps(PEOPLE),
           "DOPPEL_PERSONA_NAME": "Alex", "COLUMNS": "200"}
    exported = run_cli("export", "--person", "bob", env=env)
    assert exported.returncode == 0, exported.stderr
    got = json.loads(exported.stdout)
    assert got["counts"] == {"messages": 7, "replies_to_them": 3, "ratings": 1, "corrections": 1,
                             "prompts_quoting_them": 2, "chats": 4}
    assert {m["text"].split()[0] for m in got["messages"]} == {f"bobmarker{i}" for i in range(1, 8)}
    assert "alicemarker2" not in exported.stdout  # other people's words are theirs
    assert got["identities"] == ["discord:22", "telegram:12"] and got["names"] == ["Bob Brown"]

    help_text = run_cli("forget", "--help", env=env).stdout
    assert "--person" in help_text and "--dry-run" in help_text
    refused = run_cli("forget", "--person", "telegram:12", env=env, input="n\n")
    assert refused.returncode == 1 and "Nothing was deleted" in refused.stdout
    assert "their messages" in refused.stdout and _count(w.sessions, Message.sender_id == "22") == 2
    bad = run_cli("forget", "--person", "skype:12", env=env)
    assert bad.returncode == 4 and "PLATFORM:ID" in bad.stderr
    done = run_cli("forget", "--person", "discord:22", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "│ 7     │ their messages" in done.stdout and "Deleted all of it." in done.stdout
    assert "(their lines replaced by [removed])" in done.stdout and "cannot be untrained" in done.stdout
    assert "bobmarker" not in _dump(engine) and "bobmarker" not in w.dataset.read_text(encoding="utf-8")
    nothing = run_cli("export", "--person", "bob", env=env)
    assert json.loads(nothing.stdout)["counts"]["messages"] == 0


# --- tokens never reach what a run writes ------------------------------------------------------

PLANTED = {"DOPPEL_TELEGRAM_TOKEN": "123456:SECRET-PLANTED-telegram-0123456789abcdefghij",
           "DOPPEL_API_TOKEN": "SECRET-PLANTED-api-token-0123456789",
           "DOPPEL_CONSOLE_PASSWORD": "SECRET-PLANTED-console-password",
           "DOPPEL_DISCORD_TOKEN": "SECRET-PLANTED-discord-token-abcdef"}
NEEDLE = "SECRET-PLANTED"
TG = PLANTED["DOPPEL_TELEGRAM_TOKEN"]


class FailingBotAPI:
    """A Bot API URL behind which something else answers (a proxy, a wrong URL): an HTML error page
    that quotes the request's path, which carries the token. getMe can be made to succeed, so the
    failure comes later (polling)."""

    def __init__(self, get_me_ok: bool = False) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.paths = []  # type: list[str]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                seen.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if get_me_ok and self.path.endswith("/getMe"):
                    body, status, kind = json.dumps({"ok": True, "result": {
                        "id": 4242, "is_bot": True, "first_name": "Doppel", "username": "doppel_bot"}}), 200, "application/json"
                else:
                    body = f"<html><body><h1>404 Not Found</h1><p>Cannot POST {self.path}</p></body></html>"
                    status, kind = 404, "text/html"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _grep(where: dict[str, str | bytes]) -> list[str]:
    return [name for name, text in where.items()
            if (NEEDLE.encode() in text if isinstance(text, bytes) else NEEDLE in text)]


def test_planted_tokens_never_reach_command_output(tmp_path: Path) -> None:
    """`doppel config`, and `doppel bot telegram` against a Bot API URL that answers with an error page
    quoting the request (token included): the output says what to fix and never the token."""
    api = FailingBotAPI()
    try:
        env = {**PLANTED, "DOPPEL_TELEGRAM_API_URL": api.url, "DOPPEL_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
        config = run_cli("-v", "config", env=env)
        bot = run_cli("-v", "bot", "telegram", env=env)
    finally:
        api.close()
    assert config.returncode == 0 and "telegram_token" in config.stdout and "(set)" in config.stdout
    assert bot.returncode == 2 and "did not answer the way the Telegram Bot API does" in bot.stderr, bot.stderr
    assert "DOPPEL_TELEGRAM_API_URL" in bot.stderr
    assert any(TG in p for p in api.paths)  # the token did travel, in the URL
    written = {"config stdout": config.stdout, "config stderr": config.stderr, "bot stdout": bot.stdout,
               "bot stderr": bot.stderr}
    written.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    assert _grep(written) == []


def test_planted_tokens_never_reach_logs_pages_or_the_database(tmp_path: Path, tokenizer: Any,
                                                                monkeypatch: pytest.MonkeyPatch, capfd: Any) -> None:
    """With the composition root's guards on: a failing Telegram call (the owner's notifier, the
    bot's polling loop), an uncaught exception, a token pasted into a chat and echoed by the model,
    a failed run's traceback, API requests that fail, and a console error page. Then everything the
    run wrote is grepped for the token: stdout, stderr, the log file, the responses, the database (its
    rows and its file) and every file under the data directory."""
    import asyncio
    import logging
    import sys

    from bots.notify import telegram_notifier
    from bots.telegram import build_dispatcher, make_bot
    from bots.core import BotCore
    from common.errors import ModelError
    from doppel.context import AppContext
    from doppel.migrate import upgrade
    from doppel.redaction import guard_responses
    from feedback.models import TrainingRun
    from tests.helpers import console_app

    data = tmp_path / "data"
    api = FailingBotAPI(get_me_ok=True)
    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DOPPEL_TELEGRAM_API_URL", api.url)
    c = AppContext.load()  # the composition root: guards installed from here on
    logfile = tmp_path / "run.log"
    handler = logging.FileHandler(logfile, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    written: dict[str, str | bytes] = {}
    try:
        upgrade(c.raw_engine)
        # a failing Telegram call: the owner's notifier, and the bot's polling loop
        telegram_notifier(TG, api.url, ["1"])("Training run 3 (retrain): adapter v4 is now active.")

        async def poll() -> None:
            bot = make_bot(TG, api.url)
            core = BotCore(None, None)  # type: ignore[arg-type]  (no update arrives: every getUpdates fails)
            dp = build_dispatcher(core, await bot.get_me())
            task = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
            await asyncio.sleep(1.5)
            await dp.stop_polling()
            await asyncio.wait_for(task, 10)

        asyncio.run(poll())
        # an uncaught exception, and a logged one, whose text carries the URL
        try:
            raise RuntimeError(f"POST {api.url}/bot{TG}/sendMessage failed")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
            logging.getLogger("doppel.test").exception("sending failed")
        # a token pasted into a chat, and the model echoing it; a run that failed with it in its traceback
        app, deps = console_app(tokenizer, c.sessions, None, data, password=PLANTED["DOPPEL_API_TOKEN"],
                                replies=[f"here it is: {TG}", f"and {PLANTED['DOPPEL_DISCORD_TOKEN']}"])
        guard_responses(app)
        deps.agent.reply("c1", "Bob", f"my bot token is {TG}, the api one {PLANTED['DOPPEL_API_TOKEN']}",
                         platform="telegram", sender_id="12")
        with c.sessions.begin() as s:
            s.add(TrainingRun(kind="train", status="failed", error=f"Traceback ...\nRuntimeError: {api.url}/bot{TG}/"))
        # the HTTP API: a reply quoting it, a failure that names it, an unexpected error
        client = app.test_client()
        bearer = {"Authorization": f"Bearer {PLANTED['DOPPEL_API_TOKEN']}"}
        responses = [client.post("/api/chats/c2/messages", json={"text": f"say {TG}", "sender": "Bob"}, headers=bearer)]
        deps.agent.runtime.fail = ModelError(f"The backend at {api.url}/bot{TG} failed.", hint=f"token {TG}")
        responses.append(client.post("/api/chats/c2/messages", json={"text": "hi", "sender": "Bob"}, headers=bearer))
        deps.agent.runtime.fail = RuntimeError(f"boom {TG}")
        responses.append(client.post("/api/chats/c2/messages", json={"text": "hi", "sender": "Bob"}, headers=bearer))
        responses.append(client.post("/api/chats/c2/messages", json={"text": TG}, headers={"Authorization": f"Bearer {TG}"}))
        # the console: its error page, for an expected and an unexpected failure
        console = app.test_client()
        console.get("/login")
        with console.session_transaction() as sess:
            sess["csrf"] = "t" * 43
        signed = console.post("/login", data={"password": PLANTED["DOPPEL_CONSOLE_PASSWORD"], "csrf_token": "t" * 43})
        assert signed.status_code == 401  # the console's password is the API token here (console_app)
        signed = console.post("/login", data={"password": PLANTED["DOPPEL_API_TOKEN"], "csrf_token": "t" * 43})
        assert signed.status_code == 302
        with console.session_transaction() as sess:
            form = {"text": "hi", "csrf_token": sess["csrf"]}  # a fresh one: signing in starts a new session
        deps.agent.runtime.fail = ModelError(f"The backend at {api.url}/bot{TG} failed.")
        responses.append(console.post("/playground/send", data=form))
        deps.agent.runtime.fail = RuntimeError(f"boom {TG}")
        responses.append(console.post("/playground/send", data=form))
        responses.append(console.get(f"/chats/999?x={TG}"))
        responses.append(console.get("/chats/1"))
        responses.append(console.get("/replies/1"))
        responses.append(console.get("/learning"))
        assert [r.status_code for r in responses][:4] == [201, 500, 500, 401]
        assert [r.status_code for r in responses][4:] == [500, 500, 404, 200, 200, 200]
        assert "[REDACTED]" in responses[0].get_data(as_text=True)
        written.update({f"response {i}": r.get_data(as_text=True) for i, r in enumerate(responses)})
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        api.close()
    assert any(TG in p for p in api.paths)
    out, err = capfd.readouterr()
    log_text = logfile.read_text(encoding="utf-8")
    assert "Failed to fetch updates" in log_text and "could not notify the owner" in log_text
    assert "RuntimeError" in err and "[REDACTED]" in err
    written.update({"stdout": out, "stderr": err, "log": log_text, "database rows": _dump(c.engine)})
    written.update({str(p): p.read_bytes() for p in data.rglob("*") if p.is_file()})
    with c.sessions() as s:
        prompt = s.scalars(select(Reply.prompt)).first()
        assert prompt is not None and "my bot token is [REDACTED], the api one [REDACTED]" in prompt
    assert _grep(written) == []
    c.engine.dispose()


def test_a_bot_token_in_an_ingested_export_is_not_stored(engine: Any, tmp_path: Path) -> None:
    """BotFather's message in the owner's Telegram export carries a token: it is stored, and so
    prompted and trained on, as [REDACTED] (by its shape: no setting names it)."""
    from trainer.ingest.service import IngestOptions, ingest_paths

    token = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1"
    at = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
    chat = {"name": "BotFather", "type": "bot_chat", "id": 93372553, "messages": [
        {"id": 1, "type": "message", "date": at.strftime("%Y-%m-%dT%H:%M:%S"), "date_unixtime": str(int(at.timestamp())),
         "from": "BotFather", "from_id": "user93372553",
         "text": f"Done! Use this token to access the HTTP API:\n{token}\nKeep your token secure."},
        {"id": 2, "type": "message", "date": at.strftime("%Y-%m-%dT%H:%M:%S"), "date_unixtime": str(int(at.timestamp())),
         "from": "Alex", "from_id": "user1", "text": "/mybots"}]}
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"personal_information": {"user_id": 1}, "chats": {"list": [chat]}}), encoding="utf-8")
    ingest_paths(engine, [path], IngestOptions(me="user1"))
    dump = _dump(engine)
    assert token not in dump and "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1" not in dump
    assert "access the HTTP API:\n[REDACTED]\nKeep" in dump.replace("\\n", "\n")


def test_a_sample_whose_facts_query_quotes_them_is_theirs() -> None:
    """A sample keeps the query its facts are retrieved for, which may hold turns its prompt dropped
    for room: a person quoted only there is found, and the sample goes with the rest of theirs."""
    from feedback.privacy import Quoted, Trace
    from trainer.forget import _theirs

    trace = Trace({7: Quoted(labels={"Bob"}, lines={"my secret plan"}, others={"Alice", "Alex"})})
    record = {"chat_id": 7, "speaker": "Alex", "prompt": "<|im_start|>user\nAlice: so?<|im_end|>\n",
              "query": ["so?", ["my secret plan", "ok"]]}
    assert _theirs(record, trace)
    assert not _theirs({**record, "query": ["so?", ["ok"]]}, trace)
    assert not _theirs({**record, "query": None}, trace) and not _theirs({**record, "chat_id": 8}, trace)
