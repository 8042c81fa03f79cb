"""LoRA training, rating replay, evaluation gate, registry, the pipeline and the nightly job."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.adapters import ActiveAdapter
from common.errors import BusyError, NotFoundError
from feedback.db import make_session_factory
from feedback.models import Adapter, Rating, Reply, TrainingRun
from feedback import store
from trainer.config import TrainConfig
from trainer.evaluate import gate, states_fact
from agent.prompt import Persona, PromptLimits, Turn, render_prompt
from trainer.examples import Example, mix_with_replay, rating_examples
from trainer.lora import encode, train_lora, weighted_loss
from trainer.pipeline import TrainingDeps, nightly, run_training, single_flight
from trainer.registry import Registry
from tests.helpers import run_cli


# --- losses and examples ---
def test_weighted_loss_likelihood_and_unlikelihood() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, 3, 4, 5]])
    loss = weighted_loss(logits, labels, torch.tensor([1.0, 0.0]), 1.0)
    logp = torch.log_softmax(logits[0, 1:4], -1)
    assert torch.isclose(loss * 2, -(logp[0, 3] + logp[1, 4] + logp[2, 5]) / 3)
    # a step on the unlikelihood loss lowers the disliked tokens' probability
    bad = weighted_loss(logits, labels, torch.tensor([0.0, -1.0]), 1.0)
    bad.backward()
    with torch.no_grad():
        before = torch.log_softmax(logits[1, 1:4], -1)[[0, 1, 2], [3, 4, 5]].sum()
        after = torch.log_softmax((logits - 1.0 * logits.grad)[1, 1:4], -1)[[0, 1, 2], [3, 4, 5]].sum()
    assert after < before


def test_the_loss_averages_over_tokens_or_over_examples() -> None:
    """``token``: every learned token of the batch weighs alike (a long reply's tokens count as much
    as a short one's, as in the held-out loss); ``example``: each example's mean, then their mean."""
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5], [-100, -100, -100, -100, 7, 8]])
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    long, short = -logp[0, :5], -logp[1, 3:]
    ones = torch.ones(2)
    assert torch.isclose(weighted_loss(logits, labels, ones, 1.0, "token"), torch.cat([long, short]).mean())
    assert torch.isclose(weighted_loss(logits, labels, ones, 1.0, "example"), (long.mean() + short.mean()) / 2)
    assert torch.isclose(weighted_loss(logits, labels, torch.tensor([2.0, 1.0]), 1.0, "token"),
                         (2 * long.sum() + short.sum()) / 7)
    assert not torch.isclose(weighted_loss(logits, labels, ones, 1.0, "token"),
                             weighted_loss(logits, labels, ones, 1.0, "example"))


@pytest.mark.parametrize("average", ["token", "example"])
def test_the_head_on_labelled_positions_gives_the_full_logits_loss(tiny_model: Any, average: str) -> None:
    """Training and evaluation run the output head on the labelled positions only: the loss, its
    gradient and the log-probabilities are those of the full logits."""
    from trainer.lora import collate, labelled_logprobs, labelled_loss

    model = copy.deepcopy(tiny_model)
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10], "weight": 1.0},
            {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14], "weight": -1.0}]
    batch = collate(rows, pad_id=0)
    full = weighted_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"], batch["weights"], 0.5, average)
    full.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    logp, where = labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert where.tolist() == [0, 0, 0, 1, 1]
    part = labelled_loss(logp, where, batch["weights"], 0.5, average)
    part.backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.allclose(full, part, atol=1e-5)
    assert len(got) == len(expected) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))


def test_encode_keeps_the_served_prompt_whole(tokenizer: Any) -> None:
    ex = Example("word " * 39 + "<|im_start|>assistant\n", "the reply is here and it goes on and on<|im_end|>\n")
    whole = encode(tokenizer, ex)
    assert whole is not None and whole.input_ids == tokenizer.encode(ex.prompt + ex.completion, add_special_tokens=False)
    completion = tokenizer.encode(ex.completion, add_special_tokens=False)
    assert whole.labels[-len(completion):] == completion and set(whole.labels[: -len(completion)]) == {-100}
    n_prompt = len(tokenizer.encode(ex.prompt, add_special_tokens=False))
    cut = encode(tokenizer, ex, n_prompt + 5)  # the prompt stays as the agent serves it; the reply's end goes
    assert cut is not None and cut.input_ids == whole.input_ids[: n_prompt + 5]
    assert encode(tokenizer, Example("word " * 300, "the reply<|im_end|>\n"), 64) is None  # never a prompt it would not serve


def test_time_budget_plans_the_examples_and_a_share_of_drills(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from trainer.lora import _plan, _select

    rows = [{"input_ids": [1] * (20 + i), "labels": [-100] * 10 + [1] * (10 + i), "weight": 1.0,
             "source": "drill" if i % 10 == 0 else "dataset"} for i in range(50)]
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cfg = TrainConfig(max_minutes=1e-6, batch_size=2, gradient_accumulation=2)
    plan = _plan(model, rows, cfg, tmp_path / "work", 0, False, "cpu")
    assert plan["available"] == 50 and plan["examples"] == 4  # one optimizer step is the least
    assert json.loads((tmp_path / "work" / "plan.json").read_text()) == plan  # a resumed run trains on the same
    assert _plan(model, rows, TrainConfig(max_minutes=600), tmp_path / "other", 0, False, "cpu")["examples"] == 50
    rows += [{**rows[1], "source": "rating"}, {**rows[2], "source": "correction"}]
    picked = _select(rows, 8, seed=1)
    sources = [r["source"] for r in picked]
    # the ratings and corrections all, drills a quarter at most, the rest history (not drills alone)
    assert len(picked) == 8 and sources.count("rating") == 1 and sources.count("correction") == 1
    assert sources.count("drill") == 2 and sources.count("dataset") == 4
    assert _select(rows, 8, seed=1) == picked
    assert sorted(r["source"] for r in _select(rows, 52, seed=1)) == sorted(r["source"] for r in rows)
    few = [r for r in rows if r["source"] != "dataset"][:6] + [r for r in rows if r["source"] == "dataset"][:1]
    assert len(_select(few, 6, seed=1)) == 6  # little history: the drills fill the run


def test_progress_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from doppel.progress import ProgressLog

    log_ = ProgressLog("training", "step", every_s=0)
    for step in (1, 2, 3, 4, 4):  # the end is reported twice (the last step, then the run's end): one line
        log_(step, 4, 2.5 - step / 10)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("training: step 4/4, loss 2.100")
    assert "ETA" in lines[1] and "elapsed" in lines[0]

    from doppel.progress import CountLog

    count = CountLog("dataset build", "sample", every_s=3600)
    count.advance(5)  # before the total is known: a count alone
    count.total(2500)  # told (again): counted from 0
    for _ in range(5):
        count.advance(500)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("dataset build: sample 5, elapsed") and "ETA" not in lines[0]
    assert len(lines) == 2 and lines[1].startswith("dataset build: sample 2,500/2,500, elapsed") and "ETA 0:00" in lines[1]


@pytest.fixture
def sessions(engine):  # type: ignore[no-untyped-def]
    return make_session_factory(engine)


def _reply(sessions: Any, text: str, prompt: str = "<|im_start|>user\nBob: hi<|im_end|>\n<|im_start|>assistant\n") -> int:
    with sessions.begin() as s:
        chat = store.get_chat(s, "test", "c1")
        return store.record_reply(s, chat, None, text, prompt, [], None, 1.0).id


def test_rating_examples_balance_and_withdrawals(sessions: Any, tokenizer: Any) -> None:
    ids = [_reply(sessions, f"reply {i}") for i in range(5)]
    with sessions.begin() as s:
        for i, v in zip(ids, (1, 1, 1, -1, 0)):
            store.rate(s, s.get(Reply, i), "bob", v)
        store.correct(s, s.get(Reply, ids[3]), "bob", "what I would say")
    with sessions() as s:
        rs = rating_examples(s, tokenizer)
    assert (rs.liked, rs.disliked) == (4, 1) and len(rs.rating_ids) == 4 and len(rs.correction_ids) == 1
    pos = sum(e.weight for e in rs.examples if e.weight > 0)
    neg = -sum(e.weight for e in rs.examples if e.weight < 0)
    assert pos == pytest.approx(neg)  # each thumb carries half the signal
    assert any(e.completion.startswith("what I would say") and e.source == "correction" for e in rs.examples)
    mixed = mix_with_replay(rs.examples, [Example("p", "c")] * 50, ratio=2.0, seed=1)
    assert len(mixed) == 15 and sum(e.source == "dataset" for e in mixed) == 10


def test_gate() -> None:
    assert gate({"heldout_loss": 2.0}, {"heldout_loss": 2.0}, 0.02, 0).accept
    no = gate({"heldout_loss": 2.1}, {"heldout_loss": 2.0}, 0.02, 0)
    assert not no.accept and "rose" in no.reason
    m = gate({"heldout_loss": 2.0, "rating_margin": 0.1}, {"heldout_loss": 2.0, "rating_margin": 0.3}, 0.02, 0)
    assert not m.accept and "margin" in m.reason
    assert gate({"heldout_loss": None}, {"heldout_loss": 1.0}, 0.02, 0).accept
    for bad in (float("nan"), float("inf")):  # a diverged adapter: every comparison with NaN is false
        d = gate({"heldout_loss": bad}, {"heldout_loss": 2.0}, 0.02, 0)
        assert not d.accept and "diverged" in d.reason
        assert not gate({"heldout_loss": 2.0, "rating_margin": bad}, {"heldout_loss": 2.0, "rating_margin": 0.1}, 0.02, 0).accept
    fu = gate({"heldout_loss": 2.0, "fact_use": {"share": 0.3}}, {"heldout_loss": 2.0, "fact_use": {"share": 0.6}}, 0.02, 0)
    assert not fu.accept and "fact use fell from 60% to 30%" in fu.reason
    ok = gate({"heldout_loss": 2.0, "fact_use": {"share": 0.55}}, {"heldout_loss": 2.0, "fact_use": {"share": 0.6}}, 0.02, 0)
    assert ok.accept and "fact use 60% -> 55%" in ok.reason


def test_states_fact() -> None:
    assert states_fact("yeah I live in Prague now", "I live in Prague.")
    assert not states_fact("no idea", "I live in Prague.")
    assert states_fact("I'm not drinking alcohol", "I don't drink alcohol.")  # stems, same polarity
    assert not states_fact("I eat meat!", "I am vegetarian; I don't eat meat.")  # the opposite is not stated
    assert states_fact("I spent my childhood in Brno and moved to Prague for university",
                       "I grew up in Brno and moved to Prague for university.")


def test_fact_use_keeps_each_answer_with_its_question() -> None:
    """The fact-use figure keeps what was asked, the fact, the answer, and whether it was stated
    and in the prompt, so the run's page can show them; the share is counted from the same list."""
    from trainer.evaluate import EvalSet, question_probes, reply_metrics

    def retrieve(queries):  # type: ignore[no-untyped-def]
        return [[(1.0, "I live in Prague.")] if "live" in q else [] for q, _ in queries]

    probes = question_probes(lambda facts, q: f"{q}|{';'.join(facts)}", retrieve,
                             [("where do you live these days?", "I live in Prague."), ("any pets?", "I have a cat called Mia.")])
    got = reply_metrics({"facts": ["still in Prague, you?", "a cat, Mia"], "smalltalk": [], "contexts": []},
                        EvalSet(facts=probes))["fact_use"]
    assert got["answers"] == [
        {"question": "where do you live these days?", "fact": "I live in Prague.", "answer": "still in Prague, you?",
         "stated": True, "in_prompt": True},
        {"question": "any pets?", "fact": "I have a cat called Mia.", "answer": "a cat, Mia", "stated": True, "in_prompt": False}]
    assert got["stated"] == 2 and got["reached_prompt"] == 1 and got["share"] == 1.0
    missed = reply_metrics({"facts": ["no idea", "a cat, Mia"], "smalltalk": [], "contexts": []}, EvalSet(facts=probes))["fact_use"]
    assert [a["stated"] for a in missed["answers"]] == [False, True] and missed["share"] == 0.5


# --- the registry ---
def _fake_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_registry_versions_pointer_and_rollback(sessions: Any, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "adapters", sessions)
    pointer = ActiveAdapter(reg.dir)
    a1 = reg.register(_fake_adapter(tmp_path / "s1"), status="active", reason="ok", metrics={}, fingerprint="f", config={})
    assert a1.version == 1 and pointer() == ("v1", reg.dir / "v1") and (reg.dir / "v1" / "doppel.json").is_file()
    reg.register(_fake_adapter(tmp_path / "s2"), status="rejected", reason="worse", metrics={}, fingerprint="f", config={})
    assert reg.active_version() == 1
    reg.register(_fake_adapter(tmp_path / "s3"), status="active", reason="ok", metrics={}, fingerprint="f", config={})
    assert reg.active_version() == 3
    assert [(r.version, r.status) for r in reg.list()] == [(1, "retired"), (2, "rejected"), (3, "active")]
    assert reg.rollback().version == 1  # the rejected v2 never served
    assert reg.rollback() is None and pointer() is None  # then the base model
    with pytest.raises(NotFoundError):
        reg.rollback()
    with pytest.raises(NotFoundError):
        reg.activate(9)


# --- the pipeline, on a tiny model ---
def _dataset(path: Path, tokenizer: Any, n: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(n):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Sam: question {i}?"}], tokenize=False,
                                                   add_generation_prompt=True)
            fh.write(json.dumps({"prompt": prompt, "completion": f"answer number {i}<|im_end|>\n",
                                 "split": "validation" if i >= n - 2 else "train"}) + "\n")
    path.with_suffix(".meta.json").write_text(json.dumps({"fingerprint": "abc123"}))
    return path


@pytest.fixture
def deps(sessions: Any, tokenizer: Any, tiny_model: Any, tmp_path: Path) -> TrainingDeps:
    notes: list[str] = []
    d = TrainingDeps(sessions=sessions, registry=Registry(tmp_path / "adapters", sessions), tokenizer=tokenizer,
                     load_base=lambda: copy.deepcopy(tiny_model), dataset_path=_dataset(tmp_path / "ds" / "samples.jsonl", tokenizer),
                     lock_path=tmp_path / "train.lock", notify=notes.append)
    d.notes = notes  # type: ignore[attr-defined]
    return d


FAST = dict(max_steps=3, batch_size=2, gradient_accumulation=1, learning_rate=5e-3, save_steps=1, loss_tolerance=0.5)


def test_train_registers_and_activates(deps: TrainingDeps, sessions: Any) -> None:
    result = run_training(deps, "train", TrainConfig(**FAST))
    assert result.status == "succeeded" and result.adapter_version == 1
    assert deps.registry.active_version() == 1
    saved = json.loads((deps.registry.dir / "v1" / "doppel.json").read_text())
    assert saved["config"]["rank"] == 16 and saved["dataset_fingerprint"] == "abc123"
    assert saved["metrics"]["steps"] == 3 and saved["metrics"]["candidate"]["heldout_loss"] > 0
    with sessions() as s:
        run = s.query(TrainingRun).one()
        assert run.status == "succeeded" and run.adapter_id is not None and run.metrics["examples"] == 10
    assert "now active" in deps.notes[-1]  # type: ignore[attr-defined]
    assert not list((deps.registry.dir / ".staging").glob("*"))


def test_a_first_training_learns_each_reply_from_the_covering_samples(deps: TrainingDeps, tokenizer: Any) -> None:
    """Each sample's prompt holds the reply before it (learned there too): the covering samples are
    every other one, newest first; ``history_samples`` all trains on every sample."""
    rows = []
    for i in range(6):
        messages = [{"role": "user", "content": "Sam: hi"}]
        if i:
            messages += [{"role": "assistant", "content": f"answer number {i - 1}"}, {"role": "user", "content": "Sam: and?"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        earlier = f"answer number {i - 1}<|im_end|>\n"
        at = prompt.find(earlier)
        rows.append({"prompt": prompt, "completion": f"answer number {i}<|im_end|>\n", "split": "train", "chat_id": 1,
                     "at": f"2024-01-01T09:0{i}:00+00:00", "targets": [[at, at + len(earlier)]] if i else []})
    rows += [{"prompt": "Sam: later?", "completion": "yes<|im_end|>\n", "split": "validation"}] * 2
    deps.dataset_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = run_training(deps, "train", TrainConfig(**{**FAST, "max_steps": 1}))
    every = run_training(deps, "train", TrainConfig(**{**FAST, "max_steps": 1, "history_samples": "all"}))
    assert first.metrics["examples"] == 3 and every.metrics["examples"] == 6


def test_an_accepted_adapter_is_prepared_for_serving_before_it_goes_live(deps: TrainingDeps) -> None:
    from agent.llamacpp import export_path

    seen: list[tuple[Any, Path, int | None, Path]] = []

    def prepare(candidate: Any, adapter_dir: Path) -> None:
        # the llama.cpp export is keyed by the adapter's files: the folder the registry keeps must match
        seen.append((candidate, adapter_dir, deps.registry.active_version(), export_path(Path("c"), adapter_dir, "q8_0")))

    deps.prepare_serving = prepare
    result = run_training(deps, "train", TrainConfig(**FAST))
    assert result.status == "succeeded" and len(seen) == 1
    candidate, folder, active_then, key = seen[0]
    assert active_then is None  # called before the adapter became active
    assert hasattr(candidate, "peft_config") and folder.name == "adapter"
    assert export_path(Path("c"), deps.registry.dir / "v1", "q8_0") == key

    def broken(candidate: Any, adapter_dir: Path) -> None:
        raise OSError("disk full")

    deps.prepare_serving = broken  # serving would export it itself: the run still succeeds
    again = run_training(deps, "train", TrainConfig(**FAST))
    assert again.status == "succeeded" and deps.registry.active_version() == 2


def _sharp(model: Any) -> Any:
    """A copy of the tiny model whose output head is not near-uniform: with the random init's small
    head every hidden state gives a loss of about ln(vocab), so no adapter could make it worse."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(100)
    return sharp


def test_a_rejected_adapter_does_not_serve(deps: TrainingDeps, tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    deps.load_base = lambda: _sharp(tiny_model)
    first = run_training(deps, "train", TrainConfig(**{**FAST, "gradient_checkpointing": True}))
    assert first.status == "succeeded" and first.metrics["steps"] == 3
    from safetensors.torch import load_file, save_file

    from trainer import pipeline

    def train_garbage(*args: Any, **kwargs: Any) -> Any:  # an adapter whose updates are noise, scaled up
        metrics = train_lora(*args, **kwargs)
        path = args[5] / "adapter_model.safetensors"
        torch.manual_seed(0)
        save_file({k: torch.randn_like(v) * 50 if "lora_B" in k else v for k, v in load_file(path).items()}, path)
        return metrics

    monkeypatch.setattr(pipeline, "train_lora", train_garbage)
    prepared: list[Path] = []
    deps.prepare_serving = lambda candidate, folder: prepared.append(folder)
    result = run_training(deps, "train", TrainConfig(**{**FAST, "loss_tolerance": 0.0}))
    assert result.status == "rejected" and deps.registry.active_version() == 1
    assert not prepared  # nothing is exported for an adapter that will not serve
    assert "keeps serving" in result.message


def test_crash_leaves_the_active_adapter_and_resumes(deps: TrainingDeps, sessions: Any) -> None:
    run_training(deps, "train", TrainConfig(**FAST))

    def crash(step: int, total: int, loss: Any) -> None:
        if step >= 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        run_training(deps, "train", TrainConfig(**{**FAST, "max_steps": 4}), progress=crash)
    with sessions() as s:
        runs = s.query(TrainingRun).order_by(TrainingRun.id).all()
        assert runs[-1].status == "failed" and "power cut" in runs[-1].error
        assert s.query(Adapter).count() == 1
    assert deps.registry.active_version() == 1
    assert "failed" in deps.notes[-1]  # type: ignore[attr-defined]
    again = run_training(deps, "train", TrainConfig(**{**FAST, "max_steps": 4}))
    assert again.metrics["resumed"] is True and again.metrics["steps"] == 4


def test_evaluation_figures_are_computed_once_per_model(deps: TrainingDeps, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import pipeline
    from trainer.evaluate import EvalConfig
    from trainer.examples import read_dataset

    result = run_training(deps, "train", TrainConfig(**FAST))
    assert result.metrics["evaluation_seconds"] >= 0

    def boom(*a: Any, **kw: Any) -> Any:
        raise AssertionError("computed again")

    monkeypatch.setattr(pipeline, "evaluate_model", boom)
    cfg = EvalConfig(examples=TrainConfig().eval_examples, fact_questions=TrainConfig().eval_fact_questions)
    ev = pipeline.make_eval_set(deps, read_dataset(deps.dataset_path, "validation"), cfg)
    for adapter, side in ((deps.registry.active_path(), "candidate"), (None, "current")):
        got = pipeline._evaluate(deps, adapter, ev, cfg, [], [], True, use_cache=True)
        assert got["heldout_loss"] == result.metrics[side]["heldout_loss"]


def test_single_flight_and_nightly_threshold(deps: TrainingDeps, sessions: Any) -> None:
    with single_flight(deps.lock_path):
        with pytest.raises(BusyError, match="already going"):
            run_training(deps, "train", TrainConfig(**FAST))
        # the nightly job does nothing rather than fail
        with sessions.begin() as s:
            s.add(Rating(reply_id=_reply(sessions, "x"), rater_id="bob", value=1))
        assert nightly(deps, TrainConfig(**FAST), min_new_ratings=1).status == "skipped"
    assert nightly(deps, TrainConfig(**FAST), min_new_ratings=5).status == "skipped"
    run_training(deps, "train", TrainConfig(**FAST))
    result = nightly(deps, TrainConfig(**FAST), min_new_ratings=1)
    assert result.status in ("succeeded", "rejected") and result.metrics["ratings_used"] == 1
    assert nightly(deps, TrainConfig(**FAST), min_new_ratings=1).status == "skipped"  # nothing new since


def test_scheduler_job_lives_in_the_database(engine: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sqlalchemy import text

    from doppel.context import AppContext
    from doppel.migrate import drift
    from doppel.scheduler import start_scheduler

    monkeypatch.setenv("DOPPEL_DATABASE_URL", str(engine.url))
    monkeypatch.setenv("DOPPEL_RETRAIN_HOUR", "4")
    monkeypatch.setenv("DOPPEL_RETRAIN_TIMEZONE", "Europe/Prague")
    c = AppContext.load()
    sched = start_scheduler(c)
    try:
        job = sched.get_job("nightly-retrain")
        assert job.next_run_time.hour == 4 and str(job.next_run_time.tzinfo) == "Europe/Prague"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM apscheduler_jobs")).scalars().all() == ["nightly-retrain"]
    finally:
        sched.shutdown(wait=False)
    assert drift(engine) == []


# --- the proof, on the real packaged model ---
@pytest.mark.slow
def test_feedback_loop_end_to_end(shared_models: Path, corpus: Path) -> None:
    """ingest -> dataset -> train -> the adapter serves -> 👍 one reply, 👎 another -> retrain ->
    under their prompts the liked reply's log-probability rose and the disliked one's fell."""
    from doppel.context import AppContext
    from doppel.train_cmd import training_deps
    from trainer.evaluate import mean_logprob

    env = {"DOPPEL_PERSONA_NAME": "Alex", "DOPPEL_TEMPERATURE": "0", "DOPPEL_MAX_NEW_TOKENS": "16"}
    for args in (("db", "upgrade"), ("ingest", str(REPO / "doppel" / "samples" / "telegram_export.json")),
                 ("dataset", "build")):
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr
    trained = run_cli("train", "--set", "max_steps=3", "--set", "batch_size=4", "--set", "loss_tolerance=0.5", env=env)
    assert trained.returncode == 0, trained.stderr + trained.stdout
    assert "adapter v1 is now active" in trained.stdout
    # no terminal: progress comes as log lines, then the evaluation says it started
    assert "training: step 3/3, loss" in trained.stdout and "training: evaluating the new adapter" in trained.stdout
    c = AppContext.load(persona_name="Alex")
    if c.use_llama_cpp():  # the trainer exported it for llama.cpp, so no reply waits for that
        from agent.llamacpp import export_path
        from agent.models import cache_dir_for

        gguf = cache_dir_for(c.settings.base_model, c.settings.data_dir) / "gguf"
        assert export_path(gguf, c.settings.adapters_dir / "v1", c.settings.llama_cpp_weights).is_file()
    replies = [json.loads(run_cli("reply", q, "--json", "--chat", f"c{i}", env=env).stdout)
               for i, q in enumerate(["are you coming climbing tonight?", "what are you reading?"])]
    assert all(r["adapter_version"] == "v1" for r in replies)

    agent_sessions = c.sessions
    with agent_sessions.begin() as s:
        liked, disliked = (s.get(Reply, r["reply_id"]) for r in replies)
        store.rate(s, liked, "sam", 1)
        store.rate(s, disliked, "sam", -1)
        examples = [Example(x.prompt, x.text + "<|im_end|>\n") for x in (liked, disliked)]
    deps = training_deps(c)
    from peft import PeftModel

    def logprobs(version: str) -> list[float]:
        model = PeftModel.from_pretrained(deps.load_base(), str(c.settings.adapters_dir / version))
        return mean_logprob(model, deps.tokenizer, examples)

    before = logprobs("v1")
    retrained = run_cli("retrain", "--now", "--set", "max_steps=4", "--set", "batch_size=4", "--set", "learning_rate=1e-3",
                        "--set", "replay_ratio=1.0", "--set", "loss_tolerance=0.5", env=env)
    assert retrained.returncode == 0, retrained.stderr + retrained.stdout
    assert "adapter v2 is now active" in retrained.stdout
    after = logprobs("v2")
    assert after[0] > before[0], (before, after)  # the liked reply became more likely
    assert after[1] < before[1], (before, after)  # the disliked one less
    runs = json.loads(run_cli("runs", "list", "--json").stdout)
    assert runs[0]["kind"] == "retrain" and runs[0]["ratings"] == 2 and runs[0]["status"] == "succeeded"
    ev = run_cli("eval", "--json", "--facts", "2", "--replies", "3", env=env)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    for side in ("base", "adapter"):  # the twin's replies next to the owner's real ones
        assert report[side]["replies"]["count"] == 2 and report[side]["replies"]["owner_length"]["median"] > 0
    # and the length of the owner's replies the twin learnt from (the training split, drills left out)
    with (AppContext.load().settings.data_dir / "dataset" / "samples.jsonl").open(encoding="utf-8") as fh:
        samples = [json.loads(line) for line in fh]
    lengths = sorted(len(r["reply"]) for r in samples if r["split"] == "train" and not r.get("drill"))
    assert lengths and report["owner_history_length"]["median"] == lengths[int(round(0.5 * (len(lengths) - 1)))]
    # each adapter keeps the median length of the owner's replies it learnt from: serving measures a
    # conversation's length against it (agent.prompt.length_bias)
    import statistics

    owner = [len(r["reply"]) for r in samples if r["split"] == "train" and not r.get("drill") and r.get("owner", True)]
    meta = json.loads((AppContext.load().settings.adapters_dir / "v2" / "doppel.json").read_text(encoding="utf-8"))
    assert meta["metrics"]["owner_reply_chars"] == statistics.median(owner) > 0
    assert report["adapter_version"] == "v2" and report["base"]["heldout_loss"] > 0
    assert report["adapter"]["heldout_loss"] > 0 and report["liked"] == 1 and report["disliked"] == 1
    # the adapter learned the ratings: its margin beats the base model's
    assert report["adapter"]["rating_margin"] > report["base"]["rating_margin"]


REPO = Path(__file__).resolve().parents[1]


def test_the_learning_rate_decays_with_the_steps_or_the_time_budget_whichever_ends_first() -> None:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from trainer.lora import budget_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    linear = get_linear_schedule_with_warmup(opt, 5, 100).lr_lambdas[0]
    on_time = budget_lr(5, 100, lambda: 0.0)
    assert [on_time(s) for s in range(0, 101, 5)] == pytest.approx([linear(s) for s in range(0, 101, 5)])
    late = budget_lr(5, 100, lambda: 0.75)  # three quarters of the time gone after a fifth of the steps
    assert late(2) == pytest.approx(0.4)  # warm-up goes by the steps
    assert late(24) == pytest.approx(0.25) and late(90) == pytest.approx(on_time(90))
    assert budget_lr(5, 100, lambda: 1.2)(50) == 0.0


def test_a_run_the_time_budget_ends_ends_with_its_learning_rate_decayed(tokenizer: Any, tiny_model: Any,
                                                                       tmp_path: Path) -> None:
    """The plan fills the budget; where the steps run slower than it timed them (here each step
    waits 0.4 s), the budget ends the run, and the learning rate has decayed with the time."""
    from trainer.lora import train_lora

    examples = [Example(f"<|im_start|>user\nSam: question {i}<|im_end|>\n<|im_start|>assistant\n",
                        f"answer {i}<|im_end|>\n") for i in range(200)]
    cfg = TrainConfig(max_minutes=0.05, batch_size=2, gradient_accumulation=1, learning_rate=1e-3, save_steps=1000)
    metrics = train_lora(copy.deepcopy(tiny_model), tokenizer, examples, cfg, tmp_path / "work", tmp_path / "out",
                         progress=lambda step, total, loss: time.sleep(0.4))
    assert metrics["stopped_by_time_budget"] and 3 <= metrics["steps"] < metrics["planned_examples"] / 2
    assert metrics["last_learning_rate"] < 0.3e-3  # by the steps alone it would be near the peak


def test_logged_loss_is_the_mean_loss_whatever_the_accumulation(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    """With gradient accumulation the step's loss (and its gradient) is the mean over the micro-
    batches, not their sum: a learning rate means the same at any accumulation."""
    from trainer.evaluate import heldout_loss
    from trainer.lora import train_lora

    model = _sharp(tiny_model)
    examples = [Example(f"<|im_start|>user\nSam: question {i}<|im_end|>\n<|im_start|>assistant\n",
                        "a reply of a few words<|im_end|>\n") for i in range(8)]
    expected = heldout_loss(model, tokenizer, examples)
    cfg = TrainConfig(max_steps=2, batch_size=2, gradient_accumulation=2, learning_rate=0.0, max_minutes=0,
                      warmup_ratio=0.0, save_steps=100)
    metrics = train_lora(model, tokenizer, examples, cfg, tmp_path / "work", tmp_path / "out")
    logged = [loss for _, loss in metrics["loss_curve"]]
    assert len(logged) == 2
    assert all(abs(loss - expected) / expected < 0.1 for loss in logged), (logged, expected)


@pytest.mark.parametrize("average", ["token", "example"])
def test_a_batch_over_the_token_cap_runs_in_parts_with_the_same_loss_and_gradient(tokenizer: Any, tiny_model: Any,
                                                                                    tmp_path: Path, average: str,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_batch_tokens``: a long batch is split into parts of a few rows (their padding trimmed),
    each part's mean loss weighted by its share of the learned tokens (or of the rows): the step
    logs the whole batch's loss and the optimizer gets the whole batch's gradient, while no forward
    pass is wider than the cap."""
    import trainer.lora as lora

    examples = [Example(f"<|im_start|>user\nSam: {'so, tell me more ' * (1 + 3 * i)}?<|im_end|>\n<|im_start|>assistant\n",
                        f"reply number {i} with {'many ' * i}words<|im_end|>\n") for i in range(3)]
    seen: list[tuple[int, ...]] = []
    grads: list[list[torch.Tensor]] = []
    real_logprobs, real_step = lora.labelled_logprobs, torch.optim.AdamW.step

    def spy(model: Any, input_ids: Any, *args: Any) -> Any:
        seen.append(tuple(input_ids.shape))
        return real_logprobs(model, input_ids, *args)

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:  # the gradient the optimizer is handed
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(lora, "labelled_logprobs", spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    runs = {}
    for cap in (0, 60):
        seen.clear()
        grads.clear()
        cfg = TrainConfig(max_steps=2, batch_size=3, gradient_accumulation=1, learning_rate=1e-3, max_minutes=0,
                          warmup_ratio=0.0, save_steps=100, dropout=0.0, max_batch_tokens=cap, context_targets=False,
                          loss_average=average)
        torch.manual_seed(0)  # the LoRA layers' initial weights
        metrics = train_lora(copy.deepcopy(tiny_model), tokenizer, examples, cfg, tmp_path / f"w{cap}", tmp_path / f"o{cap}")
        runs[cap] = ([loss for _, loss in metrics["loss_curve"]], list(grads), list(seen))
    whole, parts = runs[0], runs[60]
    assert all(rows == 3 for rows, _ in whole[2]) and max(r * w for r, w in whole[2]) > 60
    assert len(parts[2]) > len(whole[2]) and all(r * w <= 60 or r == 1 for r, w in parts[2]), parts[2]
    assert any(w < max(ww for _, ww in parts[2]) for _, w in parts[2])  # a shorter part lost its padding
    assert parts[0][0] == pytest.approx(whole[0][0], rel=1e-5)  # the first step: the same weights, the same loss
    assert parts[0][1] == pytest.approx(whole[0][1], rel=1e-3)
    first_whole, first_parts = whole[1][0], parts[1][0]
    assert len(first_whole) == len(first_parts) and any(g.abs().sum() > 0 for g in first_whole)
    for a, b in zip(first_whole, first_parts):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), ((a - b).abs().max().item(), a.abs().max().item())


def test_a_run_weighs_history_tokens_alike_and_each_drill_as_an_average_example(tokenizer: Any, tiny_model: Any,
                                                                              tmp_path: Path) -> None:
    """``loss_average`` token: a run divides every batch's summed loss by the same count (the mean
    learned tokens of a batch over the run), so a token weighs alike in a long batch and a short
    one; a drill's few tokens are weighted up to what an average example weighs. The loss the run
    logs is the batch's weighted mean per learned token."""
    import trainer.lora as lora

    history = Example("<|im_start|>user\nSam: so how was the trip, tell me everything?<|im_end|>\n<|im_start|>assistant\n",
                      "it was long and wet and we got lost twice but the food made up for all of it<|im_end|>\n")
    drill = Example("<|im_start|>user\nSam: where do you live?<|im_end|>\n<|im_start|>assistant\n", "Prague<|im_end|>\n",
                    source="drill")
    rows = []
    for ex in (history, drill):
        e = encode(tokenizer, ex)
        rows.append({"input_ids": e.input_ids, "labels": e.labels, "weight": 1.0, "source": ex.source})
    n_hist, n_drill = (lora._learned(r["labels"]) for r in rows)
    assert n_hist > 3 * n_drill
    norm = lora._token_weights(rows, TrainConfig(batch_size=2))
    mean = (n_hist + n_drill) / 2
    assert norm == pytest.approx(2 * mean)
    assert rows[0]["weight"] == 1.0 and rows[1]["weight"] == pytest.approx(mean / n_drill)

    model = copy.deepcopy(tiny_model)
    batch = lora.collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, where = lora.labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    w = batch["weights"][where]
    expected = float(-(w * logp).sum() / w.sum())  # sum over rows of weight x learned tokens
    cfg = TrainConfig(max_steps=1, batch_size=2, gradient_accumulation=1, learning_rate=1e-3, max_minutes=0,
                      warmup_ratio=0.0, save_steps=100, dropout=0.0, context_targets=False, loss_average="token")
    metrics = train_lora(model, tokenizer, [history, drill], cfg, tmp_path / "w", tmp_path / "o")
    assert metrics["loss_curve"][0][1] == pytest.approx(expected, rel=1e-4)  # LoRA starts as the identity


def test_replies_to_conversations_are_sampled_as_served_and_repeat(tiny_model: Any, tokenizer: Any) -> None:
    """With the serving settings, the voice figures come from replies sampled as people get them
    (not greedy), each conversation seeded by its prompt: the same figures twice; the questions
    about facts stay greedy."""
    from agent.runtime import GenerationConfig, ModelRuntime
    from trainer.evaluate import EvalSet, Probe, evaluate_model

    rt = ModelRuntime(tiny_model, tokenizer)
    contexts = [Probe(f"<|im_start|>user\nSam: message {i}<|im_end|>\n<|im_start|>assistant\n", reference="ok then")
                for i in range(3)]
    facts = [Probe("<|im_start|>user\nSam: do you eat meat?<|im_end|>\n<|im_start|>assistant\n", fact="I am vegetarian")]
    served = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, min_new_tokens=6)

    def run(sampling: Any) -> dict[str, Any]:
        return evaluate_model(None, tokenizer, EvalSet(facts=facts, contexts=contexts), runtime=rt,
                              reply_sampling=sampling, max_new_tokens=6)

    torch.manual_seed(123)
    first = run(served)
    torch.manual_seed(456)  # whatever the state before, each conversation's draw is its own
    again = run(served)
    greedy = run(None)
    assert first["replies"]["all"] == again["replies"]["all"]
    assert first["replies"]["all"] != greedy["replies"]["all"]
    assert first["fact_use"]["answers"][0]["answer"] == greedy["fact_use"]["answers"][0]["answer"]


def test_replies_to_conversations_follow_the_owners_earlier_turns_as_served(tokenizer: Any) -> None:
    """The voice figures' replies get the stop bias serving would give them (the owner's earlier
    turns in the context against the adapter's typical length); questions about facts get none."""
    from agent.prompt import length_bias
    from agent.runtime import GenerationConfig
    from tests.helpers import ScriptedRuntime
    from trainer.evaluate import EvalSet, Probe, evaluate_model

    ctx = "<|im_start|>user\nSam: message<|im_end|>\n<|im_start|>assistant\n"
    contexts = [Probe(ctx, reference="ok", own=("x" * 240,)), Probe(ctx, reference="ok", own=()),
                Probe(ctx, reference="ok", own=("no", "ok"))]
    facts = [Probe(ctx, fact="I am vegetarian")]
    rt = ScriptedRuntime(tokenizer)
    evaluate_model(None, tokenizer, EvalSet(facts=facts, contexts=contexts), runtime=rt,
                   reply_sampling=GenerationConfig(), reply_chars=60.0)
    biases = [c.stop_bias for c in rt.configs]
    assert biases == [0.0, pytest.approx(length_bias(("x" * 240,), 60.0)), 0.0, pytest.approx(length_bias(("no", "ok"), 60.0))]
    assert biases[1] < 0 < biases[3]
    rt = ScriptedRuntime(tokenizer)  # the base model: no typical length, no bias
    evaluate_model(None, tokenizer, EvalSet(contexts=contexts), runtime=rt, reply_sampling=GenerationConfig())
    assert [c.stop_bias for c in rt.configs] == [0.0, 0.0, 0.0]


def test_the_layers_no_adapter_changes_run_once_for_every_model(tokenizer: Any, tmp_path: Path) -> None:
    """The held-out loss from the lower layers' kept states and each model's upper layers equals the
    whole stack's, for the base model and for an adapter on the upper layers; the lower layers run
    once (a second model, or a second process through the file, reuses them); an adapter on every
    layer gets no split."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.evaluate import LowerStates, first_adapted_layer, heldout_loss
    from trainer.examples import Example
    from trainer.lora import adapted_layers

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    base = LlamaForCausalLM(cfg).eval()
    examples = [Example(f"<|im_start|>user\nSam: {'how was it ' * (i + 1)}?<|im_end|>\n<|im_start|>assistant\n",
                        f"fine {'really ' * (3 * i % 5)}thanks<|im_end|>\n") for i in range(11)]
    lower_runs = []
    hook = base.model.layers[0].register_forward_hook(lambda *a: lower_runs.append(1))
    whole = heldout_loss(base, tokenizer, examples)
    assert adapted_layers(4, 0.5) == [2, 3] and first_adapted_layer(None, 4, 0.5) == 2
    lower = LowerStates(2, tmp_path)
    lower_runs.clear()
    split = heldout_loss(base, tokenizer, examples, lower=lower)
    assert split == pytest.approx(whole, abs=1e-5) and len(lower_runs) == 2  # 11 examples, batches of 8
    assert len(list(tmp_path.glob("lower-*.pt"))) == 1

    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3],
                                            init_lora_weights=False)).eval()
    adapter_dir = tmp_path / "adapter"
    tuned.save_pretrained(adapter_dir)
    assert first_adapted_layer(adapter_dir, 4, 0.5) == 2
    merged = tuned.merge_and_unload()
    lower_runs.clear()
    tuned_whole = heldout_loss(merged, tokenizer, examples)
    assert len(lower_runs) == 2
    lower_runs.clear()
    tuned_split = heldout_loss(merged, tokenizer, examples, lower=LowerStates(2, tmp_path))
    hook.remove()
    assert lower_runs == []  # read from the file
    assert tuned_split == pytest.approx(tuned_whole, abs=1e-5) and abs(tuned_whole - whole) > 1e-3

    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    conf["layers_to_transform"] = None
    (adapter_dir / "adapter_config.json").write_text(json.dumps(conf))
    assert first_adapted_layer(adapter_dir, 4, 0.5) == 0


def test_the_lower_layers_split_keeps_gemmas_sliding_and_full_attention_in_place(tokenizer: Any) -> None:
    """Gemma 3 picks each layer's attention (sliding window or full) by its place in the stack:
    the upper layers run from the kept states must keep theirs, or the loss differs."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from trainer.evaluate import LowerStates, heldout_loss
    from trainer.examples import Example

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                           pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForCausalLM(cfg).eval()
    examples = [Example(f"<|im_start|>user\nSam: {'so what happened next ' * (i + 2)}?<|im_end|>\n<|im_start|>assistant\n",
                        f"well {'it rained ' * (i + 1)}<|im_end|>\n") for i in range(5)]
    whole = heldout_loss(model, tokenizer, examples)
    assert heldout_loss(model, tokenizer, examples, lower=LowerStates(2)) == pytest.approx(whole, abs=1e-5)
    assert cfg.layer_types[2] == "full_attention" and len(model.model.layers) == 4


def test_a_run_retrieves_facts_only_for_the_examples_its_budget_chose(tokenizer: Any, tiny_model: Any, tmp_path: Path) -> None:
    """History samples come with their facts still to retrieve: the run asks for them once, for the
    examples it trains on (not for the whole history), and trains on the prompts with the facts."""
    from trainer.examples import Pending
    from trainer.lora import train_lora

    def sample(i: int) -> Example:
        turns = (Turn("Sam", f"question {i}?"),)
        prompt = render_prompt(tokenizer, Persona("Alex"), [], turns).text
        return Example(prompt, "a reply of a few words<|im_end|>\n", pending=Pending((f"question {i}?", ()), turns))

    examples = [sample(i) for i in range(40)]
    asked: list[list[Example]] = []
    trained: list[str] = []

    def give(chosen: list[Example]) -> list[Example]:
        asked.append(chosen)
        out = []
        for e in chosen:
            assert e.pending is not None
            prompt = render_prompt(tokenizer, Persona("Alex"), ["I am vegetarian."], e.pending.turns).text
            trained.append(prompt)
            out.append(Example(prompt, e.completion))
        return out

    cfg = TrainConfig(max_minutes=1e-6, batch_size=2, gradient_accumulation=2, learning_rate=0.0, save_steps=100)
    metrics = train_lora(copy.deepcopy(tiny_model), tokenizer, examples, cfg, tmp_path / "work", tmp_path / "out",
                         with_facts=give)
    assert len(asked) == 1 and len(asked[0]) == metrics["examples"] == 4 < len(examples)  # the budget's choice only
    assert metrics["examples_given_facts"] == 4 and all("I am vegetarian." in p for p in trained)
    assert metrics["tokens"] == sum(len(tokenizer.encode(p + "a reply of a few words<|im_end|>\n", add_special_tokens=False))
                                    for p in trained)


def test_facts_given_where_used_render_what_the_whole_history_would(tokenizer: Any) -> None:
    """A sample keeps the turns its prompt starts from (the newest uncut); with the facts, they render
    the prompt the full turn list renders, also where the newest message must be cut to fit."""
    from trainer.examples import Pending, with_facts

    limits = PromptLimits(max_length=200, reserve_for_reply=16, max_context_tokens=60)
    turns = [Turn("Sam", "an old message " * 6), Turn("Alex", "ok", True), Turn("Sam", "do you eat meat? " + "really " * 120)]
    facts = ["I am vegetarian; I don't eat meat.", "I live in Prague."]
    bare = render_prompt(tokenizer, Persona("Alex"), [], turns, limits)
    whole = render_prompt(tokenizer, Persona("Alex"), facts, turns, limits)
    kept = tuple(turns[len(turns) - len(bare.turns):])
    assert whole.truncated_newest  # the newest message is cut to make room for the facts
    e = Example(bare.text, "no<|im_end|>\n", pending=Pending((turns[-1].text, ()), kept))
    got = with_facts([e, Example("drill prompt", "x")], tokenizer, Persona("Alex"), limits,
                     lambda qs: [[("veg", facts[0]), ("home", facts[1])] for _ in qs])
    assert got[0].prompt == whole.text and got[0].pending is None and got[1].prompt == "drill prompt"
    nothing = with_facts([e], tokenizer, Persona("Alex"), limits, lambda qs: [[] for _ in qs])
    assert nothing[0].prompt == bare.text and nothing[0].pending is None


def test_samples_read_are_places_in_the_file_and_a_changed_file_is_a_clear_error(tokenizer: Any, tmp_path: Path) -> None:
    """Reading the training set keeps where each history sample is, not its turns; its facts read
    the line again, and a file rebuilt in between is said, not trained on."""
    from common.errors import InputError
    from trainer.examples import InFile, read_dataset, with_facts

    turns = [Turn("Sam", "do you eat meat?")]
    prompt = render_prompt(tokenizer, Persona("Alex"), [], turns).text
    row = {"prompt": prompt, "completion": "no<|im_end|>\n", "split": "train", "owner": True, "speaker": "Alex",
           "query": ["do you eat meat?", []], "turns": [["Sam", "do you eat meat?", False, False]]}
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({**row, "query": None}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    plain, sample = read_dataset(path, "train")
    assert plain.pending is None and isinstance(sample.pending, InFile)
    retrieve = lambda qs: [[("veg", "I am vegetarian.")] if q == "do you eat meat?" else [] for q, _ in qs]  # noqa: E731
    [given] = with_facts([sample], tokenizer, Persona("Alex"), PromptLimits(), retrieve)
    assert given.prompt == render_prompt(tokenizer, Persona("Alex"), ["I am vegetarian."], turns).text
    path.write_text(json.dumps({**row, "prompt": prompt + " "}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="changed while this run was reading it"):
        with_facts([sample], tokenizer, Persona("Alex"), PromptLimits(), retrieve)


def test_training_settings_from_the_command_line_are_checked_before_a_run() -> None:
    """`--set KEY=VALUE`: a wrong key, type or choice is a message naming the setting, not a crash
    half-way through a run; a right one reaches the config."""
    from types import SimpleNamespace

    from common.errors import ConfigError
    from doppel.train_cmd import train_config

    c = SimpleNamespace(settings=SimpleNamespace(train_overrides={"rank": 8}))
    cfg = train_config(c, ["loss_average=example", "max_steps=7"])
    assert (cfg.loss_average, cfg.max_steps, cfg.rank) == ("example", 7, 8)
    assert train_config(c).loss_average == "example"
    for bad, said in ((["loss_average=tokens"], "loss_average"), (["history_samples=some"], "history_samples"),
                      (["max_steps=many"], "max_steps"), (["nope=1"], "nope")):
        with pytest.raises(ConfigError, match=said):
            train_config(c, bad)
