"""The training set: turns, time window, filters, the prompt builder, masking, the time split."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path


from agent.prompt import Persona, PromptLimits, Turn, render_example, render_prompt
from feedback.db import make_session_factory
from feedback.models import Chat, Message
from trainer.dataset import DatasetConfig, build, count_samples, iter_samples, read_stats, scrub

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
    wide = samples(engine, DatasetConfig(window_hours=5))
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
    with make_session_factory(engine)() as s:
        r1 = build(s, cfg, tokenizer, Persona("Alex"), tmp_path / "set.jsonl")
        r2 = build(s, cfg, tokenizer, Persona("Alex"), tmp_path / "again.jsonl")
    assert (r1.train, r1.validation) == (8, 2)
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
    import sqlite3

    from tests.helpers import run_cli

    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "24 written by the owner" in result.stdout
    assert (tmp_path / "data" / "facts.md").is_file()
    # the twin answered, with the facts indexed, and the reply is a record
    assert "8 facts" in result.stdout and "Alex:" in result.stdout
    with sqlite3.connect(tmp_path / "data" / "doppel.db") as db:
        prompt, = db.execute("SELECT prompt FROM replies").fetchone()
    assert "You are Alex" in prompt and "what are you up to tonight?" in prompt
    stats = run_cli("dataset", "stats", cwd=tmp_path)
    assert "train: 16" in stats.stdout and "validation: 2" in stats.stdout
    again = run_cli("demo", cwd=tmp_path)
    assert "0 new, 47 already stored" in again.stdout
