"""One training run, start to end: examples -> LoRA -> evaluation -> gate -> registry.

A run is single-flight (a file lock in the data directory, so also across processes), recorded in
``training_runs`` from the start, and leaves the active adapter untouched unless the gate accepts the
new one. A crash marks the run failed; its checkpoints stay in the staging folder, so running the
same kind of run again resumes from the last checkpoint.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from agent.prompt import Persona
from agent.runtime import FACT_BOOST, adapter_reply_chars
from common.errors import BusyError, DoppelError
from feedback.models import Rating, TrainingRun, utcnow
from trainer.config import TrainConfig
from trainer.evaluate import EvalConfig, EvalSet, LowerStates, evaluate_model, first_adapted_layer, gate, spread
from trainer.examples import Example, RatingSet, dataset_fingerprint, mix_with_replay, rating_examples, read_dataset
from trainer.lora import Progress, train_lora
from trainer.registry import Registry, version_name

log = logging.getLogger(__name__)

Notifier = Callable[[str], None]


@dataclass
class TrainingDeps:
    """What a run needs, built by the composition root."""

    sessions: sessionmaker[Session]
    registry: Registry
    tokenizer: Any
    load_base: Callable[[], Any]  # a fresh fp32 base model for training
    dataset_path: Path
    lock_path: Path
    persona: Persona = Persona()
    device: str = "cpu"
    fact_boost: float = FACT_BOOST  # the serving setting: the gate measures fact use as the twin answers
    notify: Notifier = field(default=lambda message: log.info("%s", message))
    # called with an accepted candidate (the base model with the new adapter loaded, unmerged) and
    # its folder before it becomes active, to get it ready for serving (the llama.cpp export)
    prepare_serving: Callable[[Any, Path], None] | None = None
    # builds what the gate evaluates on from the validation examples: the questions about facts,
    # with prompts built as the agent builds them (the composition root has the facts and retrieval)
    eval_set: Callable[[list[Example], EvalConfig], EvalSet] | None = None
    # the runtime that writes the evaluation's greedy answers for the base model with an adapter
    # (None: the base model alone): the serving backend, so the gate measures the replies that
    # will be sent, at llama.cpp's speed (the held-out loss stays on transformers); None here:
    # transformers, on the evaluated model. ``generation_backend`` names it in the eval cache.
    generation_runtime: Callable[[Path | None], Any] | None = None
    generation_backend: str = "transformers"
    # the history samples' facts, retrieved where they are used (``trainer.examples.with_facts``, bound
    # to the agent's retrieval and prompt settings; None: their prompts as read, without facts), and
    # what names those facts and that retrieval (a checkpoint trained with other facts is not resumed)
    with_facts: Callable[[list[Example]], list[Example]] | None = None
    facts_version: str = ""
    # the fact drills, made from the facts file as it is now, in the owner's style of the training set
    # it is given (``trainer.dataset.drill_examples``); None: the training set's own, if any
    drills: Callable[[list[Example]], list[Example]] | None = None


@dataclass
class RunResult:
    run_id: int
    status: str  # succeeded (active) | rejected | failed | skipped
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    adapter_version: int | None = None


@contextmanager
def single_flight(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError("A training run is already going.", hint="Wait for it; `doppel runs list` shows it.") from None
        yield
    finally:
        os.close(fd)


INTERRUPTED = "interrupted: the process died before the run finished"


def _mark_interrupted(session: Session) -> list[int]:
    """Runs left 'running' by a process that died (we hold the lock, so none is really running)."""
    ids = []
    for run in session.scalars(select(TrainingRun).where(TrainingRun.status == "running")):
        run.status = "failed"
        run.error = INTERRUPTED
        run.finished_at = utcnow()
        ids.append(run.id)
    return ids


def recover(registry: Registry, sessions: sessionmaker[Session], lock_path: Path) -> list[str]:
    """What a process killed in the middle of a run or a registry change left, repaired: runs left
    'running' by a dead process are marked failed (only when nobody holds the training lock, so a
    run going on elsewhere is never touched), and the registry is reconciled. Returns what was
    done, in words. The composition roots call it at start."""
    done: list[str] = []
    try:
        with single_flight(lock_path):
            with sessions.begin() as session:
                ids = _mark_interrupted(session)
            for run_id in ids:
                shutil.rmtree(registry.staging_dir(run_id), ignore_errors=True)
                done.append(f"training run {run_id} was left running by a process that died: marked failed")
    except BusyError:
        pass  # a run is going: its row is right
    for line in done:
        log.warning("%s", line)
    return done + registry.reconcile()


def last_run_started(session: Session, kind: str | None = None) -> datetime | None:
    q = select(func.max(TrainingRun.started_at)).where(TrainingRun.status.in_(("succeeded", "rejected")))
    if kind:
        q = q.where(TrainingRun.kind == kind)
    return session.scalar(q)


def new_ratings_since_last_retrain(session: Session) -> int:
    since = last_run_started(session, "retrain")
    q = select(func.count(Rating.id)).where(Rating.value != 0)
    if since is not None:
        q = q.where(Rating.updated_at > since)
    return int(session.scalar(q) or 0)


def _split_ratings(rs: RatingSet) -> tuple[list[Example], list[Example], list[Example], str]:
    """(training examples, held-out liked, held-out disliked, where the margin is measured). With
    ten or more ratings every fifth is held out; with fewer, the margin is measured on the trained
    ratings (it then says whether the run learned them, not whether it generalises)."""
    ratings = [e for e in rs.examples if e.source == "rating"]
    if len(ratings) >= 10:
        held = {id(e) for i, e in enumerate(ratings) if i % 5 == 4}
        train = [e for e in rs.examples if id(e) not in held]
        held_ex = [e for e in ratings if id(e) in held]
        where = "held-out ratings"
    else:
        train, held_ex, where = list(rs.examples), ratings, "trained ratings"
    liked = [e for e in held_ex if e.weight > 0]
    disliked = [e for e in held_ex if e.weight < 0]
    return train, liked, disliked, where


EVAL_METHOD = "5"  # bump when the figures below are computed differently (cached figures then expire)


def _eval_cache_key(part: EvalSet, adapter: Path | None, config: EvalConfig, backend: str = "transformers") -> str:
    import hashlib

    h = hashlib.sha256(f"{EVAL_METHOD}|{part.fingerprint()}|{config.max_new_tokens}|{config.fact_boost:g}".encode())
    if not part.validation:  # answers are generated: by which backend matters (the loss is transformers')
        h.update(f"|{backend}".encode())
    if part.contexts and config.reply_sampling is not None:
        sampling = {k: v for k, v in config.reply_sampling.as_dict().items() if not (k == "stop_bias" and not v)}
        h.update(f"|{sorted(sampling.items())}".encode())  # (a setting added at its neutral value keeps old figures)
        if adapter is not None and adapter_reply_chars(adapter) is not None:
            h.update(f"|reply_chars={adapter_reply_chars(adapter):g}".encode())
    if adapter is not None:
        for f in sorted(adapter.glob("adapter_model*")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def owner_reply_chars(examples: Sequence[Example], tokenizer: Any) -> float | None:
    """The median length in characters of the owner's replies among the history's samples: the
    length an adapter trained on them writes by itself."""
    import statistics

    from agent.prompt import reply_of

    lengths = [len(reply_of(tokenizer, e.completion)) for e in examples if e.source == "dataset" and e.owner]
    return float(statistics.median(lengths)) if lengths else None


def _evaluate(deps: TrainingDeps, adapter: Path | None, eval_set: EvalSet, config: EvalConfig, liked: list[Example],
              disliked: list[Example], bf16: bool, use_cache: bool) -> dict[str, Any]:
    """The figures of the base model with ``adapter`` (None: the base model alone). Each part (the
    held-out loss, fact use, small talk, the replies) is cached by the model and that part's data,
    so a figure is computed once per model: the gate's figures serve `doppel eval` too."""
    import json

    parts = {"loss": EvalSet(validation=eval_set.validation), "facts": EvalSet(facts=eval_set.facts),
             "smalltalk": EvalSet(smalltalk=eval_set.smalltalk), "contexts": EvalSet(contexts=eval_set.contexts)}
    metrics: dict[str, Any] = {}
    model = runtime = None
    backend = deps.generation_backend if deps.generation_runtime is not None else "transformers"
    try:
        for name, part in parts.items():
            if not (part.validation or part.facts or part.smalltalk or part.contexts):
                continue
            cache = deps.registry.dir / ".eval-cache" / f"{_eval_cache_key(part, adapter, config, backend)}.json"
            if use_cache and cache.is_file():
                log.info("%s figures of %s reused from the cache", name, adapter.name if adapter else "the base model")
                metrics.update(json.loads(cache.read_text(encoding="utf-8")))
                continue
            if name != "loss" and deps.generation_runtime is not None:  # answers on the serving backend
                if runtime is None:
                    runtime = deps.generation_runtime(adapter)
                on: tuple[Any, Any] = (None, runtime)
            else:  # the loss (and answers where transformers serves) on the evaluated model
                if model is None:
                    model = _eval_model(deps, adapter, bf16)
                on = (model, None)
            lower = None
            if name == "loss":  # the layers no adapter changes run once per validation set (LowerStates)
                n_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
                split = first_adapted_layer(adapter, n_layers, config.top_layers)
                lower = LowerStates(split, cache.parent) if split > 0 else None
            t0 = time.perf_counter()
            got = evaluate_model(on[0], deps.tokenizer, part, own_name=deps.persona.name, device=deps.device, bf16=bf16,
                                 max_new_tokens=config.max_new_tokens, fact_boost=config.fact_boost, runtime=on[1],
                                 reply_sampling=config.reply_sampling, lower=lower,
                                 reply_chars=adapter_reply_chars(adapter))
            log.info("%s figures of %s computed in %.1f s", name, adapter.name if adapter else "the base model",
                     time.perf_counter() - t0)
            if name != "loss":
                got = {k: v for k, v in got.items() if k not in ("heldout_loss", "perplexity", "validation_examples", "rating_margin")}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(got, default=str), encoding="utf-8")
            metrics.update(got)
    finally:
        close = getattr(runtime, "close", None)
        if close is not None:
            close()
    metrics.setdefault("heldout_loss", None)
    metrics.setdefault("perplexity", None)
    if liked and disliked:  # ratings change between runs: never cached
        from trainer.evaluate import rating_margin

        if model is None:
            model = _eval_model(deps, adapter, bf16)
        metrics["rating_margin"] = rating_margin(model, deps.tokenizer, liked, disliked)
    else:
        metrics["rating_margin"] = None
    return metrics


