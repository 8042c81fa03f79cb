"""`doppel bot telegram | discord` and `doppel feedback list`."""

from __future__ import annotations

import json
import logging
from typing import Any

import typer
from rich.table import Table

from doppel.cli import app, console, ctx

bot_app = typer.Typer(help="Run the twin as a Telegram or Discord bot.", no_args_is_help=True)
feedback_app = typer.Typer(help="Ratings and corrections people gave the twin's replies.", no_args_is_help=True)
app.add_typer(bot_app, name="bot")
app.add_typer(feedback_app, name="feedback")
log = logging.getLogger(__name__)


def bot_core(c: Any, agent: Any, max_chars: int) -> Any:
    from bots.core import BotCore, PermissionConfig, Permissions

    s = c.settings
    cfg = PermissionConfig(owners=set(s.bot_owners), allow_users=set(s.bot_allow_users), block_users=set(s.bot_block_users),
                           allow_chats=set(s.bot_allow_chats), block_chats=set(s.bot_block_chats),
                           allow_roles=set(s.bot_allow_roles), mode=s.bot_mode,
                           rate_limit_per_minute=s.bot_rate_limit_per_minute)
    perms = Permissions(cfg, s.data_dir / "permissions.json")
    from doppel.privacy_cmd import forget_files

    return BotCore(agent, perms, positive=s.reactions_positive, negative=s.reactions_negative, max_message_chars=max_chars,
                   people=s.people, forget_files=forget_files(c))


def owner_notifier(c: Any) -> Any:
    s = c.settings
    if s.telegram_token is None or not s.bot_owners:
        return None
    from bots.notify import telegram_notifier

    return telegram_notifier(s.telegram_token.get_secret_value(), s.telegram_api_url, s.bot_owners)


def _warn_if_nobody(c: Any) -> None:
    s = c.settings
    if not s.bot_owners:
        console.print("[yellow]No owners set (DOPPEL_BOT_OWNERS): nobody can use /facts or /permissions.[/]")
    if s.bot_mode == "closed" and not (s.bot_owners or s.bot_allow_users or s.bot_allow_chats or s.bot_allow_roles):
        console.print("[yellow]Closed mode with empty allow lists: the twin will refuse everyone. "
                      "Set DOPPEL_BOT_OWNERS (your user id) or DOPPEL_BOT_MODE=open.[/]")


def _start(platform: str, token: Any, hint: str, max_chars: int) -> tuple[Any, Any, str]:
    """The settings, a BotCore over a loaded agent, and the token; a missing token is a message."""
    from common.errors import ConfigError
    from doppel.agent_cmd import _load_agent

    if token is None:
        raise ConfigError(f"No {platform} token is set.", hint=hint)
    c, agent = _load_agent(None)
    _warn_if_nobody(c)
    return c, bot_core(c, agent, max_chars), token.get_secret_value()


@bot_app.command("telegram")
def bot_telegram() -> None:
    """Run the Telegram bot (token from DOPPEL_TELEGRAM_TOKEN; Bot API URL from DOPPEL_TELEGRAM_API_URL)."""
    import asyncio

    from bots.telegram import TELEGRAM_LIMIT, check_token, run_telegram

    s = ctx().settings
    if s.telegram_token is not None:  # a wrong token or URL is a message now, not after the model has loaded
        asyncio.run(check_token(s.telegram_token.get_secret_value(), s.telegram_api_url))
    c, core, token = _start("Telegram", s.telegram_token,
                            "Get one from @BotFather and set DOPPEL_TELEGRAM_TOKEN.", TELEGRAM_LIMIT)
    console.print("Telegram bot starting (Ctrl-C stops it after the reply in progress).")
    try:
        asyncio.run(run_telegram(core, token, c.settings.telegram_api_url, buttons=c.settings.telegram_buttons))
    except KeyboardInterrupt:
        pass
    console.print("Telegram bot stopped.")


@bot_app.command("discord")
def bot_discord() -> None:
    """Run the Discord bot (token from DOPPEL_DISCORD_TOKEN)."""
    from bots.discord_bot import DISCORD_LIMIT, make_client

    _, core, token = _start("Discord", ctx().settings.discord_token,
                            "Create a bot application and set DOPPEL_DISCORD_TOKEN.", DISCORD_LIMIT)
    console.print("Discord bot starting (Ctrl-C stops it).")
    make_client(core).run(token, log_handler=None)  # reconnects by itself
    console.print("Discord bot stopped.")


@feedback_app.command("list")
def feedback_list(
    limit: int = typer.Option(50, "--limit", help="How many of the latest."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The ratings and corrections collected, with the reply and the message it answered."""
    from sqlalchemy import select

    from feedback.models import Chat, Correction, Message, Rating, Reply

    c = ctx()
    rows: list[dict[str, Any]] = []
    with c.sessions() as session:
        def row(kind: str, value: Any, by: str, at: Any, reply: Reply, chat: Chat) -> dict[str, Any]:
            asked = session.get(Message, reply.in_reply_to_id) if reply.in_reply_to_id else None
            return {"kind": kind, "value": value, "by": by, "at": at, "reply_id": reply.id, "reply": reply.text,
                    "message": asked.text if asked else None, "chat": f"{chat.platform}:{chat.external_id}",
                    "adapter_version": reply.adapter_version}

        for r, reply, chat in session.execute(select(Rating, Reply, Chat).join(Reply, Rating.reply_id == Reply.id)
                                              .join(Chat, Reply.chat_id == Chat.id)
                                              .order_by(Rating.updated_at.desc()).limit(limit)):
            rows.append(row("rating", r.value, r.rater_id, r.updated_at, reply, chat))
        for corr, reply, chat in session.execute(select(Correction, Reply, Chat).join(Reply, Correction.reply_id == Reply.id)
                                                 .join(Chat, Reply.chat_id == Chat.id)
                                                 .order_by(Correction.created_at.desc()).limit(limit)):
            rows.append(row("correction", corr.text, corr.author_id, corr.created_at, reply, chat))
    rows.sort(key=lambda r: r["at"], reverse=True)
    if as_json:
        for row in rows[:limit]:
            print(json.dumps(row, default=str, ensure_ascii=False))
        return
    if not rows:
        console.print("No ratings or corrections yet.")
        return
    table = Table("when", "rating", "by", "message", "reply", title="Feedback")
    for row in rows[:limit]:
        value = row["value"]
        shown = {1: "👍", -1: "👎", 0: "(withdrawn)"}.get(value, f"✎ {value}") if row["kind"] == "rating" else f"✎ {value}"
        table.add_row(row["at"].strftime("%Y-%m-%d %H:%M"), shown, row["by"], (row["message"] or "")[:60], row["reply"][:60])
    console.print(table)
