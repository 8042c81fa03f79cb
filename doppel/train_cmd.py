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

log = logging.getLogger(__name__)

adapters_app = typer.Typer(help="Trained LoRA adapters: list them, choose the one that serves.", no_args_is_help=True)
runs_app = typer.Typer(help="Past training runs and their outcomes.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(runs_app, name="runs")


def train_config(c, sets: list[str] | None = None):  # type: ignore[no-untyped-def]
    """The training config: defaults, then the `train_overrides` setting, then --set KEY=VALUE."""
    from common.errors import ConfigError
    from trainer.config import TrainConfig

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
    return cfg


def training_deps(c, notify=None):  # type: ignore[no-untyped-def]
    from agent.models import load_tokenizer
    from agent.prompt import Persona
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
    if _serves_on_llama_cpp(c):
        from agent.llamacpp import export_merged
        from agent.models import cache_dir_for, packaged_gguf

        def prepare_serving(candidate: Any, adapter_dir: Path) -> None:
            candidate.merge_adapter()
            export_merged(candidate, adapter_dir, packaged_gguf(), cache_dir_for(s.base_model, s.data_dir) / "gguf",
                          s.llama_cpp_weights)

        kwargs["prepare_serving"] = prepare_serving
    return TrainingDeps(sessions=c.sessions, registry=Registry(s.adapters_dir, c.sessions),
                        tokenizer=load_tokenizer(s.base_model, s.data_dir), load_base=load_base,
                        dataset_path=_dataset_path(c), lock_path=s.data_dir / "train.lock",
                        persona=Persona(s.persona_name, s.persona_description), device=device, **kwargs)


def _serves_on_llama_cpp(c: Any) -> bool:
    """Whether the serving processes generate on llama.cpp; then a new adapter is exported for it
    before it goes live (a serving process would otherwise export it in front of a request)."""
    try:
        return bool(c.use_llama_cpp())
    except DoppelError:
        return False  # misconfigured: serving will say so when it starts


def _progress_bar() -> Progress:
    return Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps  loss {task.fields[loss]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


def _run(kind: str, sets: list[str] | None) -> None:
    from trainer.pipeline import run_training

    c = ctx()
    cfg = train_config(c, sets)
    deps = training_deps(c, notify=lambda m: console.print(m, highlight=False))
    with _progress_bar() as bar:
        task = bar.add_task("train", total=None, loss="-")

        def on_step(step: int, total: int, loss: float | None) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}" if loss is not None else "-")

        result = run_training(deps, kind, cfg, progress=on_step)
    m = result.metrics
    console.print(f"{m.get('examples')} examples, {m.get('steps')} steps, {m.get('tokens_per_s')} tokens/s, "
                  f"{m.get('seconds')} s" + (" (resumed from a checkpoint)" if m.get("resumed") else ""))
    if result.status == "rejected":
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    sets: Optional[list[str]] = typer.Option(None, "--set", help="A training setting, KEY=VALUE (repeatable), e.g. --set max_steps=50."),
    show_config: bool = typer.Option(False, "--show-config", help="Print every training setting with its help and exit."),
) -> None:
    """Fine-tune a LoRA adapter on the training set; it serves if it passes the evaluation gate."""
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
    facts_limit: int = typer.Option(8, "--facts", help="How many facts to ask about for the fact-use score (0: skip)."),
) -> None:
    """Held-out loss and perplexity (base model vs the active adapter), the rating margin, fact use."""
    import math

    from peft import PeftModel

    from agent.runtime import ModelRuntime
    from knowledge.facts import read_facts_file
    from trainer.evaluate import fact_use, heldout_loss, rating_margin
    from trainer.examples import rating_examples, read_dataset

    c = ctx()
    deps = training_deps(c)
    validation = read_dataset(deps.dataset_path, "validation")
    with c.sessions() as session:
        rs = rating_examples(session, deps.tokenizer)
    liked = [e for e in rs.examples if e.weight > 0 and e.source == "rating"]
    disliked = [e for e in rs.examples if e.weight < 0]
    active = deps.registry.active_path()
    report: dict[str, Any] = {"validation_examples": len(validation), "liked": len(liked), "disliked": len(disliked),
                              "adapter_version": active.name if active else None}
    with console.status("evaluating"):
        for label in ("base", "adapter"):
            if label == "adapter" and active is None:
                continue
            model = deps.load_base()
            if label == "adapter":
                model = PeftModel.from_pretrained(model, str(active))
            loss = heldout_loss(model, deps.tokenizer, validation)
            entry: dict[str, Any] = {"heldout_loss": loss, "perplexity": math.exp(loss) if loss is not None else None,
                                     "rating_margin": rating_margin(model, deps.tokenizer, liked, disliked)}
            if facts_limit > 0:
                facts = read_facts_file(c.settings.resolved_facts_path, c.settings.facts_max_bytes).facts
                use = fact_use(ModelRuntime(model, deps.tokenizer, deps.device), deps.tokenizer, deps.persona, facts, facts_limit)
                entry["fact_use"] = {"asked": use.asked, "stated": use.stated, "share": round(use.share, 3)}
            report[label] = entry
    if as_json:
        print(json.dumps(report, default=str))
        return
    table = Table("", "held-out loss", "perplexity", "rating margin", "fact use", title="Evaluation")
    for label in ("base", "adapter"):
        e = report.get(label)
        if not e:
            continue
        fu = e.get("fact_use")
        table.add_row(label if label == "base" else f"adapter {report['adapter_version']}",
                      f"{e['heldout_loss']:.4f}" if e["heldout_loss"] is not None else "-",
                      f"{e['perplexity']:.2f}" if e["perplexity"] is not None else "-",
                      f"{e['rating_margin']:.4f}" if e["rating_margin"] is not None else "-",
                      f"{fu['stated']}/{fu['asked']}" if fu else "-")
    console.print(table)
    console.print(f"{report['validation_examples']} validation examples, {report['liked']} liked and "
                  f"{report['disliked']} disliked replies.")


@adapters_app.command("list")
def adapters_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every adapter with its status, gate reason and held-out loss."""
    from trainer.registry import Registry

    c = ctx()
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