def _eval_model(deps: TrainingDeps, adapter: Path | None, bf16: bool) -> Any:
    """The base model with ``adapter`` merged in, in bf16 where the hardware computes it natively
    (held-out loss and greedy answers at 2-3x the fp32 speed; base and candidate alike)."""
    model = deps.load_base()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if bf16:
        import torch

        model = model.to(torch.bfloat16)
    return model.eval()


def make_eval_set(deps: TrainingDeps, validation: list[Example], config: EvalConfig) -> EvalSet:
    if deps.eval_set is not None:
        return deps.eval_set(validation, config)
    chosen = spread(validation, config.examples) if config.examples > 0 else list(validation)
    return EvalSet(validation=deps.with_facts(chosen) if deps.with_facts is not None else chosen)


def run_training(deps: TrainingDeps, kind: str, config: TrainConfig, progress: Progress | None = None,
                 phase: Callable[[str], None] | None = None) -> RunResult:
    """``kind``: "train" (a fresh adapter on the ingest dataset) or "retrain" (the active adapter
    continued on the ratings, mixed with a replay sample of the dataset)."""
    with single_flight(deps.lock_path):
        with deps.sessions.begin() as session:
            interrupted = _mark_interrupted(session)
        for old_id in interrupted:
            shutil.rmtree(deps.registry.staging_dir(old_id), ignore_errors=True)
        deps.registry.reconcile()
        with deps.sessions.begin() as session:
            run = TrainingRun(kind=kind, status="running", config=config.as_dict())
            session.add(run)
            session.flush()
            run_id = run.id
        try:
            result = _run(deps, run_id, kind, config, progress, phase or (lambda text: log.info("%s", text)))
        except BaseException as exc:
            message = exc.message if isinstance(exc, DoppelError) else f"{type(exc).__name__}: {exc}"
            with deps.sessions.begin() as session:
                run = session.get(TrainingRun, run_id)
                assert run is not None
                run.status, run.finished_at = "failed", utcnow()
                run.error = message if isinstance(exc, DoppelError) else traceback.format_exc(limit=8)
            deps.notify(f"Training run {run_id} ({kind}) failed: {message}. The active adapter is unchanged.")
            raise
        deps.notify(result.message)
        return result


