"""The model runtime, Agent.reply, the HTTP API and the reply/chat commands."""

from __future__ import annotations

import math
import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.adapters import ActiveAdapter
from agent.prompt import Persona
from agent.runtime import Generation, GenerationConfig, ModelRuntime, clean_reply, split_reply
from agent.conversation import ContextConfig
from agent.service import Agent, AgentConfig
from common.errors import BusyError, InputError, ModelError, NotFoundError
from feedback.db import make_session_factory
from feedback.models import Message, Rating, Reply, utcnow
from knowledge.index import KnowledgeBase
from tests.helpers import FakeEmbedder, ScriptedRuntime, mean_sampled_length, run_cli

GREEDY = GenerationConfig(temperature=0, max_new_tokens=8, min_new_tokens=8, repetition_penalty=1.0)


# --- cleaning and splitting ---
def test_clean_reply_stops_at_another_speaker() -> None:
    raw = "Alex: sure, 7pm works\nsee you there\nBob: great\nAlex: bye"
    assert clean_reply(raw, {"Bob"}, "Alex") == "sure, 7pm works\nsee you there"
    assert clean_reply("user: hi", set(), "Alex") == ""
    assert clean_reply("Note: bring cash", {"Bob"}, "Alex") == "Note: bring cash"


def test_clean_reply_cuts_where_the_model_repeats_its_instruction() -> None:
    # what the untrained model wrote in the demo after its answer
    raw = "I am vegetarian; I don't eat meat. Sentence 2: Same language, length and tone.\nmore"
    assert clean_reply(raw, {"Sam"}, "Alex") == "I am vegetarian; I don't eat meat."
    assert clean_reply("ok! I will write my next message the way Alex writes", set(), "Alex") == "ok!"
    assert clean_reply("same language, length and tone", set(), "Alex") == ""
    # words of it, or a short run of them, stay
    assert clean_reply("we speak the same language\nwhat tone?", set(), "Alex") == "we speak the same language\nwhat tone?"
    assert clean_reply("only with people you know. promise", set(), "Alex") == "only with people you know. promise"


def test_split_reply_follows_lines() -> None:
    assert split_reply("ok\n\nsee you at 7\n") == ["ok", "see you at 7"]
    assert split_reply("a\nb\nc\nd\ne\nf", max_parts=3) == ["a", "b", "c\nd\ne\nf"]


# --- the runtime, on a tiny random model ---
@pytest.fixture
def runtime(tiny_model, tokenizer) -> ModelRuntime:  # type: ignore[no-untyped-def]
    return ModelRuntime(tiny_model, tokenizer, "cpu")


def _prompt(tokenizer: Any, text: str = "Bob: hi, what's up?") -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_generation_returns_only_new_tokens(runtime: ModelRuntime, tokenizer: Any) -> None:
    prompt = _prompt(tokenizer)
    g1 = runtime.generate(prompt, GREEDY)
    g2 = runtime.generate(prompt, GREEDY)
    assert g1.new_tokens == 8 and g1.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert g1.raw == g2.raw  # greedy is deterministic
    assert "what's up" not in g1.raw and g1.total_ms >= g1.prefill_ms > 0
    assert im_end_id(tokenizer) in runtime.stop_ids


def im_end_id(tokenizer: Any) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_prompt_longer_than_the_model_is_refused(tiny_model: Any, tokenizer: Any) -> None:
    rt = ModelRuntime(tiny_model, tokenizer)
    with pytest.raises(ModelError, match="fills the model's length"):
        rt.generate("word " * 2100, GREEDY)


def _make_adapter(model: Any, path: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(path))
    peft_model.unload()  # give the base model back untouched


