"""The training set: turns, time window, filters, the prompt builder, masking, the time split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.conversation import ContextConfig
from agent.prompt import Persona, PromptLimits, Turn, render_example, render_prompt
from sqlalchemy import select

from feedback.db import make_session_factory
from feedback.models import Chat, Message
from trainer.dataset import DatasetConfig, build, count_samples, iter_samples, read_stats, scrub
from trainer.examples import read_dataset

UTC = timezone.utc
T0 = datetime(2024, 5, 1, 22, 0, tzinfo=UTC)


def add_chat(engine, rows: list[tuple[int, str, str]], extra: dict | None = None) -> int:  # type: ignore[no-untyped-def]
    """rows: (minutes after T0, speaker 'me'|name, text)."""
    with make_session_factory(engine)() as s:
        chat = Chat(platform="telegram", external_id=str(len(rows)) + str(id(rows)))
        s.add(chat)
        s.flush()
        for i, (minutes, who, text) in enumerate(rows):
            kw = (extra or {}).get(i, {})
            s.add(Message(chat_id=chat.id, dedup_key=f"k{i}", sender_id="me" if who == "me" else who, sender_name=who,
                          is_owner=who == "me", text=text, sent_at=T0 + timedelta(minutes=minutes), **kw))
        s.commit()
        return chat.id


def samples(engine, cfg: DatasetConfig = DatasetConfig()):  # type: ignore[no-untyped-def]
    with make_session_factory(engine)() as s:
        return list(iter_samples(s, cfg))


def test_owner_messages_merge_into_turns_and_context_is_windowed(engine) -> None:  # type: ignore[no-untyped-def]
    add_chat(engine, [
        (0, "Sam", "hi"),  # 22:00, 4 hours before the last turn: outside a 3 h window
        (1, "me", "hey"),
        (200, "Sam", "still up?"),  # 01:20 next day
        (203, "Sam", "you there?"),
        (235, "me", "yes"),  # 01:55
        (236, "me", "couldn't sleep"),  # within the turn gap: same turn
    ])
    got = samples(engine)
    assert [s.reply for s in got] == ["hey", "yes\ncouldn't sleep"]
    last = got[-1]
    # 22:01 ("hey") is 3 h 54 min before 01:55: outside the window; Sam's two messages are one turn
    assert [c["text"] for c in last.context] == ["still up?\nyou there?"]
    wide = samples(engine, DatasetConfig(context=ContextConfig(window_hours=5)))
    assert [c["text"] for c in wide[-1].context] == ["hi", "hey", "still up?\nyou there?"]  # across midnight


def test_filters_are_counted_and_keep_context(engine) -> None:  # type: ignore[no-untyped-def]
    add_chat(engine, [
        (0, "Sam", "look"),
        (10, "me", "https://example.com/x"),
        (20, "Sam", "and?"),
        (30, "me", "[photo]"),
        (40, "Sam", "hm"),
        (50, "me", "forwarded words"),
        (60, "Sam", "ok"),
        (70, "me", "pin_message"),
        (80, "Sam", "so?"),
        (90, "me", "real reply"),
    ], {3: {"kind": "media"}, 5: {"is_forwarded": True}, 7: {"kind": "service"}})
    with make_session_factory(engine)() as s:
        counted = count_samples(s, DatasetConfig())
    assert counted.samples == 1
    assert counted.filtered == {"link only": 1, "media without text": 1, "forwarded message": 1, "service message": 1}
    [sample] = samples(engine)
    assert sample.reply == "real reply"
    assert "[photo]" in [c["text"] for c in sample.context]  # still context, never a target
    loose = samples(engine, DatasetConfig(skip_links_only=False, skip_forwarded=False, skip_media_only=False))
    assert [s.reply for s in loose] == ["https://example.com/x", "[photo]", "forwarded words", "real reply"]


def test_other_speakers_can_be_trained_on(engine) -> None:  # type: ignore[no-untyped-def]
    add_chat(engine, [(0, "Sam", "hi"), (1, "me", "hey"), (2, "Sam", "what's up"), (3, "me", "not much")])
    assert len(samples(engine)) == 2
    both = samples(engine, DatasetConfig(train_speakers=("Sam",)))
    assert [s.reply for s in both] == ["hey", "what's up", "not much"]
    assert [s.owner for s in both] == [True, False, True]


def test_pii_scrubbing() -> None:
    text = "mail me at jo.doe+x@example.org or call +420 601 234 567, card 4111 1111 1111 1111, order 1234"
    out = scrub(text)
    assert "[email]" in out and "[phone]" in out and "[card]" in out
    assert "example.org" not in out and "4111" not in out and "order 1234" in out


def test_prompt_drops_oldest_context_first_and_never_the_newest(tokenizer) -> None:  # type: ignore[no-untyped-def]
    turns = [Turn("Sam", f"message number {i} " + "blah " * 30) for i in range(10)] + [Turn("Sam", "newest?")]
    p = render_prompt(tokenizer, Persona("Alex"), ["I live in Prague."], turns, PromptLimits(max_context_tokens=200))
    assert "newest?" in p.text and "I live in Prague." in p.text
    assert "message number 9" in p.text and "message number 0" not in p.text
    assert 0 < p.context_used < 10
    huge = [Turn("Sam", "start " + "word " * 5000 + "the end")]
    limits = PromptLimits(max_context_tokens=100, max_length=512, reserve_for_reply=64)
    q = render_prompt(tokenizer, Persona("Alex"), [], huge, limits)
    assert q.truncated_newest and "the end" in q.text
    assert len(tokenizer.encode(q.text, add_special_tokens=False)) <= 512 - 64


def test_training_labels_cover_only_the_reply(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = render_example(tokenizer, Persona("Alex"), [], [Turn("Sam", "coming tonight?"), Turn("Alex", "maybe", True),
                                                          Turn("Sam", "pls")], "ok fine, 7pm")
    n_prompt = ex.labels.count(-100)
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tokenizer.decode(ex.input_ids[:n_prompt]) == ex.prompt  # the prompt is exactly what serving renders
    reply = tokenizer.decode(ex.input_ids[n_prompt:])
    assert reply.startswith("ok fine, 7pm") and tokenizer.eos_token in reply
    assert ex.prompt == render_prompt(tokenizer, Persona("Alex"), [], [Turn("Sam", "coming tonight?"),
                                                                       Turn("Alex", "maybe", True), Turn("Sam", "pls")]).text


def test_build_splits_by_time_and_fingerprints(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for day in range(10):
        rows += [(day * 1440, "Sam", f"question {day}"), (day * 1440 + 1, "me", f"answer {day}")]
    add_chat(engine, rows)
    cfg = DatasetConfig(validation_fraction=0.2)
    told: list[int] = []
    done: list[int] = []
    with make_session_factory(engine)() as s:
        r1 = build(s, cfg, tokenizer, Persona("Alex"), tmp_path / "set.jsonl", progress=done.append, total=told.append)
        r2 = build(s, cfg, tokenizer, Persona("Alex"), tmp_path / "again.jsonl")
    assert (r1.train, r1.validation) == (8, 2)
    assert told == [10] and sum(done) == 10  # the progress bar's total is known before the first sample
    assert r1.fingerprint == r2.fingerprint
    records = [json.loads(line) for line in (tmp_path / "set.jsonl").open()]
    val = [r for r in records if r["split"] == "validation"]
    train = [r for r in records if r["split"] == "train"]
    assert [r["reply"] for r in val] == ["answer 8", "answer 9"]  # the most recent, not random
    assert max(r["at"] for r in train) < min(r["at"] for r in val)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in records)
    stats = read_stats(tmp_path / "set.jsonl")
    assert stats["total"] == 10 and sum(n for _, _, n in stats["histogram"]) == 10
    with make_session_factory(engine)() as s:
        r3 = build(s, DatasetConfig(validation_fraction=0.3), tokenizer, Persona("Alex"), tmp_path / "other.jsonl")
    assert r3.fingerprint != r1.fingerprint


def test_context_reset_starts_a_fresh_window(engine) -> None:  # type: ignore[no-untyped-def]
    chat_id = add_chat(engine, [(0, "Sam", "old topic"), (5, "Sam", "new topic"), (6, "me", "sure")])
    with make_session_factory(engine)() as s:
        s.get(Chat, chat_id).context_reset_at = T0 + timedelta(minutes=4)
        s.commit()
    [sample] = samples(engine)
    assert [c["text"] for c in sample.context] == ["new topic"]


def test_demo_command_end_to_end(tmp_path: Path, shared_models: Path) -> None:
    """The README's first command shows the loop: a reply, a short training run, the reply again
    from the adapter, a rating, and what the nightly run does with it."""
    import re
    import sqlite3

    from tests.helpers import run_cli

    result = run_cli("demo", "--train-steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert "24 written by the owner" in out
    assert (tmp_path / "data" / "facts.md").is_file()
    assert "8 facts indexed" in out and "Alex:" in out
    assert re.search(r"adapter v1 (is now active|was rejected)", out)
    with sqlite3.connect(tmp_path / "data" / "doppel.db") as db:
        replies = db.execute("SELECT prompt, adapter_version, id FROM replies ORDER BY id").fetchall()
        ratings = db.execute("SELECT reply_id, value FROM ratings").fetchall()
    assert len(replies) == 2 and replies[0][1] is None
    assert all("You are Alex" in p and "do you eat meat?" in p and "I am vegetarian" in p for p, _, _ in replies)
    assert ratings == [(replies[1][2], 1)]
    assert "the nightly job waits: 1 new rating" in " ".join(out.split())
    drills = int(re.search(r"training adds (\d+) fact drills", " ".join(out.split())).group(1))
    assert f"{drills} fact drills from the facts file" in " ".join(out.split()) and drills > 0  # the run made them
    stats = run_cli("dataset", "stats", cwd=tmp_path)
    assert "train: 16" in stats.stdout and "validation: 2" in stats.stdout
    again = run_cli("demo", "--train-steps", "0", cwd=tmp_path)
    assert "0 new, 47 already stored" in again.stdout
    # a build loads no model: no transformers, no torch (the facts are a training run's);
    # the one after it, with nothing new, continues it
    for n in range(2):
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom doppel.cli import main\n"
                                "sys.argv = ['doppel', 'dataset', 'build']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
                                "print('imported:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                               capture_output=True, text=True, cwd=tmp_path)
        assert probe.returncode == 0 and "imported: []" in probe.stdout, probe.stdout + probe.stderr
    assert re.search(r"\(0 new, 18 reused from the last build; 2 chats continued from it\)", " ".join(probe.stdout.split()))
    assert "dataset build: sample 18/18, elapsed 0:" in probe.stdout  # no terminal: progress as a log line


@pytest.fixture(params=["sqlite", "postgresql"])
def either_engine(request, engine):  # type: ignore[no-untyped-def]
    """The test's SQLite database, or a fresh PostgreSQL schema (skipped where no server answers)."""
    if request.param == "sqlite":
        yield engine
        return
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    eng = make_engine(request.getfixturevalue("pg_url"))
    upgrade(eng)
    yield eng
    eng.dispose()