def _run(deps: TrainingDeps, run_id: int, kind: str, config: TrainConfig, progress: Progress | None,
         phase: Callable[[str], None]) -> RunResult:
    tok = deps.tokenizer
    train_set = read_dataset(deps.dataset_path, "train")
    if deps.drills is not None:  # an older build's drills give way to the ones of today's facts
        history = [e for e in train_set if e.source != "drill"]
        drills = deps.drills(history)
        phase(f"{len(drills)} fact drills from the facts file")
        train_set = history + drills
    if config.history_samples == "covering" and config.context_targets:  # each reply learned about once
        kept = [e for e in train_set if not e.redundant]
        if len(kept) < len(train_set):
            n = sum(1 for e in train_set if e.source == "dataset")
            phase(f"{n - len(train_set) + len(kept)} of {n} history samples hold each of your replies once "
                  "(history_samples=covering)")
        train_set = kept
    validation = read_dataset(deps.dataset_path, "validation")
    fingerprint = dataset_fingerprint(deps.dataset_path)
    active_path = deps.registry.active_path()
    with deps.sessions() as session:
        rs = rating_examples(session, tok, balance=config.balance_classes)
    train_ratings, liked, disliked, margin_on = _split_ratings(rs)
    if kind == "retrain":
        if not rs.examples:
            raise DoppelError("There are no ratings or corrections to learn from yet.",
                              hint="Rate some replies (👍/👎) first.")
        examples = mix_with_replay(train_ratings, train_set, config.replay_ratio, config.seed)
        start = active_path
    else:
        examples, start = train_set, None
    if not examples:
        raise DoppelError("The training set is empty.", hint="Ingest your exports and run `doppel dataset build`.")

    staging = deps.registry.staging_dir(run_id)
    # a crashed run of the same kind left checkpoints: continue from them, if they were trained on
    # the same examples with the same settings; otherwise start fresh and say why
    work = deps.registry.dir / ".staging" / f"{kind}-checkpoints"
    fresh_because = _check_resume(work, _resume_key(fingerprint, config, start, deps.registry, examples,
                                                    deps.facts_version))
    if fresh_because:
        phase(f"starting fresh, not from the interrupted run's checkpoints: {fresh_because}")
        log.warning("training run %d starts fresh, not from the interrupted run's checkpoints: %s", run_id, fresh_because)
    out = staging / "adapter"
    staging.mkdir(parents=True, exist_ok=True)
    base = deps.load_base()
    train_metrics = train_lora(base, tok, examples, config, work, out, start_adapter=start, progress=progress,
                               device=deps.device, with_facts=deps.with_facts)
    if fresh_because:
        train_metrics["fresh_start"] = fresh_because

    from trainer.lora import _use_bf16

    # the current server (active adapter or the base model) against the candidate, on the same data
    eval_cfg = EvalConfig(examples=config.eval_examples, fact_questions=config.eval_fact_questions,
                          fact_boost=deps.fact_boost, top_layers=config.top_layers)
    t_eval = time.perf_counter()
    phase("evaluating the new adapter against the one serving now")
    eval_set = make_eval_set(deps, validation, eval_cfg)
    bf16 = _use_bf16(config.bf16, deps.device)
    current = _evaluate(deps, active_path, eval_set, eval_cfg, liked, disliked, bf16, use_cache=True)
    candidate = _evaluate(deps, out, eval_set, eval_cfg, liked, disliked, bf16, use_cache=False)
    decision = gate(candidate, current, config.loss_tolerance, config.margin_tolerance, config.fact_use_tolerance)
    metrics = {**train_metrics, "candidate": candidate, "current": current,
               "current_adapter": deps.registry.active_version(), "margin_on": margin_on,
               "ratings_used": len(rs.rating_ids), "liked": rs.liked, "disliked": rs.disliked,
               "evaluation_seconds": round(time.perf_counter() - t_eval, 1),
               "examples_by_source": {s: sum(1 for e in examples if e.source == s) for s in ("dataset", "drill", "rating", "correction")}}
    typical = owner_reply_chars(train_set, tok)
    if typical is not None:  # what serving measures a conversation's length against (agent.prompt.length_bias)
        metrics["owner_reply_chars"] = typical
    status = "active" if decision.accept else "rejected"
    if decision.accept and deps.prepare_serving is not None:
        try:
            from peft import PeftModel

            deps.prepare_serving(PeftModel.from_pretrained(deps.load_base(), str(out)), out)
        except Exception as exc:  # serving can still do it itself, at its first request
            log.warning("could not prepare adapter for serving ahead of time (%s); the serving process "
                        "will do it at its first request", exc)
    row = deps.registry.register(out, status=status, reason=decision.reason, metrics=metrics,
                                 fingerprint=fingerprint, config=config.as_dict())
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    with deps.sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        run.status = "succeeded" if decision.accept else "rejected"
        run.finished_at = utcnow()
        run.metrics = metrics
        run.rating_ids = rs.rating_ids
        run.adapter_id = row.id
    name = version_name(row.version)
    if decision.accept:
        message = f"Training run {run_id} ({kind}): adapter {name} is now active ({decision.reason})."
    else:
        message = (f"Training run {run_id} ({kind}): adapter {name} was rejected ({decision.reason}); "
                   f"{'the previous adapter' if active_path else 'the base model'} keeps serving.")
    if fresh_because:
        message += f" It started fresh, not from the interrupted run's checkpoints: {fresh_because}."
    return RunResult(run_id, "succeeded" if decision.accept else "rejected", message, metrics, row.version)


