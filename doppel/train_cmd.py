"""`doppel train | eval | retrain | adapters | runs | scheduler`: the learning side."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from common.errors import DoppelError
from doppel.cli import app, console, ctx, err_console
from doppel.progress import ProgressLog

_ctx = ctx

log = logging.getLogger(__name__)

adapters_app = typer.Typer(help="Trained LoRA adapters: list them, choose the one that serves.", no_args_is_help=True)
runs_app = typer.Typer(help="Past training runs and their outcomes.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(runs_app, name="runs")


def train_config(c, sets: list[str] | None = None):  # type: ignore[no-untyped-def]
    """The training config: defaults, then the `train_overrides` setting, then --set KEY=VALUE."""
    from common.errors import ConfigError
    from trainer.config import CHOICES, TrainConfig

    data: dict[str, Any] = dict(TrainConfig().as_dict())
    data.update(c.settings.train_overrides)
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in data:
            raise ConfigError(f"Unknown training setting {key!r}.", hint="See `doppel train --show-config`.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[key] = value
    unknown = set(data) - set(TrainConfig().as_dict())
    if unknown:
        raise ConfigError(f"Unknown training settings in train_overrides: {', '.join(sorted(unknown))}.",
                          hint="See `doppel train --show-config`.")
    cfg = TrainConfig.from_dict(data)
    defaults = TrainConfig()
    for name, value in cfg.as_dict().items():  # a wrong type is a message, not a crash mid-run
        expected = type(getattr(defaults, name))
        if expected is float and isinstance(value, int):
            setattr(cfg, name, float(value))
        elif not isinstance(value, expected):
            raise ConfigError(f"Training setting {name} should be {expected.__name__}, got {value!r}.")
    for name, words in CHOICES.items():
        if getattr(cfg, name) not in words:
            raise ConfigError(f"Training setting {name} should be one of {', '.join(words)}, got {getattr(cfg, name)!r}.")
    return cfg


def training_lock_path(c) -> Path:  # type: ignore[no-untyped-def]
    """The single-flight lock every training run takes (across processes)."""
    return c.settings.data_dir / "train.lock"


def training_deps(c, notify=None):  # type: ignore[no-untyped-def]
    from agent.models import load_tokenizer
    from agent.runtime import load_model
    from doppel.commands import _dataset_path
    from trainer.pipeline import TrainingDeps
    from trainer.registry import Registry

    s = c.settings
    device = c.torch_device

    def load_base() -> Any:
        model, _ = load_model(s.base_model, s.data_dir, device, "float32")
        return model

    kwargs: dict[str, Any] = {"notify": notify} if notify else {}
    tokenizer = load_tokenizer(s.base_model, s.data_dir)
    if _serves_on_llama_cpp(c):
        from agent.llamacpp import LlamaCppRuntime, export_merged
        from agent.models import cache_dir_for, packaged_gguf

        exports = cache_dir_for(s.base_model, s.data_dir) / "gguf"

        def prepare_serving(candidate: Any, adapter_dir: Path) -> None:
            candidate.merge_adapter()
            export_merged(candidate, adapter_dir, packaged_gguf(s.base_model, s.data_dir), exports, s.llama_cpp_weights)

        def generation_runtime(adapter: Path | None) -> Any:
            """The gate answers on llama.cpp, as the twin will: the export it makes of a candidate
            (keyed by the adapter's content) is the one serving loads if the candidate goes live."""
            rt = LlamaCppRuntime(load_base(), tokenizer, packaged_gguf(s.base_model, s.data_dir), exports,
                                 ftype=s.llama_cpp_weights)
            if adapter is not None:
                rt.use_adapter(adapter)
            return rt

        kwargs["prepare_serving"] = prepare_serving
        kwargs["generation_runtime"] = generation_runtime
        kwargs["generation_backend"] = f"llama.cpp {s.llama_cpp_weights}"
    persona = c.persona
    kwargs["eval_set"] = lambda validation, cfg: eval_set(c, tokenizer, persona, validation, cfg)
    kwargs["with_facts"], kwargs["facts_version"] = c.example_facts(tokenizer, persona)
    kwargs["drills"] = c.fact_drills(tokenizer, persona)
    return TrainingDeps(sessions=c.sessions, registry=Registry(s.adapters_dir, c.sessions),
                        tokenizer=tokenizer, load_base=load_base,
                        dataset_path=_dataset_path(c), lock_path=training_lock_path(c),
                        persona=persona, device=device, fact_boost=s.fact_boost, **kwargs)


def eval_set(c, tokenizer, persona, validation, cfg, questions: Path | None = None,  # type: ignore[no-untyped-def]
             smalltalk: Path | None = None):
    """What a model is evaluated on: validation samples, and questions about the facts (from
    ``questions``, JSONL {"q", "fact"}, or else phrasings the fact drills never use), each prompt
    built as the agent builds it, with the agent's retrieval."""
    from agent.prompt import Turn, render_prompt
    from common.errors import DoppelError
    from trainer.drills import drills
    from trainer.evaluate import EVAL_ASKER, EvalSet, question_probes, spread

    limits = c.prompt_limits()

    def render(facts: list[str], question: str) -> str:
        return render_prompt(tokenizer, persona, facts, [Turn(EVAL_ASKER, question)], limits).text

    chosen = spread(validation, cfg.examples) if cfg.examples > 0 else list(validation)
    out = EvalSet(validation=c.example_facts(tokenizer, persona)[0](chosen))  # their facts, as training gives them
    try:
        retrieve = c.facts_retriever()
        facts = c.knowledge.facts()
    except DoppelError as exc:
        log.warning("facts unavailable, fact use is not evaluated: %s", exc.message)
        return out
    if questions is not None:
        asked = [(q["q"], q.get("fact")) for q in _read_jsonl(questions)]
    else:
        asked = [(d.question, d.fact) for d in drills([(f.id, f.text, f.topic) for f in facts], "held_out", 1)]
    if retrieve is not None and cfg.fact_questions > 0:
        out.facts = question_probes(render, retrieve, spread(asked, cfg.fact_questions))
    if smalltalk is not None:
        out.smalltalk = question_probes(render, retrieve, [(q["q"], None) for q in _read_jsonl(smalltalk)])
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from common.errors import InputError

    rows = []
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("q"), str):
                    raise InputError(f"{path}, line {n}: expected an object with a \"q\" string.")
                rows.append(row)
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror}.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}, line {exc.lineno}: not JSON ({exc.msg}).", hint="One JSON object per line.") from None
    return rows