def test_the_lean_sample_count_agrees_with_the_samples(either_engine) -> None:  # type: ignore[no-untyped-def]
    """The ingest summary's count (a lean pass over times, speakers and kinds, the times read as
    integers the database computes) is what building the samples counts, on SQLite and PostgreSQL, on
    random chats: turn gaps on the minute boundary (and a microsecond either side), the
    window, service, media,
    forwarded, links, empty messages, the twin's replies, a context reset, other target speakers."""
    import random

    from trainer.dataset import Counted, _pending, _sample_keys

    rng = random.Random(5)
    for n_chat in range(6):
        with make_session_factory(either_engine)() as s:
            chat = Chat(platform="telegram", external_id=f"rand{n_chat}")
            s.add(chat)
            s.flush()
            t = T0
            for i in range(300):
                t += timedelta(minutes=rng.choice([0, 1, 5, 5, 6, 30, 179, 180, 181, 600]), seconds=rng.choice([0, 0, 30]),
                               microseconds=rng.choice([0, 0, 0, 1, 250_000, 999_999]))
                who = rng.choice(["me", "me", "Sam", "Ann", "twin"])
                kind = rng.choice(["text"] * 8 + ["media", "service"])
                text = rng.choice(["hi", "ok", "", "  ", "https://x.org/a", "see https://x.org", "[photo]", "sure thing"])
                s.add(Message(chat_id=chat.id, dedup_key=f"r{i}", sender_id="me" if who in ("me", "twin") else who.lower(),
                              sender_name="Alex" if who in ("me", "twin") else who, is_owner=who in ("me", "twin"),
                              text=text, kind=kind, is_forwarded=rng.random() < 0.1, sent_at=t,
                              source="twin" if who == "twin" else rng.choice(["ingest"] * 5 + ["live"])))
            if n_chat == 2:
                chat.context_reset_at = T0 + timedelta(hours=60)
            s.commit()
    configs = [DatasetConfig(), DatasetConfig(train_speakers=("Ann",)),
               DatasetConfig(context=ContextConfig(include_service=True, max_turns=2, window_hours=1)),
               DatasetConfig(skip_links_only=False, skip_forwarded=False, skip_media_only=False)]
    with make_session_factory(either_engine)() as s:
        for cfg in configs:
            slow = Counted()
            keys = [(p.at, p.chat_id) for p in _pending(s, cfg, None, slow)]
            fast = count_samples(s, cfg)
            assert (fast.turns, fast.samples, fast.filtered) == (slow.turns, slow.samples, slow.filtered), cfg
            assert list(_sample_keys(s, cfg, None, Counted())) == keys  # the validation split's times
            assert slow.samples > 20 and slow.filtered["no one else wrote within the window"] > 0
            some = [1, 3]
            part = count_samples(s, cfg, chat_ids=some)
            ref = Counted()
            for _ in _pending(s, cfg, some, ref):
                pass
            assert (part.turns, part.samples, part.filtered) == (ref.turns, ref.samples, ref.filtered)


