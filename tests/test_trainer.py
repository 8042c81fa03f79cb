"""LoRA training, rating replay, evaluation gate, registry, the pipeline and the nightly job."""

from __future__ import annotations

import copy
import json
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
from trainer.examples import Example, mix_with_replay, rating_examples
from trainer.lora import encode, weighted_loss
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


def test_encode_masks_the_prompt_and_cuts_its_start(tokenizer: Any) -> None:
    ex = Example("word " * 300, "the reply<|im_end|>\n")
    e = encode(tokenizer, ex, 64)
    assert e is not None and len(e.input_ids) == 64
    completion = tokenizer.encode(ex.completion, add_special_tokens=False)
    assert e.input_ids[-len(completion):] == completion and e.labels[-len(completion):] == completion
    assert set(e.labels[: -len(completion)]) == {-100}


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


def test_states_fact() -> None:
    assert states_fact("yeah I live in Prague now", "I live in Prague.")
    assert not states_fact("no idea", "I live in Prague.")


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


def test_a_rejected_adapter_does_not_serve(deps: TrainingDeps, tiny_model: Any) -> None:
    deps.load_base = lambda: _sharp(tiny_model)
    first = run_training(deps, "train", TrainConfig(**{**FAST, "gradient_checkpointing": True}))
    assert first.status == "succeeded" and first.metrics["steps"] == 3
    bad = TrainConfig(**{**FAST, "learning_rate": 5.0, "loss_tolerance": 0.0})  # learns garbage
    prepared: list[Path] = []
    deps.prepare_serving = lambda candidate, folder: prepared.append(folder)
    result = run_training(deps, "train", bad)
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
    ev = run_cli("eval", "--json", "--facts", "2", env=env)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["adapter_version"] == "v2" and report["base"]["heldout_loss"] > 0
    assert report["adapter"]["heldout_loss"] > 0 and report["liked"] == 1 and report["disliked"] == 1
    # the adapter learned the ratings: its margin beats the base model's
    assert report["adapter"]["rating_margin"] > report["base"]["rating_margin"]


REPO = Path(__file__).resolve().parents[1]