def _serves_on_llama_cpp(c: Any) -> bool:
    """Whether the serving processes generate on llama.cpp; then a new adapter is exported for it
    before it goes live (a serving process would otherwise export it in front of a request)."""
    try:
        return bool(c.use_llama_cpp())
    except DoppelError:
        return False  # misconfigured: serving will say so when it starts


def _progress_bar() -> Progress:
    return Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps  loss {task.fields[loss]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)


def _run(kind: str, sets: list[str] | None, ctx: Any = None, exit_on_reject: bool = True) -> Any:
    from trainer.pipeline import run_training

    c = ctx or _ctx()
    cfg = train_config(c, sets)
    deps = training_deps(c, notify=lambda m: console.print(m, highlight=False))
    if console.is_terminal:
        with _progress_bar() as bar:
            task = bar.add_task("train", total=None, loss="-")

            def on_step(step: int, total: int, loss: float | None) -> None:
                bar.update(task, completed=step, total=total, loss=f"{loss:.3f}" if loss is not None else "-")

            def on_phase(text: str) -> None:
                bar.stop()
                console.print(f"{text}…", highlight=False)

            result = run_training(deps, kind, cfg, progress=on_step, phase=on_phase)
    else:
        result = run_training(deps, kind, cfg, progress=ProgressLog("training", "step"),
                              phase=lambda text: print(f"training: {text}", flush=True))
    m = result.metrics
    console.print(f"{m.get('examples')} examples ({m.get('available_examples', m.get('examples'))} available), "
                  f"{m.get('steps')} steps, {m.get('tokens_per_s')} tokens/s, {m.get('seconds')} s of training"
                  + (" (resumed from a checkpoint)" if m.get("resumed") else "")
                  + (", stopped by the time budget" if m.get("stopped_by_time_budget") else ""), highlight=False)
    if m.get("evaluation_seconds") is not None:
        console.print(f"evaluation took {m['evaluation_seconds']:.0f} s", highlight=False)
    if result.status == "rejected" and exit_on_reject:
        raise typer.Exit(1)
    return result