def test_demo_trains_about_two_passes() -> None:
    """The demo's default run length follows the training set: two passes, at least one step, at
    most 24 (five passes over the sample's 40 examples overfitted and the gate rejected them)."""
    from doppel.commands import demo_steps

    assert demo_steps(40) == 10  # 80 examples seen, 8 a step
    assert demo_steps(41) == 11
    assert demo_steps(1000) == 24
    assert demo_steps(0) == 1


def test_training_prompt_is_the_prompt_the_agent_serves(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """DESIGN promise 1, end to end: one stored conversation, once answered live through
    ``Agent.reply`` and once turned into a sample by ``dataset build``, gives one prompt string (the
    same turns, window, limits and facts), built from the composition root's settings."""
    from doppel.context import AppContext
    from feedback import store
    from feedback.models import utcnow
    from knowledge.index import KnowledgeBase
    from agent.service import Agent
    from tests.helpers import FakeEmbedder, ScriptedRuntime

    facts = tmp_path / "facts.md"
    facts.write_text("## Food\n- I am vegetarian; I don't eat meat.\n## Pets\n- My cat is called Knedlík.\n"
                     "## Home\n- I live in Prague.\n")
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    c = AppContext.load(persona_name="Alex", persona_description="I write short lowercase messages.",
                        context_max_tokens=120)  # small enough that the oldest turns are dropped
    c.__dict__["knowledge"] = kb
    sessions = make_session_factory(engine)
    now = utcnow()
    with sessions.begin() as s:
        chat = store.get_chat(s, "telegram", "42", "Sam", "private")
        history = [(-300, "sam", "Sam", "morning! long message " + "blah " * 40), (-240, "me", "Alex", "hey"),
                   (-239, "me", "Alex", "just woke up"), (-120, "sam", "Sam", "what are you cooking tonight?"),
                   (-60, "sam", "Sam", "do you eat meat?")]
        for i, (sec, sid, name, text) in enumerate(history):
            s.add(Message(chat_id=chat.id, dedup_key=f"h{i}", sender_id=sid, sender_name=name, is_owner=sid == "me",
                          text=text, sent_at=now + timedelta(seconds=sec), source="ingest"))
    agent = Agent(ScriptedRuntime(tokenizer, ["no, never"]), kb, sessions, c.agent_config())  # type: ignore[arg-type]
    reply = agent.reply("42", "Sam", "asking for dinner", platform="telegram", sender_id="sam")
    served = agent.runtime.prompts[0]  # type: ignore[attr-defined]
    assert "I am vegetarian; I don't eat meat." in served and "blah blah" not in served
    # the owner's real answer replaces the twin's: then the history holds one owner turn to learn
    with sessions.begin() as s:
        twin = s.scalars(select(Message).where(Message.source == "twin")).one()
        s.add(Message(chat_id=twin.chat_id, dedup_key="answer", sender_id="me", sender_name="Alex", is_owner=True,
                      text="nope, vegetarian", sent_at=twin.sent_at, source="ingest"))
        s.delete(twin)
    with sessions() as s:
        result = build(s, c.dataset_config(), tokenizer, Persona("Alex", "I write short lowercase messages."),
                       tmp_path / "set.jsonl")
    records = [json.loads(line) for line in (tmp_path / "set.jsonl").open()]
    last = max(records, key=lambda r: r["at"])
    assert last["reply"] == "nope, vegetarian"
    assert "Facts about you" not in last["prompt"]  # the facts come where the sample is used
    assert result.with_query >= 1
    # as a training run reads it and gives it its facts (the composition root's retrieval, limits, persona)
    give, version = c.example_facts(tokenizer)
    examples = give(read_dataset(tmp_path / "set.jsonl", "train") + read_dataset(tmp_path / "set.jsonl", "validation"))
    assert version and all(e.pending is None for e in examples)
    trained = [e for e in examples if e.completion.startswith(last["completion"][:20]) and "nope, vegetarian" in e.completion]
    assert len(trained) == 1 and trained[0].prompt == served


def test_the_twins_own_replies_are_context_but_never_targets(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chat_id = add_chat(engine, [(0, "Sam", "hi"), (1, "me", "hey"), (2, "Sam", "how are you?"), (3, "me", "tired")])
    with make_session_factory(engine)() as s:  # the twin answered live later on
        s.add(Message(chat_id=chat_id, dedup_key="live1", sender_id="sam", sender_name="Sam", text="and now?",
                      sent_at=T0 + timedelta(minutes=20), source="live"))
        s.add(Message(chat_id=chat_id, dedup_key="twin1", sender_id="doppel", sender_name="Alex", is_owner=True,
                      text="generated words", sent_at=T0 + timedelta(minutes=21), source="twin"))
        s.add(Message(chat_id=chat_id, dedup_key="live2", sender_id="sam", sender_name="Sam", text="ok",
                      sent_at=T0 + timedelta(minutes=22), source="live"))
        s.commit()
        counted = count_samples(s, DatasetConfig())
    got = samples(engine)
    assert [x.reply for x in got] == ["hey", "tired"]
    assert counted.filtered["the twin's own reply"] == 1


def test_a_rebuild_reuses_the_samples_that_did_not_change(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for day in range(6):
        rows += [(day * 1440, "Sam", f"question {day}"), (day * 1440 + 1, "me", f"answer {day}")]
    chat_id = add_chat(engine, rows)
    cfg = DatasetConfig(validation_fraction=0.2)
    out = tmp_path / "set.jsonl"
    with make_session_factory(engine)() as s:
        first = build(s, cfg, tokenizer, Persona("Alex"), out)
        text = out.read_text()
        again = build(s, cfg, tokenizer, Persona("Alex"), out)
    assert (first.reused, again.reused) == (0, 6)
    assert out.read_text() == text and again.fingerprint == first.fingerprint  # the same bytes, not re-rendered
    with make_session_factory(engine)() as s:  # a new day of chat: one new sample, and the split moves on
        s.add(Message(chat_id=chat_id, dedup_key="n1", sender_id="Sam", sender_name="Sam", text="question 6",
                      sent_at=T0 + timedelta(days=6)))
        s.add(Message(chat_id=chat_id, dedup_key="n2", sender_id="me", sender_name="me", is_owner=True, text="answer 6",
                      sent_at=T0 + timedelta(days=6, minutes=1)))
        s.commit()
        grown = build(s, cfg, tokenizer, Persona("Alex"), out)
        fresh = build(s, cfg, tokenizer, Persona("Alex"), tmp_path / "fresh.jsonl")  # no cache beside it
    assert grown.reused == 6 and (grown.train, grown.validation) == (6, 1)
    assert out.read_text() == (tmp_path / "fresh.jsonl").read_text()  # reused samples are exactly what a build makes
    with make_session_factory(engine)() as s:  # other settings shape other prompts: nothing is reused
        other = build(s, DatasetConfig(validation_fraction=0.2, limits=PromptLimits(max_context_tokens=64)), tokenizer,
                      Persona("Alex"), out)
    assert other.reused == 0


def test_a_facts_edit_keeps_the_training_set_and_the_next_run_reads_the_edited_facts(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The build reads no facts: a sample's facts are retrieved, and the fact drills made, where a
    run uses them. A facts edit then reuses every sample, and the run's examples and drills carry
    the edited fact."""
    from doppel.context import AppContext
    from knowledge.index import KnowledgeBase
    from tests.helpers import FakeEmbedder

    rows = []
    for day in range(5):
        rows += [(day * 1440, "Sam", f"do you have a cat? day {day}"), (day * 1440 + 1, "me", f"yes, Knedlik {day}")]
    add_chat(engine, rows)
    facts = tmp_path / "facts.md"
    facts.write_text("## Pets\n- My cat is called Knedlik.\n## Home\n- I live in Prague.\n")
    c = AppContext.load(persona_name="Alex")
    cfg = DatasetConfig(validation_fraction=0.2)
    out = tmp_path / "set.jsonl"

    def run() -> tuple[object, list[str], list[str]]:
        c.__dict__["knowledge"] = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
        with make_session_factory(engine)() as s:
            result = build(s, cfg, tokenizer, Persona("Alex"), out)
        train = read_dataset(out, "train")
        give, version = c.example_facts(tokenizer)
        drills = c.fact_drills(tokenizer)(train)
        assert version and drills and all(d.source == "drill" and d.drill in d.fact_ids for d in drills)
        return result, [e.prompt for e in give(train)], [d.prompt + d.completion for d in drills]

    result, first, drilled = run()
    assert result.reused == 0 and len(first) == 4  # type: ignore[attr-defined]
    assert all("My cat is called Knedlik." in p for p in first) and any("Knedlik" in d for d in drilled)
    facts.write_text("## Pets\n- My cat is called Knedlik; she is grey.\n## Home\n- I live in Prague.\n")
    result, edited, drilled = run()
    assert result.reused == 5  # type: ignore[attr-defined]  # every sample of the history as it was
    assert len(edited) == len(first) and all("she is grey" in p for p in edited)
    assert any("she is grey" in d for d in drilled)


def test_the_sample_cache_answers_more_keys_than_sqlite_takes_parameters(tmp_path: Path) -> None:
    from trainer.dataset import _SampleCache

    path = tmp_path / "c.sqlite"
    first = _SampleCache(path, "shape")
    first.put([(f"k{i}", f"line {i}") for i in range(2500)])
    first.close(keep=True)
    second = _SampleCache(path, "shape")
    got = second.get([f"k{i}" for i in range(0, 3000, 1)])  # a batch of 3,000: more than 999 parameters
    second.close(keep=False)
    assert len(got) == 2500 and got["k2499"] == "line 2499" and second.reused == 2500


def test_the_owners_earlier_replies_in_a_prompt_are_learned_too(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A sample's prompt holds the owner's earlier turns: those they wrote themselves are labelled
    (one pass learns several replies); the twin's own replies and forwarded messages are not."""
    from trainer.examples import read_dataset
    from trainer.lora import encode

    chat_id = add_chat(engine, [(0, "Sam", "hi"), (1, "me", "hey you"), (2, "Sam", "fwd this"),
                                (3, "me", "look at this"), (4, "Sam", "and?"), (5, "me", "ok then")],
                       extra={3: {"is_forwarded": True}})
    with make_session_factory(engine)() as s:
        s.add(Message(chat_id=chat_id, dedup_key="q", sender_id="Sam", sender_name="Sam", text="twin, you there?",
                      sent_at=T0 + timedelta(minutes=6), source="live"))
        s.add(Message(chat_id=chat_id, dedup_key="t", sender_id="doppel", sender_name="Alex", is_owner=True,
                      text="generated words", sent_at=T0 + timedelta(minutes=7), source="twin"))
        s.add(Message(chat_id=chat_id, dedup_key="z", sender_id="Sam", sender_name="Sam", text="bye",
                      sent_at=T0 + timedelta(minutes=8), source="live"))
        s.add(Message(chat_id=chat_id, dedup_key="y", sender_id="me", sender_name="me", is_owner=True, text="bye bye",
                      sent_at=T0 + timedelta(minutes=9)))
        s.commit()
        build(s, DatasetConfig(validation_fraction=0), tokenizer, Persona("Alex"), tmp_path / "set.jsonl")
    last = read_dataset(tmp_path / "set.jsonl", "train")[-1]
    assert last.completion.startswith("bye bye")
    learned = [last.prompt[a:b] for a, b in last.targets]
    assert [t.split("<|im_end|>")[0] for t in learned] == ["hey you", "ok then"]  # not forwarded, not the twin's
    enc = encode(tokenizer, last, context_targets=True)
    plain = encode(tokenizer, last)
    assert enc is not None and plain is not None and enc.input_ids == plain.input_ids
    labelled = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert labelled.replace("<|im_end|>", "|").split("|")[:3] == ["hey you", "\nok then", "\nbye bye"]
    assert tokenizer.decode([t for t, lab in zip(plain.input_ids, plain.labels) if lab != -100]).startswith("bye bye")


def _random_messages(s, chat_id: int, rng, t: datetime, n: int, tag: str) -> datetime:  # type: ignore[no-untyped-def]
    """``n`` random messages in a chat after ``t`` (turn gaps on the minute boundary, the window,
    service, media, forwarded, links, empty messages, the twin's replies); the last one's time."""
    for i in range(n):
        t += timedelta(minutes=rng.choice([0, 1, 5, 5, 6, 30, 179, 180, 181, 600]), seconds=rng.choice([0, 0, 30]))
        who = rng.choice(["me", "me", "Sam", "Ann", "twin"])
        kind = rng.choice(["text"] * 8 + ["media", "service"])
        text = rng.choice(["hi", "ok", "", "  ", "https://x.org/a", "see https://x.org", "[photo]", "sure thing",
                           "where do you live?", f"{tag} {i}"])
        s.add(Message(chat_id=chat_id, dedup_key=f"{tag}{i}", sender_id="me" if who in ("me", "twin") else who.lower(),
                      sender_name="Alex" if who in ("me", "twin") else who, is_owner=who in ("me", "twin"),
                      text=text, kind=kind, is_forwarded=rng.random() < 0.1, sent_at=t,
                      source="twin" if who == "twin" else rng.choice(["ingest"] * 5 + ["live"])))
    return t


def _random_chats(s, rng, tags: Sequence[str], messages: int = 120) -> list[int]:  # type: ignore[no-untyped-def]
    """A chat of ``messages`` random messages (see ``_random_messages``) for each tag; their ids."""
    ids = []
    for n, tag in enumerate(tags):
        chat = Chat(platform="telegram", external_id=f"{tag[:40]}{n}")
        s.add(chat)
        s.flush()
        _random_messages(s, chat.id, rng, T0, messages, tag)
        ids.append(chat.id)
    return ids


def _closing_turns(s, chat_id: int, t: datetime, tag: str, who: Sequence[str] = ("Sam", "Ann", "Sam", "Ann", "me"),  # type: ignore[no-untyped-def]
                   tie: bool = False) -> datetime:
    """Turns a minute apart, the owner's last: the chat's last turn is a sample with a full window.
    ``tie``: then Sam answers in the same second (the last turn starts when the owner's does)."""
    for i, name in enumerate(who):
        t += timedelta(minutes=1)
        s.add(Message(chat_id=chat_id, dedup_key=f"{tag}{i}", sender_id=name.lower(), sender_name=name,
                      is_owner=name == "me", text=f"{tag} {name} {i}", sent_at=t))
    if tie:
        s.add(Message(chat_id=chat_id, dedup_key=f"{tag}tie", sender_id="sam", sender_name="Sam", text=f"{tag} same second",
                      sent_at=t))
    return t


def test_a_build_continues_the_last_one_and_makes_what_a_fresh_build_makes(engine, tokenizer, tmp_path: Path,
                                                                          monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A rebuild copies what it can of the last build (chats that only grew are continued from
    their last turn, which a new message may still extend) and renders the rest; whatever changed
    (new messages, a message inserted into the past, a new chat, a context reset, a deleted chat, a
    JSONL edited since), the result is byte for byte, count for count, what a build from scratch makes."""
    import random

    rng = random.Random(11)
    ends: dict[int, datetime] = {}
    with make_session_factory(engine)() as s:
        for n_chat in range(4):
            chat = Chat(platform="telegram", external_id=f"cont{n_chat}")
            s.add(chat)
            s.flush()
            t = _random_messages(s, chat.id, rng, T0 + timedelta(hours=n_chat), 150, f"c{n_chat}-")
            ends[chat.id] = _closing_turns(s, chat.id, t, f"end{n_chat}-", tie=n_chat % 2 == 1)
        s.commit()
    ids = sorted(ends)

    out = tmp_path / "set.jsonl"

    def both(cfg: DatasetConfig, step: str):  # type: ignore[no-untyped-def]
        with make_session_factory(engine)() as s:
            kept = build(s, cfg, tokenizer, Persona("Alex"), out)
            fresh_out = tmp_path / step / "set.jsonl"
            fresh = build(s, cfg, tokenizer, Persona("Alex"), fresh_out)
        assert out.read_bytes() == fresh_out.read_bytes(), step
        assert (kept.fingerprint, kept.train, kept.validation, kept.with_query) == \
            (fresh.fingerprint, fresh.train, fresh.validation, fresh.with_query), step
        assert (kept.counted.turns, kept.counted.samples, kept.counted.filtered) == \
            (fresh.counted.turns, fresh.counted.samples, fresh.counted.filtered), step
        assert fresh.chats_kept == 0 and kept.validation > 0 and kept.with_query > 0
        return kept

    def counted_from_the_state(cfg: DatasetConfig) -> list[int]:  # the ingest summary's count: chats counted afresh
        import trainer.dataset as ds

        afresh: list[int] = []
        lean = ds._sample_keys

        def spy(session, cfg, chat_ids, counted, upto=None):  # type: ignore[no-untyped-def]
            afresh.extend(chat_ids or [])
            return lean(session, cfg, chat_ids, counted, upto)

        with make_session_factory(engine)() as s:
            monkeypatch.setattr(ds, "_sample_keys", spy)
            quick = count_samples(s, cfg, state=out.with_suffix(".state.npz"))
            monkeypatch.undo()
            slow = count_samples(s, cfg)
        assert (quick.turns, quick.samples, quick.filtered) == (slow.turns, slow.samples, slow.filtered)
        return afresh

    cfgs = [DatasetConfig(validation_fraction=0.2),
            DatasetConfig(validation_fraction=0.3, train_speakers=("Ann",),
                          context=ContextConfig(max_turns=3, window_hours=2, include_service=True))]
    for n_cfg, cfg in enumerate(cfgs):
        out.unlink(missing_ok=True)
        first = both(cfg, f"first{n_cfg}")
        again = both(cfg, f"again{n_cfg}")  # nothing changed: every line copied
        assert again.chats_kept == len(ids) and again.reused == again.train + again.validation
        with make_session_factory(engine)() as s:  # two chats grow (a new message may join their last turn)
            for chat_id in ids[1::2]:
                t = _closing_turns(s, chat_id, ends[chat_id], f"join{n_cfg}-{chat_id}-", ["me"])  # joins the last turn
                t = _random_messages(s, chat_id, rng, t, 25, f"more{n_cfg}-{chat_id}-")
                ends[chat_id] = _closing_turns(s, chat_id, t, f"close{n_cfg}-{chat_id}-", tie=True)
            s.commit()
        assert counted_from_the_state(cfg) == []  # every chat from its state
        grown = both(cfg, f"grown{n_cfg}")
        assert grown.chats_kept == len(ids) and grown.train + grown.validation > first.train + first.validation
        assert 0 < grown.reused < grown.train + grown.validation
        with make_session_factory(engine)() as s:  # a message into the past of chat 0, a new chat, chats grow
            _random_messages(s, ids[0], rng, T0 + timedelta(minutes=30), 1, f"past{n_cfg}-")
            chat = Chat(platform="telegram", external_id=f"new{n_cfg}")
            s.add(chat)
            s.flush()
            ends[chat.id] = _random_messages(s, chat.id, rng, T0, 60, f"new{n_cfg}-")
            for chat_id in ids[1:]:
                ends[chat_id] = _random_messages(s, chat_id, rng, ends[chat_id], 5, f"late{n_cfg}-{chat_id}-")
            s.commit()
            ids = sorted(ends)
        assert counted_from_the_state(cfg) == [ids[0], ids[-1]]  # the chat with a message into its past, the new one
        changed = both(cfg, f"changed{n_cfg}")
        assert changed.chats_kept == len(ids) - 2  # chat 0 and the new chat are built afresh
        with make_session_factory(engine)() as s:  # a context reset, a deleted chat
            s.get(Chat, ids[1]).context_reset_at = ends[ids[1]] - timedelta(hours=30)
            s.delete(s.get(Chat, ids[2]))
            s.commit()
            del ends[ids[2]]
            ids = sorted(ends)
        reset = both(cfg, f"reset{n_cfg}")
        assert reset.chats_kept == len(ids) - 1
        lines = out.read_text().splitlines()  # the JSONL edited since (a line scrubbed): built afresh
        out.write_text("\n".join(lines[1:]) + "\n")
        assert both(cfg, f"edited{n_cfg}").chats_kept == 0


def test_a_state_that_does_not_describe_its_jsonl_means_a_build_from_scratch(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The state's line index is trusted only as far as it holds: lines of a chat that are not one
    run in the last JSONL (a state written beside another file) make the build start afresh."""
    import random

    import numpy as np

    rng = random.Random(3)
    with make_session_factory(engine)() as s:
        _random_chats(s, rng, ["s0-", "s1-"])
        s.commit()
        out = tmp_path / "set.jsonl"
        first = build(s, DatasetConfig(), tokenizer, Persona("Alex"), out)
        state = out.with_suffix(".state.npz")
        with np.load(state) as z:
            arrays = {k: z[k] for k in z.files}
        chats = arrays["chat"]
        assert len(set(chats.tolist())) == 2
        other = int(np.nonzero(chats != chats[0])[0][0])
        chats[[0, other]] = chats[[other, 0]]  # a line of each chat said to be of the other
        np.savez(state, **arrays)
        os.utime(out, ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns))
        again = build(s, DatasetConfig(), tokenizer, Persona("Alex"), out)
        fresh = build(s, DatasetConfig(), tokenizer, Persona("Alex"), tmp_path / "fresh" / "set.jsonl")
    assert again.chats_kept == 0 and again.fingerprint == first.fingerprint == fresh.fingerprint
    assert out.read_bytes() == (tmp_path / "fresh" / "set.jsonl").read_bytes()


def test_the_twin_speaks_as_the_owner_of_the_history_unless_a_name_is_set() -> None:
    """With `persona_name` left alone, the twin is told the name on the owner's own messages (not
    "me"), and training samples and replies both take it from the same place."""
    from doppel.context import AppContext
    from doppel.migrate import upgrade
    from feedback import store

    c = AppContext.load()
    assert c.persona.name == "me"  # no database yet: the setting's default
    c = AppContext.load()
    c.ensure_data_dir()
    upgrade(c.raw_engine)
    assert c.persona.name == "me"  # a database without the owner's messages
    with make_session_factory(c.raw_engine).begin() as s:
        chat = store.get_chat(s, "telegram", "42", "Sam", "private")
        for i, (name, owner, source) in enumerate([("Sam", False, "ingest"), ("Alice Example", True, "ingest"),
                                                   ("Alice Example", True, "ingest"), ("Alice", True, "ingest"),
                                                   ("Twin", True, "twin"), ("Twin", True, "twin"), ("Twin", True, "twin")]):
            s.add(Message(chat_id=chat.id, dedup_key=f"p{i}", sender_id="me" if owner else "sam", sender_name=name,
                          is_owner=owner, text="hi", sent_at=T0 + timedelta(minutes=i), source=source))
    c = AppContext.load()
    assert c.persona.name == "Alice Example"  # the most of the owner's messages; the twin's replies left out
    assert c.agent_config().persona == c.persona
    assert AppContext.load(persona_name="Al").persona.name == "Al"  # a name that is set wins


def test_the_covering_samples_teach_every_reply_and_leave_out_the_repeats(engine, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``history_samples`` covering: of a long conversation's samples (each prompt holds the owner's
    earlier replies, learned there too), the ones kept teach every reply of the owner's, and none
    teaches a reply a newer kept one already holds; a sample of another conversation, out of the
    window, is kept on its own."""
    rows = [(2 * k + d, "Sam" if d == 0 else "me", f"{'question' if d == 0 else 'answer'} {k}")
            for k in range(20) for d in (0, 1)]
    rows += [(24 * 60, "Sam", "a day later"), (24 * 60 + 1, "me", "morning")]
    add_chat(engine, rows)
    with make_session_factory(engine)() as s:
        build(s, DatasetConfig(validation_fraction=0), tokenizer, Persona("Alex"), tmp_path / "set.jsonl")
    train = read_dataset(tmp_path / "set.jsonl", "train")
    history = [e for e in train if e.source == "dataset"]
    assert len(history) == 21

    def taught(e):  # type: ignore[no-untyped-def]
        return [e.completion] + [e.prompt[a:b] for a, b in e.targets]

    kept = [e for e in history if not e.redundant]
    assert 2 <= len(kept) < len(history) / 2  # a prompt holds several earlier replies
    assert {t for e in kept for t in taught(e)} == {e.completion for e in history}
    for i, e in enumerate(kept):
        assert all(e.completion not in taught(newer) for newer in kept[i + 1:])
    assert kept[-1].completion.startswith("morning") and kept[-2].completion.startswith("answer 19")
