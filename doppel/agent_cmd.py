"""`doppel reply`, `doppel chat`, `doppel serve`: the twin from the terminal and over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from doppel.cli import app, console, ctx, err_console, report_error

ADAPTER_HELP = "Serve this LoRA adapter folder instead of the registry's active one."


def _load_agent(adapter: Optional[Path]):  # type: ignore[no-untyped-def]
    c = ctx()
    with console.status("loading the model (the first start converts the packaged model, ~25 s)"):
        agent = c.agent(adapter)
        agent.runtime.prepare()  # the active adapter (and on llama.cpp its export) now, not in the first reply
        c.knowledge.current()  # index the facts now, not during the first reply
    return c, agent


@app.command("reply")
def reply_cmd(
    text: str = typer.Argument(..., help="The message to answer."),
    chat: str = typer.Option("terminal", "--chat", help="The conversation it belongs to (its context is kept)."),
    sender: str = typer.Option("friend", "--sender", help="Who is writing."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print text, retrieved facts, adapter version and latency as JSON."),
) -> None:
    """One reply from the twin."""
    _, agent = _load_agent(adapter)
    reply = agent.reply(chat, sender, text, platform="cli")
    if as_json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False))
        return
    for part in reply.messages:
        console.print(part, highlight=False, markup=False)
    facts = ", ".join(f["text"] for f in reply.facts) or "none"
    err_console.print(f"[dim]reply {reply.id} · {reply.latency_ms:.0f} ms · adapter {reply.adapter_version or 'none'} · facts: {facts}[/]",
                      highlight=False)


CHAT_HELP = """Type a message and press Enter. Commands:
  +  / -      rate the last reply 👍 / 👎
  /reset      start a fresh conversation window
  /facts      show the facts the last reply used
  /quit       leave (or Ctrl-D)"""


@app.command("chat")
def chat_cmd(
    chat: str = typer.Option("terminal", "--chat", help="The conversation (its context is kept between sessions)."),
    sender: str = typer.Option("friend", "--sender", help="Your name in the conversation."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
) -> None:
    """A terminal conversation with the twin; rate replies with + and -."""
    from common.errors import DoppelError

    _, agent = _load_agent(adapter)
    console.print(CHAT_HELP, highlight=False, markup=False)
    last = None
    rater = f"cli:{os.environ.get('USER', 'owner')}"
    while True:
        try:
            line = console.input("[bold]> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return
            if line in ("+", "-"):
                if last is None:
                    console.print("Nothing to rate yet.")
                    continue
                agent.rate(last.id, rater, 1 if line == "+" else -1)
                console.print(f"[dim]rated reply {last.id} {'👍' if line == '+' else '👎'}[/]")
                continue
            if line == "/reset":
                agent.reset(chat, platform="cli")
                console.print("[dim]fresh conversation[/]")
                continue
            if line == "/facts":
                if last is None or not last.facts:
                    console.print("No facts used yet.")
                for f in last.facts if last else []:
                    console.print(f"  {f['score']:.2f}  {f['text']}", highlight=False)
                continue
            if line == "/help":
                console.print(CHAT_HELP, highlight=False, markup=False)
                continue
            last = agent.reply(chat, sender, line, platform="cli")
            for part in last.messages:
                console.print(f"[cyan]{agent.config.persona.name}:[/] ", end="")
                console.print(part, highlight=False, markup=False)
        except DoppelError as exc:
            report_error(exc)


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    scheduler: bool = typer.Option(True, "--scheduler/--no-scheduler", help="Also run the nightly retraining."),
) -> None:
    """Serve the twin over HTTP: the API (bearer token DOPPEL_API_TOKEN), the owner's console at / (password
    DOPPEL_CONSOLE_PASSWORD, default the API token), and the nightly retraining."""
    from waitress import serve

    from agent.api import ApiConfig, server_options
    from common.errors import ConfigError
    from doppel.web import build_app, freeze_heap

    c = ctx()
    if c.settings.api_token is None:
        raise ConfigError("No API token is set; the API would refuse every request.",
                          hint="Set DOPPEL_API_TOKEN to a long random string (e.g. `openssl rand -hex 32`).")
    _, agent = _load_agent(adapter)
    sched = None
    if scheduler:
        from doppel.scheduler import start_scheduler

        sched = start_scheduler(c)
        job = sched.get_job("nightly-retrain")
        console.print(f"Nightly retraining at {job.next_run_time if job else '?'} (when enough new ratings arrived)")
    try:
        application = build_app(c, agent, sched)
        freeze_heap()
        console.print(f"Serving on http://{host}:{port}: the console at /, the API at /api (Ctrl-C to stop)")
        serve(application, host=host, port=port, **server_options(ApiConfig(None, c.settings.api_max_body_bytes)))
    finally:
        if sched is not None:
            sched.shutdown(wait=False)
