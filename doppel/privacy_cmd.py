"""`doppel forget` and `doppel export`: what a person may ask of whoever keeps their messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from doppel.cli import app, console, ctx, err_console

PERSON_HELP = ("The person: PLATFORM:ID (telegram:123, discord:456, \"whatsapp:Bob Smith\", \"name:Bob Smith\") or a name "
               "from the `people` setting. Repeat it for each account of theirs; the accounts `people` links are "
               "included by themselves.")


def forget_files(c: Any) -> Any:
    """The scrubber of the training set on disk that /forget and `doppel forget` use."""
    from trainer.forget import dataset_scrubber

    return dataset_scrubber(c.settings.data_dir / "dataset")


def identities(c: Any, person: list[str], names: list[str]) -> list[Any]:
    from feedback.privacy import linked

    return linked([*person, *(f"name:{n}" for n in names)], c.settings.people)


@app.command("forget")
def forget_cmd(
    person: list[str] = typer.Option(..., "--person", "-p", help=PERSON_HELP),
    name: list[str] = typer.Option([], "--name", help="A display name they wrote under, on any platform (names are not "
                                                       "unique: everyone who wrote under it is forgotten)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be removed."),
) -> None:
    """Delete everything stored about a person: their messages (live and from your exports), the twin's
    replies to them, their ratings and corrections, private conversations with them, their lines in
    other replies' prompts, and the training samples on disk that quote them. One transaction: all or nothing."""
    from feedback.privacy import forget_everywhere

    c = ctx()
    who = identities(c, person, name)
    self_names = list(dict.fromkeys([c.settings.persona_name, c.persona.name]))
    plan = forget_everywhere(c.sessions, who, files=forget_files(c), self_names=self_names, dry_run=True)
    _show(plan, "Would remove" if (dry_run or not yes) else "Removing")
    if not plan.total:
        console.print(f"Nothing is stored about {', '.join(plan.identities)}.", markup=False)
        return
    if dry_run:
        return
    if not yes and not typer.confirm("Delete all of this? It cannot be undone", default=False):
        console.print("Nothing was deleted.")
        raise typer.Exit(1)
    report = forget_everywhere(c.sessions, who, files=forget_files(c), self_names=self_names)
    if report.counts == plan.counts:
        console.print("Deleted all of it.")
    else:  # something changed since the plan was counted (a bot kept writing)
        _show(report, "Deleted")
    if report.counts.get("chats"):
        console.print("Private conversations with them went whole, your side too: without them they were no one's context.")
    if not dry_run:
        console.print("Importing an export again skips their messages (only a hash of each identity is kept for that).")
    console.print("An adapter already trained on conversations with them cannot be untrained: it keeps what it learned "
                  "until you build the training set again and train (`doppel dataset build`, then `doppel train`); the "
                  "new adapter is made without them.", highlight=False, soft_wrap=True)


def _show(report: Any, title: str) -> None:
    from feedback.privacy import KINDS

    table = Table("count", "what", title=escape(f"{title}: {', '.join(report.identities)}"))
    for key, _, label in KINDS:
        if report.counts.get(key):
            table.add_row(str(report.counts[key]), escape(label))
    if table.rows:
        console.print(table)
    if report.names:
        console.print(f"Names they wrote under: {', '.join(report.names)}", highlight=False, markup=False)
    if report.owner_rows_skipped:
        err_console.print(f"[yellow]{report.owner_rows_skipped} matching messages are yours (the owner's) and stay.[/]")


@app.command("export")
def export_cmd(
    person: list[str] = typer.Option(..., "--person", "-p", help=PERSON_HELP),
    name: list[str] = typer.Option([], "--name", help="A display name they wrote under, on any platform."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the JSON to this file (default: standard output)."),
) -> None:
    """Everything stored about a person, as JSON: their messages with the chats they are in, the
    twin's replies to them, their ratings and corrections, and which replies' prompts quote them."""
    from feedback.privacy import export_person

    c = ctx()
    who = identities(c, person, name)
    with c.sessions() as session:
        data = export_person(session, who)
    text = json.dumps(data, ensure_ascii=False, indent=2)
    if out is None:
        sys.stdout.write(text + "\n")
        return
    out.write_text(text + "\n", encoding="utf-8")
    counts = data["counts"]
    err_console.print(f"Wrote {out}: {counts['messages']} messages, {counts['replies_to_them']} replies to them, "
                      f"{counts['ratings']} ratings, {counts['corrections']} corrections.", highlight=False)
