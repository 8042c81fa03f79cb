"""The `doppel` command line. Each command reads the settings once (through ``AppContext``),
builds what it needs and calls into the packages; ``DoppelError`` becomes one message here."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from common.errors import DoppelError
from doppel import __version__
from doppel.context import AppContext

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="doppel",
    help="Doppel: your digital double. Learns how you write from chat exports, knows your facts, "
    "answers on Telegram and Discord, and improves every night from reactions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema: create, upgrade, check.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _version(value: bool) -> None:
    if value:
        console.print(f"doppel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more (never secrets)."),
) -> None:
    if not verbose:  # library deprecation notes are for us, not for the person using Doppel
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft)\..*")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def ctx() -> AppContext:
    return AppContext.load()


@app.command("config")
def config_cmd() -> None:
    """Print the effective settings and where each value came from (secrets masked)."""
    from common.secrets import redact
    from doppel.settings import describe

    c = ctx()
    table = Table("setting", "value", "from", title="Effective settings")
    for name, shown, source in describe(c.settings, c.sources):
        table.add_row(name, redact(shown), source)
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create the schema, or bring it up to date with this version of Doppel."""
    from doppel.migrate import upgrade
    from feedback.db import redact_url

    c = ctx()
    before, after = upgrade(c.raw_engine, revision)
    where = redact_url(c.settings.resolved_database_url)
    if before == after:
        console.print(f"Database {where} is already at revision {after}.")
    else:
        console.print(f"Database {where} upgraded: {before or 'empty'} -> {after}.")


@db_app.command("status")
def db_status() -> None:
    """Show the schema revision of the database and of the code, and any drift between them."""
    from doppel.migrate import current_revision, drift, head_revision
    from feedback.db import redact_url

    c = ctx()
    engine = c.raw_engine
    cur, head = current_revision(engine), head_revision(engine)
    console.print(f"database: {redact_url(c.settings.resolved_database_url)}")
    console.print(f"schema revision: {cur or 'none'}; code expects: {head}")
    if cur == head:
        diffs = drift(engine)
        console.print("up to date, no drift" if not diffs else f"drift: {diffs}")
    else:
        console.print("run `doppel db upgrade`")


def _register_subcommands() -> None:
    from doppel import agent_cmd, bot_cmd, commands, facts_cmd, models_cmd, privacy_cmd, train_cmd  # noqa: F401  (they register their commands on `app`)


def main() -> None:
    """Entry point: run the CLI, turning an expected error into one message and an exit code."""
    _register_subcommands()
    try:
        app()  # standalone: usage errors and --help are handled by Typer itself
    except DoppelError as exc:
        if os.environ.get("DOPPEL_DEBUG"):
            raise
        report_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)


def run() -> None:
    """The `doppel` program (console script and ``python -m doppel``): ``main``, then ``finish``.
    Code that calls ``main`` itself gets its ``SystemExit`` as before, and its process goes on."""
    try:
        main()
    except SystemExit as exc:  # Typer ends every run with one
        finish(exc.code)
        raise


def finish(code: object) -> None:
    """End a process that loaded torch without the interpreter's teardown, which frees torch's
    thousands of objects one by one: 0.26 s of a 1-second `import torch` here, a tenth of a rebuild of
    the training set. The exit handlers still run first (logs flushed, temporary folders removed,
    databases closed: see ``AppContext.raw_engine``), then the output is flushed; a flush that fails
    exits 120, as Python does. Returns (for a normal exit) where torch is not loaded, another thread
    still runs, or the code is not a number."""
    import threading

    if "torch" not in sys.modules or not (code is None or isinstance(code, int)):
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    import atexit

    atexit._run_exitfuncs()
    status = code or 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    os._exit(status)


def report_error(exc: DoppelError) -> None:
    from rich.markup import escape

    from common.secrets import redact

    err_console.print(f"[bold red]Error:[/] {escape(redact(exc.message))}", highlight=False, soft_wrap=True)
    if exc.hint:
        err_console.print(redact(exc.hint), highlight=False, soft_wrap=True, markup=False)