@app.command("train")
def train_cmd(
    sets: Optional[list[str]] = typer.Option(None, "--set", help="A training setting, KEY=VALUE (repeatable), e.g. --set max_steps=50."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Time budget of the training loop in minutes (default: the max_minutes setting, 25; 0: none)."),
    show_config: bool = typer.Option(False, "--show-config", help="Print every training setting with its help and exit."),
) -> None:
    """Fine-tune a LoRA adapter on the training set; it serves if it passes the evaluation gate."""
    sets = list(sets or []) + ([f"max_minutes={max_minutes}"] if max_minutes is not None else [])
    if show_config:
        from trainer.config import TrainConfig

        c = ctx()
        cfg = train_config(c, sets)
        table = Table("setting", "value", "meaning", title="Training settings")
        for name, help_text in TrainConfig.help().items():
            table.add_row(name, json.dumps(getattr(cfg, name)), help_text)
        console.print(table)
        return
    _run("train", sets)


@app.command("retrain")
def retrain_cmd(
    now: bool = typer.Option(False, "--now", help="Run it now, whatever the number of new ratings."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="A training setting, KEY=VALUE (repeatable)."),
) -> None:
    """Retrain on the ratings (👍/👎, corrections) with a replay of the original data."""
    from trainer.pipeline import new_ratings_since_last_retrain

    c = ctx()
    if not now:
        with c.sessions() as session:
            fresh = new_ratings_since_last_retrain(session)
        if fresh < c.settings.retrain_min_ratings:
            console.print(f"{fresh} new ratings since the last retraining; the nightly job waits for "
                          f"{c.settings.retrain_min_ratings}. Use --now to retrain anyway.")
            return
    _run("retrain", sets)


@app.command("eval")
def eval_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="Questions about your facts, JSONL {\"q\": ..., \"fact\": ...}, asked the way people ask (default: phrasings the training never used)."),
    smalltalk: Optional[Path] = typer.Option(None, "--smalltalk", help="Messages that ask no fact, JSONL {\"q\": ...}: how often the twin recites a fact anyway."),
    replies: int = typer.Option(24, "--replies", help="Validation conversations the twin answers for the voice figures (0: skip)."),
    facts_limit: int = typer.Option(16, "--facts", help="How many questions about facts to ask (0: skip fact use)."),
    examples: int = typer.Option(96, "--examples", help="Validation samples for the held-out loss (0: all)."),
) -> None:
    """The twin next to the base model and next to you: held-out perplexity, fact use, small talk,
    reply length and an authorship score. Figures the training run already computed are reused."""
    from trainer.evaluate import EvalConfig, EvalSet, Probe, spread
    from trainer.examples import rating_examples, read_dataset
    from trainer.lora import _use_bf16
    from trainer.pipeline import _evaluate

    c = ctx()
    deps = training_deps(c)
    cfg = train_config(c)
    validation = read_dataset(deps.dataset_path, "validation")
    with c.sessions() as session:
        rs = rating_examples(session, deps.tokenizer)
    liked = [e for e in rs.examples if e.weight > 0 and e.source == "rating"]
    disliked = [e for e in rs.examples if e.weight < 0]
    active = deps.registry.active_path()
    bf16 = _use_bf16(cfg.bf16, deps.device)
    gate_cfg = EvalConfig(examples=examples, fact_questions=facts_limit, fact_boost=c.settings.fact_boost,
                          top_layers=cfg.top_layers)
    persona = deps.persona
    with console.status("building the evaluation set"):
        gate_set = eval_set(c, deps.tokenizer, persona, validation, gate_cfg, questions, None)
        voice_set = EvalSet(smalltalk=eval_set(c, deps.tokenizer, persona, [], EvalConfig(examples=0, fact_questions=0),
                                               None, smalltalk).smalltalk if smalltalk else [])
        if replies > 0:
            assert deps.with_facts is not None
            voice_set.contexts = [Probe(e.prompt, None, (), _reply_of(e.completion, deps.tokenizer),
                                        own=tuple(_reply_of(e.prompt[a:b], deps.tokenizer) for a, b in e.targets))
                                  for e in deps.with_facts(spread(validation, replies))]
            voice_set.contexts = [p for p in voice_set.contexts if p.reference]
        probe, probe_report = _authorship_probe(c, deps.dataset_path) if voice_set.contexts else (None, None)
    report: dict[str, Any] = {"validation_examples": len(gate_set.validation), "liked": len(liked), "disliked": len(disliked),
                              "adapter_version": active.name if active else None}
    if voice_set.contexts:
        # what the twin learns from: your replies in the training period (a twin that writes as long as
        # they do is faithful even where the newest conversations, the validation's, run longer or shorter)
        from trainer.evaluate import _quantiles

        report["owner_history_length"] = _quantiles([len(_reply_of(e.completion, deps.tokenizer))
                                                     for e in read_dataset(deps.dataset_path, "train") if e.source == "dataset"])
    if probe_report is not None:
        report["authorship_probe"] = {"held_out_accuracy": round(probe_report.balanced_accuracy, 4),
                                      "auc": round(probe_report.auc, 4), f"sets_of_{probe_report.set_size}_accuracy":
                                      round(probe_report.set_accuracy, 4)}
    for label, adapter in (("base", None), ("adapter", active)):
        if label == "adapter" and active is None:
            continue
        with console.status(f"evaluating the {label if adapter is None else 'adapter ' + adapter.name}"):
            entry = _evaluate(deps, adapter, gate_set, gate_cfg, liked, disliked, bf16, use_cache=True)
            if voice_set.smalltalk or voice_set.contexts:
                voice = _evaluate(deps, adapter, voice_set, EvalConfig(examples=0, fact_boost=c.settings.fact_boost,
                                                                     reply_sampling=c.agent_config().generation), [], [],
                                  bf16, use_cache=True)
                if probe is not None and voice.get("replies"):
                    voice["replies"]["authorship"] = round(probe.mean_score(voice["replies"]["all"]), 4)
                    voice["replies"]["owner_authorship"] = round(probe.mean_score([p.reference or "" for p in voice_set.contexts]), 4)
                entry.update({k: v for k, v in voice.items() if k in ("smalltalk", "replies")})
        report[label] = entry
    if as_json:
        print(json.dumps(report, default=str))
        return
    _print_eval(report)