def test_adapter_follows_the_registry_pointer(tiny_model: Any, tokenizer: Any, tmp_path: Path) -> None:
    import copy

    base = copy.deepcopy(tiny_model)
    adapters = tmp_path / "adapters"
    _make_adapter(copy.deepcopy(tiny_model), adapters / "v1", 1)
    _make_adapter(copy.deepcopy(tiny_model), adapters / "v2", 2)
    rt = ModelRuntime(base, tokenizer, adapter_source=ActiveAdapter(adapters))
    prompt = _prompt(tokenizer)
    plain = rt.generate(prompt, GREEDY)
    assert plain.adapter_version is None
    (adapters / "ACTIVE").write_text("v1\n")
    with_v1 = rt.generate(prompt, GREEDY)
    assert with_v1.adapter_version == "v1" and with_v1.raw != plain.raw
    time.sleep(0.01)
    (adapters / "ACTIVE").write_text("v2\n")
    with_v2 = rt.generate(prompt, GREEDY)
    assert with_v2.adapter_version == "v2" and with_v2.raw != with_v1.raw
    # a broken pointer keeps the adapter that serves
    time.sleep(0.01)
    (adapters / "ACTIVE").write_text("v9\n")
    assert rt.generate(prompt, GREEDY).adapter_version == "v2"
    (adapters / "ACTIVE").unlink()
    back = rt.generate(prompt, GREEDY)
    assert back.adapter_version is None and back.raw == plain.raw


def test_swap_waits_for_the_request_in_flight(tiny_model: Any, tokenizer: Any, tmp_path: Path) -> None:
    import copy

    _make_adapter(copy.deepcopy(tiny_model), tmp_path / "v1", 1)
    rt = ModelRuntime(copy.deepcopy(tiny_model), tokenizer)
    long = GenerationConfig(temperature=0, max_new_tokens=300, min_new_tokens=300)
    result: list[Generation] = []
    worker = threading.Thread(target=lambda: result.append(rt.generate(_prompt(tokenizer), long)))
    worker.start()
    time.sleep(0.05)
    rt.use_adapter(tmp_path / "v1", "v1")  # blocks until the request in flight is done
    assert not worker.is_alive() or worker.join(5) is None
    assert result and result[0].adapter_version is None and result[0].new_tokens == 300
    assert rt.adapter_version == "v1"
    with pytest.raises(ModelError, match="adapter_config.json"):
        rt.use_adapter(tmp_path / "missing")


def test_busy_model_gives_a_clear_error(runtime: ModelRuntime, tokenizer: Any) -> None:
    runtime.queue_timeout_s = 0.05
    runtime._lock.acquire()
    try:
        with pytest.raises(BusyError, match="busy"):
            runtime.generate(_prompt(tokenizer), GREEDY)
    finally:
        runtime._lock.release()


# --- the agent, with a scripted runtime ---
@pytest.fixture
def sessions(engine):  # type: ignore[no-untyped-def]
    return make_session_factory(engine)


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    facts = tmp_path / "facts.md"
    facts.write_text("## Food\n- I am vegetarian.\n## Pets\n- My cat is called Knedlík.\n")
    return KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())


def _agent(tokenizer: Any, sessions: Any, kb: Any = None, replies: list[str] | None = None, **cfg: Any) -> Agent:
    config = AgentConfig(persona=Persona("Alex", "I write short lowercase messages."), **cfg)
    return Agent(ScriptedRuntime(tokenizer, replies), kb, sessions, config)  # type: ignore[arg-type]


def test_reply_is_a_record_with_prompt_facts_and_version(tokenizer: Any, sessions: Any, kb: KnowledgeBase) -> None:
    agent = _agent(tokenizer, sessions, kb, ["sure!\nsee you at 7"])
    reply = agent.reply("c1", "Bob", "is your cat called Knedlík?")
    assert reply.messages == ["sure!", "see you at 7"] and reply.adapter_version == "v7"
    assert reply.facts and reply.facts[0]["text"] == "My cat is called Knedlík."
    prompt = agent.runtime.prompts[0]  # type: ignore[attr-defined]
    assert "My cat is called Knedlík." in prompt and "I write short lowercase messages." in prompt
    assert "Bob: is your cat called Knedlík?" in prompt
    with sessions() as s:
        row = s.get(Reply, reply.id)
        assert row.prompt == prompt and row.fact_ids == [reply.facts[0]["id"]]
        assert row.adapter_version == "v7" and row.latency_ms > 0 and row.in_reply_to_id is not None
        assert [m.source for m in s.query(Message).order_by(Message.id)] == ["live", "twin"]


