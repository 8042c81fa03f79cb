"""Fact drills: questions about each fact, answered with it in the owner's style, built through
the agent's own prompt path and retrieval."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.prompt import Persona
from feedback.db import make_session_factory
from knowledge.index import KnowledgeBase
from tests.helpers import FakeEmbedder
from tests.test_dataset import T0, add_chat
from trainer.dataset import DatasetConfig, build
from trainer.drills import Style, answer, drills, questions, second_person


def test_questions_come_in_two_families_that_never_overlap() -> None:
    facts = [("a", "I am vegetarian; I don't eat meat.", "Food"), ("b", "I live in Prague.", "Home"),
             ("c", "I grew up in Brno.", "Home"), ("d", "My cat is called Knedlík.", "Pets"),
             ("e", "I can't stand coriander.", "Food")]
    train = {d.question for d in drills(facts, "train", per_fact=10)}
    held = {d.question for d in drills(facts, "held_out", per_fact=10)}
    assert train and held and not train & held
    assert "are you vegetarian?" in train and "do you live in Prague?" in train
    assert "so you grew up in Brno?" in train and "can you stand coriander?" in train
    assert any("your cat" in q for q in train)
    assert len(drills(facts, "train", per_fact=2)) == 10
    assert second_person("I share my flat with Jana") == "you share your flat with Jana"
    # shorter and open questions, so the answer says more than the question did
    more = [("f", "I share a flat with my partner Jana.", "Home"), ("g", "I work from home on Mondays.", "Work"),
            ("h", "My favourite band is Radiohead.", "Music"), ("i", "I'm reading Piranesi by Susanna Clarke.", "Books")]
    asked = {d.question for d in drills(more, "train", per_fact=20)}
    assert {"do you share a flat?", "when do you work from home?", "what's your favourite band?",
            "what are you reading?"} <= asked
    assert "what's your cat called?" in {d.question for d in drills(facts, "train", per_fact=20)}
    assert all(d.fact == "I live in Prague." for d in questions("b", "I live in Prague.", "Home"))


def test_answers_take_the_owners_style() -> None:
    casual = Style.of(["yeah sure", "lol ok", "nope", "maybe tmrw", "I think so"])
    assert casual == Style(lowercase=True, final_period=False)
    assert answer("My cat is called Knedlík.", casual) == "my cat is called Knedlík"
    assert answer("I live in Prague.", casual) == "I live in Prague"  # "I" stays upper case
    formal = Style.of(["Yes, I will be there.", "Thank you.", "See you tomorrow."])
    assert answer("My cat is called Knedlík.", formal) == "My cat is called Knedlík."


def test_a_run_drills_each_fact_through_the_agents_retrieval(engine: Any, tokenizer: Any, tmp_path: Path) -> None:
    from agent.prompt import completion_text, reply_of
    from trainer.dataset import drill_examples
    from trainer.examples import read_dataset

    add_chat(engine, [(0, "Sam", "hi"), (1, "me", "hey there"), (2, "Sam", "what's new?"), (3, "me", "not much tbh")])
    facts = tmp_path / "facts.md"
    facts.write_text("## Food\n- I am vegetarian.\n## Pets\n- My cat is called Knedlík.\n## Home\n- I live in Prague.\n")
    kb = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    asked: list[tuple[str, Any]] = []

    def retrieve(queries: Any) -> list[list[tuple[str, str]]]:
        asked.extend(queries)
        return [[(h.fact.id, h.fact.text) for h in hits] for hits in kb.search_many(queries)]

    fs = [(f.id, f.text, f.topic) for f in kb.facts()]
    with make_session_factory(engine)() as s:
        build(s, DatasetConfig(), tokenizer, Persona("Alex"), tmp_path / "set.jsonl")
    records = [json.loads(line) for line in (tmp_path / "set.jsonl").open()]
    assert not [r for r in records if r.get("drill")] and not asked  # the build drills nothing, retrieves nothing
    sample = next(r for r in records if r["reply"] == "not much tbh")  # it keeps the query a run retrieves for
    assert sample["query"] == ["what's new?", ["hi", "hey there"]]
    replies = [reply_of(tokenizer, e.completion) for e in read_dataset(tmp_path / "set.jsonl") if e.owner]
    assert replies == ["hey there", "not much tbh"]
    drilled = drill_examples(tokenizer, Persona("Alex"), DatasetConfig(drills_per_fact=2), retrieve, fs, replies)
    assert drilled and all(d.source == "drill" for d in drilled)
    for d in drilled:
        fact = next(t for i, t, _ in fs if i == d.drill)
        assert d.drill in d.fact_ids  # left out when retrieval missed the fact
        assert f"- {fact}" in d.prompt  # the prompt carries it as the agent would
        assert d.completion == completion_text(tokenizer, answer(fact, Style.of(["hey there", "not much tbh"])))
    assert {d.drill for d in drilled} <= {i for i, _, _ in fs} and len(drilled) <= 2 * len(fs)
    assert drill_examples(tokenizer, Persona("Alex"), DatasetConfig(drills_per_fact=0), retrieve, fs, replies) == []
    assert T0 + timedelta(0) == T0


def test_some_drills_put_the_fact_asked_about_among_others_at_any_place() -> None:
    from trainer.dataset import DRILL_FACTS, with_distractors

    facts = {"veg": ("I am vegetarian.", "Food"), "pea": ("I am allergic to peanuts.", "Food"),
             "fal": ("My favourite dinner spot is a falafel place.", "Food"), "cat": ("My cat is called Knedlík.", "Pets"),
             "pra": ("I live in Prague.", "Home")}
    alone = [("veg", "I am vegetarian.")]
    assert with_distractors(alone, "veg", facts, 0.0, "q") == alone  # off
    seen_at: set[int] = set()
    for n in range(40):
        got = with_distractors(alone, "veg", facts, 1.0, f"question {n}")
        ids = [i for i, _ in got]
        assert got == with_distractors(alone, "veg", facts, 1.0, f"question {n}")  # the same at every build
        assert 2 <= len(got) <= DRILL_FACTS and len(set(ids)) == len(ids) and "veg" in ids
        assert all(text == facts[i][0] for i, text in got)
        if len(got) == 2:  # one other fact: from the same topic while there is one
            assert facts[next(i for i in ids if i != "veg")][1] == "Food"
        seen_at.add(ids.index("veg"))
    assert seen_at == {0, 1, 2}  # first too: never first would teach "not the first fact"
    # what retrieval put beside the drilled fact stays, in its order; the drilled fact may move
    retrieved = [("veg", "I am vegetarian."), ("cat", "My cat is called Knedlík."), ("pra", "I live in Prague.")]
    orders = {tuple(i for i, _ in with_distractors(retrieved, "veg", facts, 1.0, f"q{n}")) for n in range(40)}
    assert orders == {("veg", "cat", "pra"), ("cat", "veg", "pra"), ("cat", "pra", "veg")}
    mixed = [with_distractors(alone, "veg", facts, 0.5, f"q{n}") != alone for n in range(200)]
    assert 60 < sum(mixed) < 140  # about the share asked for


def test_dataset_build_says_what_is_missing(tmp_path: Path, shared_models: Path) -> None:
    from tests.helpers import run_cli

    assert run_cli("db", "upgrade", cwd=tmp_path).returncode == 0
    empty = run_cli("dataset", "build", cwd=tmp_path)  # no history, no facts
    assert empty.returncode == 0, empty.stderr
    out = " ".join(empty.stdout.split())
    assert "No facts in" in out and "doppel facts add" in out
    assert "none of the stored messages is yours" in out and "--me" in out
    (tmp_path / "data" / "facts.md").write_text("## Domov\n- Bydlím v Praze.\n- Jsem vegetarián.\n", encoding="utf-8")
    czech = run_cli("dataset", "build", cwd=tmp_path)
    assert czech.returncode == 0, czech.stderr
    assert "not in English" in " ".join(czech.stdout.split())