def _reply_of(completion: str, tokenizer: Any) -> str:
    """The reply text of a dataset completion (the end-of-turn marker removed)."""
    from agent.prompt import reply_of

    return reply_of(tokenizer, completion)


def _authorship_probe(c: Any, dataset_path: Path) -> tuple[Any, Any]:
    """A classifier of the owner's messages against everyone else's, fitted on the history before
    the validation period (so the owner's validation replies are new to it)."""
    from datetime import datetime

    from sqlalchemy import select

    from feedback.models import Message
    from trainer.voice import AuthorshipProbe

    starts = []
    with dataset_path.open(encoding="utf-8") as fh:
        for line in fh:
            if '"split": "validation"' in line:
                starts.append(json.loads(line)["at"])
    q = select(Message.text, Message.is_owner, Message.source, Message.chat_id).where(
        Message.kind == "text", Message.source != "twin")
    if starts:
        q = q.where(Message.sent_at < datetime.fromisoformat(min(starts)))
    with c.sessions() as session:
        rows = session.execute(q.order_by(Message.sent_at.desc()).limit(60_000)).all()
    owner = [(r.text, r.chat_id) for r in rows if r.is_owner and r.source == "ingest" and r.text and r.text.strip()]
    other = [(r.text, r.chat_id) for r in rows if not r.is_owner and r.text and r.text.strip()]
    if len(owner) < 20 or len(other) < 20:
        return None, None
    probe = AuthorshipProbe()
    report = probe.fit([t for t, _ in owner], [t for t, _ in other], owner_groups=[g for _, g in owner],
                       other_groups=[g for _, g in other])
    return probe, report


def _print_eval(report: dict[str, Any]) -> None:
    def pct(d: dict[str, Any] | None, key: str = "share") -> str:
        return f"{d[key]:.0%} ({d.get('stated', d.get('stated_a_fact'))}/{d.get('asked')})" if d else "-"

    def q(d: dict[str, Any] | None) -> str:
        return f"{d['median']:.0f} ({d['p25']:.0f}-{d['p75']:.0f})" if d else "-"

    cols = [k for k in ("base", "adapter") if k in report]
    table = Table("", *[k if k == "base" else f"adapter {report['adapter_version']}" for k in cols], title="Evaluation")
    rows: list[tuple[str, Any]] = [
        ("held-out perplexity", lambda e: f"{e['perplexity']:.2f}" if e.get("perplexity") is not None else "-"),
        ("rating margin", lambda e: f"{e['rating_margin']:.4f}" if e.get("rating_margin") is not None else "-"),
        ("fact use (questions about facts)", lambda e: pct(e.get("fact_use"))),
        ("small talk that recites a fact", lambda e: pct(e.get("smalltalk"))),
        ("unasked facts in replies", lambda e: f"{e['replies']['unasked_fact_share']:.0%}" if e.get("replies") else "-"),
        ("reply length, chars: median (p25-p75)", lambda e: q((e.get("replies") or {}).get("length"))),
        ("authorship score (0-1)", lambda e: f"{e['replies']['authorship']:.3f}" if (e.get("replies") or {}).get("authorship") is not None else "-"),
    ]
    for name, fn in rows:
        table.add_row(name, *[fn(report[k]) for k in cols])
    console.print(table)
    rep = next((report[k].get("replies") for k in cols if report[k].get("replies")), None)
    if rep:
        owner_auth = rep.get("owner_authorship")
        console.print(f"Your own replies to the same conversations: length {q(rep.get('owner_length'))} chars"
                      + (f", authorship score {owner_auth:.3f}" if owner_auth is not None else "")
                      + (f"; your replies the twin learnt from: {q(report['owner_history_length'])} chars"
                         if report.get("owner_history_length") else ""), highlight=False)
    probe = report.get("authorship_probe")
    if probe:
        console.print(f"The authorship probe tells your messages from others' with {probe['held_out_accuracy']:.0%} "
                      f"balanced accuracy on held-out chats (AUC {probe['auc']:.2f}); sets of 20 replies: "
                      f"{list(probe.values())[2]:.0%}.", highlight=False)
    fu = next((report[k].get("fact_use") for k in cols if report[k].get("fact_use")), None)
    if fu:
        console.print(f"The asked fact reached the prompt for {fu['reached_prompt']}/{fu['asked']} questions.", highlight=False)
    console.print(f"{report['validation_examples']} validation examples, {report['liked']} liked and "
                  f"{report['disliked']} disliked replies.")