def test_length_bias_follows_the_owners_turns_against_the_adapters_typical_length() -> None:
    from agent.prompt import LENGTH_BIAS_LIMIT, length_bias

    assert length_bias([], 60.0) == 0.0  # nothing of the owner's in this conversation
    assert length_bias(["x" * 300], None) == 0.0  # the base model: no typical length known
    assert length_bias(["x" * 300], 60.0, follow=0.0) == 0.0  # switched off
    assert length_bias(["x" * 60, "y" * 60], 60.0) == pytest.approx(0.0)
    # one turn five times the typical, shrunk halfway toward it by the prior: half of log 5
    assert length_bias(["x" * 300], 60.0) == pytest.approx(-0.5 * math.log(5))
    # three such turns: three quarters; shorter turns than typical: stopping made likelier
    assert length_bias(["x" * 300] * 3, 60.0) == pytest.approx(-0.75 * math.log(5))
    assert length_bias(["ok", "no", "  "], 60.0) > 1.0
    assert length_bias(["x" * 100000] * 9, 60.0) == -LENGTH_BIAS_LIMIT  # clamped
    assert length_bias(["x" * 300], 60.0, follow=0.5) == pytest.approx(-0.25 * math.log(5))


def test_a_reply_follows_the_length_of_the_owners_side_of_the_conversation(tokenizer: Any, sessions: Any) -> None:
    """The twin's earlier turns in the chat set the next reply's stop bias, measured against the
    serving adapter's typical reply length; with no adapter length known there is none."""
    long_reply = "well " * 60  # 300 characters, stripped: 299
    agent = _agent(tokenizer, sessions, replies=[long_reply.strip(), "ok", "fine"])
    rt = agent.runtime
    rt.reply_chars = 60.0  # type: ignore[attr-defined]
    agent.reply("c1", "Bob", "tell me everything")
    assert rt.configs[-1].stop_bias == 0.0  # type: ignore[attr-defined]  # no turn of the owner's yet
    agent.reply("c1", "Bob", "and then?")
    assert long_reply.strip() in rt.prompts[-1]  # type: ignore[attr-defined]
    assert rt.configs[-1].stop_bias == pytest.approx(-0.5 * math.log(299 / 60))  # type: ignore[attr-defined]
    rt.reply_chars = None  # type: ignore[attr-defined]  # the base model serves
    agent.reply("c1", "Bob", "really?")
    assert rt.configs[-1].stop_bias == 0.0  # type: ignore[attr-defined]


def test_context_window_reset_and_restart(tokenizer: Any, sessions: Any) -> None:
    agent = _agent(tokenizer, sessions, context=ContextConfig(window_hours=3))
    agent.reply("c1", "Bob", "first message")
    with sessions.begin() as s:  # an old message, outside the 3-hour window
        chat_id = s.query(Message).first().chat_id
        s.add(Message(chat_id=chat_id, dedup_key="old", sender_name="Bob", text="ancient history",
                      sent_at=utcnow() - timedelta(hours=5), source="live"))
    agent.reply("c1", "Bob", "second message")
    second = agent.runtime.prompts[-1]  # type: ignore[attr-defined]
    assert "first message" in second and "reply 1" in second and "ancient history" not in second
    assert second.index("first message") < second.index("reply 1") < second.index("second message")
    # a restart (a new agent on the same database) keeps the conversation
    agent2 = _agent(tokenizer, sessions)
    agent2.reply("c1", "Bob", "third")
    assert "second message" in agent2.runtime.prompts[-1]  # type: ignore[attr-defined]
    # /reset starts a fresh window; other chats never mix in
    agent2.reset("c1")
    agent2.reply("c2", "Eve", "other chat")
    agent2.reply("c1", "Bob", "after reset")
    last = agent2.runtime.prompts[-1]  # type: ignore[attr-defined]
    assert "third" not in last and "other chat" not in last and "after reset" in last


def test_ratings_update_one_row_per_rater(tokenizer: Any, sessions: Any) -> None:
    agent = _agent(tokenizer, sessions)
    reply = agent.reply("c1", "Bob", "hi")
    assert agent.rate(reply.id, "bob", 1) is True
    assert agent.rate(reply.id, "bob", 1) is False  # the same reaction again counts once
    agent.rate(reply.id, "bob", -1)
    agent.rate(reply.id, "eve", 1)
    with sessions() as s:
        assert sorted((r.rater_id, r.value) for r in s.query(Rating)) == [("bob", -1), ("eve", 1)]
    with pytest.raises(NotFoundError):
        agent.rate(999, "bob", 1)
    with pytest.raises(InputError):
        agent.rate(reply.id, "bob", 5)


