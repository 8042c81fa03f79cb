"""The playground: talk to the twin from the page (chat "playground" on platform "console"), rate
its replies, reset the window."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from common.errors import DoppelError
from console import queries
from console.chats import FactNames, thread
from console.deps import ConsoleDeps
from console.views import RATER
from feedback import store

PLATFORM = "console"
CHAT = "playground"
SHOWN = 60  # messages shown (the window the twin sees is usually far shorter)


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("playground", __name__, url_prefix="/playground")
    fact_names = FactNames(deps.knowledge)

    def page(status: int = 200, error: str | None = None, text: str = "", sender: str = "") -> Any:
        window = deps.agent.config.context.window
        with deps.sessions() as session:
            chat = store.get_chat(session, PLATFORM, CHAT, create=False)
            messages: list[Any] = []
            replies: dict[int, list[queries.ReplyView]] = {}
            if chat is not None:
                messages, _ = queries.chat_messages(session, chat.id, since=chat.context_reset_at, limit=SHOWN)
                replies = queries.replies_to(session, [m.id for m in messages])
        now = datetime.now(timezone.utc)
        return render_template("console/playground.html", items=thread(messages, replies), facts=fact_names(),
                               rater=RATER, error=error, text=text, sender=sender or request.args.get("as", "friend"),
                               chat=chat, window_start=now - window, window=window), status

    @bp.get("")
    def index() -> Any:
        return page()

    @bp.post("/send")
    def send() -> Any:
        text = request.form.get("text", "")
        sender = " ".join(request.form.get("sender", "").split())[:64] or "friend"
        try:
            reply = deps.agent.reply(CHAT, sender, text, platform=PLATFORM)
        except DoppelError as exc:
            return page(exc.http_status if exc.http_status >= 500 else 422,
                        error=f"{exc.message} {exc.hint or ''}".strip(), text=text, sender=sender)
        return redirect(url_for(".index", **({"as": sender} if sender != "friend" else {})) + f"#reply-{reply.id}")

    @bp.post("/reset")
    def reset() -> Any:
        deps.agent.reset(CHAT, platform=PLATFORM)
        flash("Fresh conversation: the twin no longer sees the messages above the reset.", "ok")
        return redirect(url_for(".index"))

    return bp