@adapters_app.command("list")
def adapters_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every adapter with its status, gate reason and held-out loss."""
    from trainer.registry import Registry

    c = ctx()
    for line in c.recover():
        err_console.print(f"[yellow]Repaired: {line}.[/]")
    rows = Registry(c.settings.adapters_dir, c.sessions).list()
    if as_json:
        print(json.dumps([{"version": r.version, "status": r.status, "reason": r.reason, "created_at": r.created_at,
                           "metrics": r.metrics} for r in rows], default=str))
        return
    table = Table("version", "status", "created", "held-out loss", "reason")
    for r in rows:
        loss = ((r.metrics or {}).get("candidate") or {}).get("heldout_loss")
        table.add_row(f"v{r.version}", r.status, r.created_at.strftime("%Y-%m-%d %H:%M"),
                      f"{loss:.4f}" if loss is not None else "-", r.reason or "")
    console.print(table if rows else "No adapters yet: run `doppel train`.")


@adapters_app.command("activate")
def adapters_activate(version: str = typer.Argument(..., help="The version, e.g. 3 or v3.")) -> None:
    """Make adapter N the one that serves (running agents pick it up at their next reply)."""
    from common.errors import InputError
    from trainer.registry import Registry

    v = version[1:] if version.startswith("v") else version
    if not v.isdigit():
        raise InputError(f"{version!r} is not an adapter version.", hint="Use a number from `doppel adapters list`.")
    c = ctx()
    row = Registry(c.settings.adapters_dir, c.sessions).activate(int(v))
    console.print(f"Adapter v{row.version} is active.")


@adapters_app.command("rollback")
def adapters_rollback() -> None:
    """Go back to the adapter that served before the active one (or to the base model)."""
    from trainer.registry import Registry

    c = ctx()
    row = Registry(c.settings.adapters_dir, c.sessions).rollback()
    console.print(f"Adapter v{row.version} is active." if row else "No adapter is active: the base model serves.")


@runs_app.command("list")
def runs_list(
    limit: int = typer.Option(20, "--limit", help="How many of the latest runs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Past training runs with their outcome and metrics."""
    from sqlalchemy import select

    from feedback.models import TrainingRun

    c = ctx()
    for line in c.recover():
        err_console.print(f"[yellow]Repaired: {line}.[/]")
    with c.sessions() as session:
        runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)).all()
        rows = [{"id": r.id, "kind": r.kind, "status": r.status, "started_at": r.started_at, "finished_at": r.finished_at,
                 "ratings": len(r.rating_ids or []), "metrics": r.metrics, "error": (r.error or "").splitlines()[-1:] }
                for r in runs]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("run", "kind", "status", "started", "ratings", "loss before -> after", "note")
    for r in rows:
        m = r["metrics"] or {}
        before = (m.get("current") or {}).get("heldout_loss")
        after = (m.get("candidate") or {}).get("heldout_loss")
        losses = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "-"
        table.add_row(str(r["id"]), r["kind"], r["status"], r["started_at"].strftime("%Y-%m-%d %H:%M"),
                      str(r["ratings"]), losses, (r["error"] or [""])[0][:60])
    console.print(table if rows else "No training runs yet.")


@app.command("scheduler")
def scheduler_cmd() -> None:
    """Run the nightly retraining scheduler in the foreground (`doppel serve` runs it too)."""
    import time

    from doppel.scheduler import start_scheduler

    c = ctx()
    sched = start_scheduler(c)
    job = sched.get_job("nightly-retrain")
    console.print(f"Nightly retraining scheduled; next run {job.next_run_time if job else '?'}. Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sched.shutdown(wait=True)
        err_console.print("Scheduler stopped.")