def test_bad_messages_are_refused_and_a_failed_generation_keeps_the_message(tokenizer: Any, sessions: Any) -> None:
    agent = _agent(tokenizer, sessions, max_input_chars=100)
    with pytest.raises(InputError, match="empty"):
        agent.reply("c1", "Bob", "   ")
    with pytest.raises(InputError, match="at most 100"):
        agent.reply("c1", "Bob", "x" * 101)
    agent.runtime.fail = BusyError("busy")  # type: ignore[attr-defined]
    with pytest.raises(BusyError):
        agent.reply("c1", "Bob", "are you there?")
    with sessions() as s:
        assert [m.text for m in s.query(Message)] == ["are you there?"]
        assert s.query(Reply).count() == 0


def test_concurrent_chats_never_mix(tiny_model: Any, tokenizer: Any, sessions: Any) -> None:
    rt = ModelRuntime(tiny_model, tokenizer)
    agent = Agent(rt, None, sessions, AgentConfig(generation=GREEDY))
    results: dict[str, Any] = {}

    def talk(i: int) -> None:
        results[f"chat{i}"] = agent.reply(f"chat{i}", f"Person{i}", f"secret number {i}")

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    with sessions() as s:
        for name, reply in results.items():
            row = s.get(Reply, reply.id)
            i = name[4:]
            assert f"secret number {i}" in row.prompt
            assert not any(f"secret number {j}" in row.prompt for j in range(6) if str(j) != i)


# --- the HTTP API ---
@pytest.fixture
def client(tokenizer: Any, sessions: Any, kb: KnowledgeBase):  # type: ignore[no-untyped-def]
    from agent.api import ApiConfig, create_app

    agent = _agent(tokenizer, sessions, kb)
    app = create_app(agent, kb, ApiConfig("s3cret", max_body_bytes=4096))
    c = app.test_client()
    c.agent = agent  # type: ignore[attr-defined]
    return c


AUTH = {"Authorization": "Bearer s3cret"}


