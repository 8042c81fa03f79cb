"""`doppel facts ...`: list, add, edit, reindex and search the facts file."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from doppel.cli import app, console, ctx, err_console

facts_app = typer.Typer(help="The facts file: what the twin knows about you (Markdown: headings are topics, bullets are facts).",
                        no_args_is_help=True)
app.add_typer(facts_app, name="facts")


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _refresh(c, force: bool = False, reuse: bool = True):  # type: ignore[no-untyped-def]
    """Bring the index in step with the file, with a progress bar when there is embedding to do."""
    from knowledge.facts import read_facts_file

    kb = c.knowledge
    parsed = read_facts_file(kb.facts_path, kb.config.max_bytes)
    with Progress(TextColumn("embedding facts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("embed", total=len(parsed.facts))
        report = kb.refresh(force=force, reuse=reuse, progress=lambda n: progress.advance(task, n))
    if report is not None and report.replaced_model:
        err_console.print(f"[yellow]note:[/] {report.model_change()}", highlight=False, soft_wrap=True)
    return kb, report


@facts_app.command("list")
def facts_list(as_json: bool = typer.Option(False, "--json", help="One JSON object per fact.")) -> None:
    """Show the facts as the twin reads them, with their topics and ids."""
    from knowledge.facts import read_facts_file

    c = ctx()
    path = c.settings.resolved_facts_path
    parsed = read_facts_file(path, c.settings.facts_max_bytes)
    _warn(parsed.warnings)
    if as_json:
        for f in parsed.facts:
            print(json.dumps({"id": f.id, "topic": f.topic, "text": f.text, "line": f.line}, ensure_ascii=False))
        return
    table = Table("id", "topic", "fact", title=f"{len(parsed.facts)} facts in {path}")
    for f in parsed.facts:
        table.add_row(f.id, f.topic, f.text)
    console.print(table)


@facts_app.command("add")
def facts_add(
    text: str = typer.Argument(..., help='The fact, in your words: "I live in Prague."'),
    topic: str = typer.Option("", "--topic", "-t", help="The heading to put it under (created if missing; default: Other)."),
) -> None:
    """Add one fact to the file (and the index)."""
    from knowledge.facts import add_fact

    c = ctx()
    path = c.settings.resolved_facts_path
    fact, new = add_fact(path, text, topic, c.settings.facts_max_bytes)
    if not new:
        console.print(f"Already known (line {fact.line}, topic {fact.topic or '-'}): {fact.text}")
        return
    _refresh(c)
    console.print(f"Added under {fact.topic!r} (id {fact.id}): {fact.text}")


def _editor() -> list[str]:
    for name in (os.environ.get("VISUAL"), os.environ.get("EDITOR")):
        if name:
            return shlex.split(name)
    for fallback in ("nano", "vi"):
        if shutil.which(fallback):
            return [fallback]
    from common.errors import ConfigError

    raise ConfigError("No editor found.", hint="Set $EDITOR, e.g. `export EDITOR=nano`.")


@facts_app.command("edit")
def facts_edit() -> None:
    """Open the facts file in $EDITOR; the edit is checked before it replaces the file."""
    from common.errors import DoppelError, InputError
    from knowledge.facts import check_facts, read_facts_file, write_atomic

    c = ctx()
    path = c.settings.resolved_facts_path
    original = path.read_bytes() if path.exists() else b"# Facts about me\n\n## Home\n- \n"
    fd, tmp_name = tempfile.mkstemp(prefix="facts-", suffix=".md")
    tmp = Path(tmp_name)
    with os.fdopen(fd, "wb") as f:
        f.write(original)
    try:
        rc = subprocess.call([*_editor(), str(tmp)])
    except FileNotFoundError as exc:
        tmp.unlink(missing_ok=True)
        from common.errors import ConfigError

        raise ConfigError(f"The editor could not be started: {exc}", hint="Check $EDITOR.") from None
    edited = tmp.read_bytes()
    if rc != 0 or edited == original:
        tmp.unlink(missing_ok=True)
        console.print("No changes." if rc == 0 else f"The editor exited with status {rc}; the facts file is unchanged.")
        return
    try:
        parsed = read_facts_file(tmp, c.settings.facts_max_bytes)
        problems = check_facts(edited.decode("utf-8"), c.settings.facts_max_bytes)
        if problems:
            raise InputError("The edit would not read as you meant it: " + "; ".join(map(str, problems)) + ".",
                             hint="Fix it and run `doppel facts edit` again.")
    except DoppelError as exc:
        raise InputError(f"{exc.message} The facts file was not changed; your edit is kept in {tmp}.",
                         hint=exc.hint) from None
    write_atomic(path, edited)
    tmp.unlink(missing_ok=True)
    _warn(parsed.warnings)
    _, report = _refresh(c)
    console.print(f"Saved {len(parsed.facts)} facts" + (f" ({report.embedded} new or changed)." if report else "."))


@facts_app.command("reindex")
def facts_reindex(full: bool = typer.Option(False, "--full", help="Re-embed every fact, not only the changed ones.")) -> None:
    """Rebuild the index from the facts file (it also follows the file by itself)."""
    c = ctx()
    kb, report = _refresh(c, force=True, reuse=not full)
    assert report is not None
    _warn(report.warnings)
    console.print(f"{report.facts} facts indexed ({report.kind}): {report.embedded} embedded, "
                  f"{report.reused} reused, {report.seconds:.2f} s -> {kb.index_path}")


@facts_app.command("search")
def facts_search(
    query: str = typer.Argument(..., help="What to look for; `-` reads one query per line from stdin and prints JSON lines."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", min=1, help="How many facts (default: setting facts_top_k)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop facts below this score (default: setting)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the facts the twin would put into a prompt for QUERY, with their scores, and the next
    few that just missed it (the table only; --json and `-` give the prompt's facts alone)."""
    c = ctx()
    kb, _ = _refresh(c)
    if query == "-":
        for line in sys.stdin:
            q = line.rstrip("\n")
            if not q.strip():
                continue
            hits = kb.search(q, top_k=top_k, min_score=min_score)
            print(json.dumps({"query": q, "facts": [h.to_dict() for h in hits]}, ensure_ascii=False), flush=True)
        return
    if as_json:
        hits = kb.search(query, top_k=top_k, min_score=min_score)
        print(json.dumps({"query": query, "facts": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return
    from knowledge.index import NEAR_MISSES, used_in_prompt

    k = kb.config.top_k if top_k is None else top_k
    ranked = kb.search(query, top_k=k + NEAR_MISSES, min_score=-1.0, margin=float("inf"))
    used = used_in_prompt(ranked, kb.config, top_k=k, min_score=min_score)
    if not any(used):
        console.print("No fact fits well enough (see --min-score).")
        if not ranked:
            return
    table = Table("prompt", "score", "topic", "fact", "id")
    for h, u in zip(ranked, used):
        table.add_row("yes" if u else "", f"{h.score:.3f}", h.fact.topic, h.fact.text, h.fact.id, style=None if u else "dim")
    console.print(table)
    if any(used) and not all(used):
        console.print("Only the facts marked [bold]yes[/] go into the prompt (setting facts_top_k, facts_min_score, "
                      "facts_margin). If the one you meant is below, write the words people use into it.")