RESUME_FILE = "resume.json"
# settings that only judge the result: changing them does not make checkpoints stale
_GATE_FIELDS = ("loss_tolerance", "margin_tolerance", "fact_use_tolerance", "eval_examples", "eval_fact_questions")


def _resume_key(fingerprint: str | None, config: TrainConfig, start: Path | None, registry: Registry,
                examples: list[Example], facts: str = "") -> dict[str, Any]:
    """What a run's checkpoints were trained on: resuming from them is right only if all of it is the
    same (``facts``: the facts file and retrieval its examples' facts came from)."""
    import hashlib
    import json

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.completion, e.weight, e.source], ensure_ascii=False).encode())
    return {"dataset": fingerprint, "examples": h.hexdigest()[:20], "facts": facts,
            "config": {k: v for k, v in config.as_dict().items() if k not in _GATE_FIELDS},
            "start": start.name if start is not None else None}


def _check_resume(work: Path, key: dict[str, Any]) -> str | None:
    """Keep ``work``'s checkpoints for the run about to start, or remove them. Returns why they were
    removed (None when they are resumed from, or there were none), and records ``key`` there."""
    import json

    reason = None
    if work.is_dir() and any(work.glob("checkpoint-*")):
        try:
            saved = json.loads((work / RESUME_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            reason = "there is no record of what its checkpoints were trained on"
        elif saved.get("dataset") != key["dataset"]:
            reason = f"the training set changed (fingerprint {saved.get('dataset')} -> {key['dataset']})"
        elif saved.get("config") != key["config"]:
            was = saved.get("config") or {}
            changed = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in key["config"].items() if was.get(k) != v]
            reason = f"the training config changed ({', '.join(changed) or 'its fields'})"
        elif saved.get("facts", "") != key["facts"]:
            reason = "the facts changed (the facts file or how they are retrieved)"
        elif saved.get("start") != key["start"]:
            reason = (f"it continued adapter {saved.get('start') or 'none (the base model)'}, and "
                      f"{key['start'] or 'the base model'} serves now")
        elif saved.get("examples") != key["examples"]:
            reason = "its examples changed (new or withdrawn ratings and corrections)"
    if reason is not None or (work.is_dir() and not any(work.glob("checkpoint-*"))):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / RESUME_FILE).write_text(json.dumps(key), encoding="utf-8")
    return reason


def nightly(deps: TrainingDeps, config: TrainConfig, min_new_ratings: int) -> RunResult:
    """The nightly job: retrain only when enough new ratings arrived; never two at once."""
    with deps.sessions() as session:
        fresh = new_ratings_since_last_retrain(session)
    if fresh < min_new_ratings:
        message = f"Nightly retraining skipped: {fresh} new ratings (it waits for {min_new_ratings})."
        log.info(message)
        return RunResult(0, "skipped", message)
    try:
        return run_training(deps, "retrain", config)
    except BusyError as exc:
        log.info("nightly retraining skipped: %s", exc.message)
        return RunResult(0, "skipped", exc.message)