def test_api_auth_and_health(client: Any) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.post("/api/chats/1/messages", json={"text": "hi"})
    assert r.status_code == 401 and "Bearer" in r.get_json()["hint"]
    assert client.get("/api/facts", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_api_message_rating_and_metrics(client: Any) -> None:
    r = client.post("/api/chats/42/messages", json={"text": "do you eat meat?", "sender": "Bob"}, headers=AUTH)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["text"] == "reply 1" and body["adapter_version"] == "v7" and body["chat_id"] == "42"
    rid = body["reply_id"]
    ok = client.post(f"/api/replies/{rid}/rating", json={"value": "👍", "rater": "bob"}, headers=AUTH)
    assert ok.status_code == 200 and ok.get_json()["changed"] is True
    assert client.post(f"/api/replies/{rid}/rating", json={"value": 3}, headers=AUTH).status_code == 400
    missing = client.post("/api/replies/999/rating", json={"value": 1}, headers=AUTH)
    assert missing.status_code == 404 and "error" in missing.get_json()
    assert client.post("/api/chats/42/messages", data="not json", headers=AUTH).status_code == 415  # no Content-Type
    bad = client.post("/api/chats/42/messages", data="not json", headers={**AUTH, "Content-Type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.get_json()["error"]
    big = client.post("/api/chats/42/messages", json={"text": "x" * 5000}, headers=AUTH)
    assert big.status_code == 413 and "4096" in big.get_json()["hint"]
    assert client.post("/api/chats/42/reset", headers=AUTH).status_code == 200
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert "doppel_replies_total 1" in metrics and 'doppel_ratings_total{value="up"} 1' in metrics
    assert 'doppel_reply_latency_seconds_bucket{le="+Inf"} 1' in metrics


def test_api_busy_is_503(client: Any) -> None:
    client.agent.runtime.fail = BusyError("The twin is busy.", hint="Try again.")
    r = client.post("/api/chats/1/messages", json={"text": "hi"}, headers=AUTH)
    assert r.status_code == 503 and r.get_json() == {"error": "The twin is busy.", "hint": "Try again."}


def test_api_facts_read_and_replace(client: Any, kb: KnowledgeBase) -> None:
    got = client.get("/api/facts", headers=AUTH).get_json()
    assert [f["text"] for f in got["facts"]] == ["I am vegetarian.", "My cat is called Knedlík."]
    bad = client.put("/api/facts", data=b"- caf\xe9", headers={**AUTH, "Content-Type": "text/markdown"})
    assert bad.status_code == 400 and "nothing was changed" in bad.get_json()["error"]
    assert "vegetarian" in kb.facts_path.read_text()
    put = client.put("/api/facts", json={"text": "## Home\n- I live in Brno.\n- I live in Brno.\n"}, headers=AUTH)
    assert put.status_code == 200 and put.get_json()["facts"] == 1 and put.get_json()["warnings"]
    assert [f.text for f in kb.facts()] == ["I live in Brno."]


# --- the real model, end to end through the command line ---
@pytest.mark.slow
def test_reply_command_with_the_real_model(shared_models: Path) -> None:
    (shared_models / "facts.md").write_text("## Pets\n- My cat is called Knedlík.\n")
    up = run_cli("db", "upgrade")
    assert up.returncode == 0, up.stderr
    r = run_cli("reply", "what's your cat called?", "--json", env={"DOPPEL_PERSONA_NAME": "Alex",
                                                                    "DOPPEL_TEMPERATURE": "0", "DOPPEL_MAX_NEW_TOKENS": "24"})
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["text"].strip() and body["new_tokens"] <= 24 and body["adapter_version"] is None
    assert body["facts"][0]["text"] == "My cat is called Knedlík." and body["latency_ms"] > 0
    assert "<|im_" not in body["text"] and "user:" not in body["text"].lower()
    # the next reply in the same chat sees the first one as its context
    r2 = run_cli("reply", "and how old is it?", "--json", env={"DOPPEL_TEMPERATURE": "0", "DOPPEL_MAX_NEW_TOKENS": "8"})
    assert json.loads(r2.stdout)["context_messages"] == 2


def test_reply_command_errors(tmp_path: Path) -> None:
    r = run_cli("reply", "hi", "--adapter", str(tmp_path / "nope"))
    assert r.returncode != 0 and "Error" in r.stderr
    s = run_cli("serve")
    assert s.returncode == 2 and "DOPPEL_API_TOKEN" in s.stderr


@pytest.mark.slow
def test_wsgi_app_from_settings(shared_models: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``doppel.app.create_app(settings)`` builds the whole app: real model, real embeddings."""
    from doppel.app import create_app
    from doppel.settings import load_settings

    (shared_models / "facts.md").write_text("## Pets\n- My cat is called Knedlík.\n")
    monkeypatch.setenv("DOPPEL_DATABASE_URL", str(engine.url))
    monkeypatch.setenv("DOPPEL_API_TOKEN", "t0k")
    monkeypatch.setenv("DOPPEL_MAX_NEW_TOKENS", "6")
    settings, _ = load_settings()
    client = create_app(settings).test_client()
    assert client.get("/healthz").get_json()["status"] == "ok"
    auth = {"Authorization": "Bearer t0k"}
    assert client.get("/api/facts", headers=auth).get_json()["facts"][0]["text"] == "My cat is called Knedlík."
    r = client.post("/api/chats/x/messages", json={"text": "what's your cat called?", "sender": "Sam"}, headers=auth)
    assert r.status_code == 201 and r.get_json()["facts"][0]["text"] == "My cat is called Knedlík."
    assert r.get_json()["new_tokens"] <= 6


def test_facts_sit_next_to_the_newest_message_and_the_chat_stays_one_prefix(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The facts follow the newest incoming message, right before the reply starts; the system
    message holds none, so two messages of one chat with different facts share the conversation as
    a prefix (what the serving backend's prompt cache reuses). A chat whose newest turn is the
    twin's own keeps its facts in the system message; the plain transcript puts them last too."""
    from agent.prompt import FACTS_HEADER, Persona, Turn, render_prompt

    alex = Persona("Alex")
    chat = [Turn("Sam", "hey, long time"), Turn("Alex", "yo! all good", is_self=True)]
    first = render_prompt(tokenizer, alex, ["I live in Prague"], [*chat, Turn("Sam", "where are you these days?")]).text
    facts_at = first.index(FACTS_HEADER)
    assert first.index("where are you these days?") < facts_at < first.index("I live in Prague")
    assert first.rindex("<|im_start|>user") < facts_at and first.endswith("<|im_start|>assistant\n")
    chat += [Turn("Sam", "where are you these days?"), Turn("Alex", "Prague!", is_self=True)]
    second = render_prompt(tokenizer, alex, ["I am vegetarian"], [*chat, Turn("Sam", "steak tonight?")]).text
    shared = first[:facts_at].rstrip()
    assert second.startswith(shared) and "I live in Prague" not in second
    assert second.index("steak tonight?") < second.index("I am vegetarian")
    own = render_prompt(tokenizer, alex, ["I am vegetarian"], [Turn("Sam", "hi"), Turn("Alex", "hi!", is_self=True)]).text
    assert own.index("I am vegetarian") < own.index("<|im_start|>user")

    class Plain:  # a tokenizer without a chat template
        chat_template = None

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return list(range(len(text.split())))

    plain = render_prompt(Plain(), alex, ["I live in Prague"], [Turn("Sam", "where do you live?")]).text
    assert plain.index("Sam: where do you live?") < plain.index(FACTS_HEADER) and plain.endswith("\nAlex:")


def test_repetition_penalty_spares_the_facts(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The penalty falls on what the reply wrote and on the rest of the prompt (the conversation's
    words), not on words only the facts hold: the twin is not pushed away from stating its facts."""
    import torch

    from agent.prompt import Persona, Turn, render_prompt, without_facts
    from agent.runtime import reply_repetition_penalty

    prompt = render_prompt(tokenizer, Persona("Alex"), ["I am vegetarian", "I live in Prague"],
                           [Turn("Sam", "fancy a steak tonight?")]).text
    assert "vegetarian" not in without_facts(prompt) and "Prague" not in without_facts(prompt)
    assert "steak" in without_facts(prompt) and without_facts(prompt).startswith(prompt[:20])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    proc = reply_repetition_penalty(2.0, tokenizer, prompt, len(ids))
    vegetarian = tokenizer(" vegetarian", add_special_tokens=False)["input_ids"][-1]
    steak = tokenizer(" steak", add_special_tokens=False)["input_ids"][-1]
    written = tokenizer(" pasta", add_special_tokens=False)["input_ids"][-1]
    seq = torch.tensor([ids + [written]])
    scores = torch.full((1, len(tokenizer)), 4.0)
    out = proc(seq, scores.clone())
    assert out[0, vegetarian] == 4  # a fact's word: untouched
    assert out[0, steak] == 2 and out[0, written] == 2  # the conversation's and the reply's words: penalised
    neg = proc(seq, -scores.clone())
    assert neg[0, steak] == -8 and neg[0, vegetarian] == -4


def test_fact_boost_favours_the_facts_words_until_written(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The fact boost raises the words only the facts hold ("vegetarian", "Prague"), not the
    instructions' or the conversation's, nor punctuation; a word the reply has written is no longer
    raised; a prompt without facts is left alone; both backends get it through reply_processors."""
    import torch

    from agent.prompt import Persona, Turn, render_prompt, split_facts
    from agent.runtime import FactBoost, GenerationConfig, ReplyRepetitionPenalty, fact_boost, reply_processors

    facts = ["I am vegetarian", "I live in Prague."]
    prompt = render_prompt(tokenizer, Persona("Alex"), facts, [Turn("Sam", "fancy a steak tonight?")]).text
    assert [line[:len(f)] for line, f in zip(split_facts(prompt)[1], facts)] == facts  # the last may end with the template's marker
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    proc = fact_boost(3.0, tokenizer, prompt, len(ids))
    vegetarian = tokenizer(" vegetarian", add_special_tokens=False)["input_ids"][0]
    prague = tokenizer(" Prague", add_special_tokens=False)["input_ids"][0]
    steak = tokenizer(" steak", add_special_tokens=False)["input_ids"][-1]
    alex = tokenizer(" Alex", add_special_tokens=False)["input_ids"][-1]
    dot = tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    scores = torch.zeros((1, len(tokenizer)))
    out = proc(torch.tensor([ids]), scores.clone())
    assert out[0, vegetarian] == 3 and out[0, prague] == 3
    assert out[0, steak] == 0 and out[0, alex] == 0 and out[0, dot] == 0
    written = proc(torch.tensor([ids + [vegetarian]]), scores.clone())
    assert written[0, vegetarian] == 0 and written[0, prague] == 3
    bare = render_prompt(tokenizer, Persona("Alex"), [], [Turn("Sam", "fancy a steak tonight?")]).text
    assert torch.equal(fact_boost(3.0, tokenizer, bare, 10)(torch.tensor([ids]), scores.clone()), scores)
    kinds = [type(p) for p in reply_processors(GenerationConfig(fact_boost=2.0), tokenizer, prompt, len(ids))]
    assert kinds == [ReplyRepetitionPenalty, FactBoost]
    assert [type(p) for p in reply_processors(GenerationConfig(fact_boost=0.0), tokenizer, prompt, len(ids))] == [ReplyRepetitionPenalty]


def test_calibrated_stop_keeps_the_stop_tokens_own_odds() -> None:
    """At a temperature below 1 the stop tokens keep the probability the model gives them; the
    other tokens share the rest in their tempered proportions; a forbidden stop stays forbidden."""
    from agent.runtime import CalibratedStop

    torch.manual_seed(0)
    scores = torch.randn(3, 200) * 3
    scores[:, 11] = scores.max(-1).values - 1  # the end of a sentence: stopping is likely, not the likeliest
    scores[2, 7] = float("-inf")  # min_new_tokens forbids stopping yet
    stop = [7, 11]
    out = torch.softmax(CalibratedStop(0.5, stop)(None, scores.clone()), dim=-1)
    own = torch.softmax(scores, dim=-1)
    tempered = torch.softmax(scores / 0.5, dim=-1)
    assert torch.allclose(out.sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out[:, stop], own[:, stop], atol=1e-6)
    rest = [i for i in range(200) if i not in stop]
    ratio = out[:, rest] / tempered[:, rest]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)  # the tempered shape, rescaled
    assert out[2, 7] == 0
    # plain tempering would have sharpened the stop decision away from the model's odds
    assert not torch.allclose(tempered[:, stop], own[:, stop], atol=1e-3)


def _fixed_odds(vocab: int, eos: int, word: int) -> torch.Tensor:
    """Next-token logits where a reply goes on with one word (73 %) or stops (27 %)."""
    logits = torch.full((vocab,), -40.0)
    logits[word], logits[eos] = 2.0, 1.0
    return logits


def test_sampled_replies_stop_at_the_models_own_odds(tiny_model: Any, tokenizer: Any) -> None:
    """The transformers backend: with every step's odds fixed (stop 27 %), replies sampled at
    temperature 0.3 end after ~3.7 tokens as the model says, not after ~29 (here: at the 12-token cap) as tempering would make it."""
    word = tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    fixed = _fixed_odds(len(tokenizer), tokenizer.eos_token_id, word)
    hook = tiny_model.lm_head.register_forward_hook(lambda m, i, o: fixed.expand_as(o).clone())
    try:
        rt = ModelRuntime(tiny_model, tokenizer)
        lengths = {calibrated: mean_sampled_length(rt, calibrated) for calibrated in (True, False)}
        longer = mean_sampled_length(rt, True, draws=60, stop_bias=-math.log(3))
        shorter = mean_sampled_length(rt, True, draws=60, stop_bias=math.log(3))
    finally:
        hook.remove()
    assert 2.0 < lengths[True] < 5.5, lengths
    assert lengths[False] > 8, lengths
    # a third of the odds of stopping (stop 11 % a step): ~6.8 tokens under the cap; three times: ~1.9
    assert 5.5 < longer < 8.5 and shorter < 2.6, (longer, shorter, lengths)
