"""Conversations: every chat the twin has seen (Telegram, Discord, HTTP, the terminal, the
playground, and ingested exports), each with the twin's replies; for each reply the facts it used,
the adapter version, the latency and its ratings. Rating and correcting a reply here writes the same
records as a reaction or ``/better`` (``Agent.rate`` / ``Agent.correct``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flask import Blueprint, flash, jsonify, redirect, render_template, request, url_for

from common.errors import DoppelError, InputError, NotFoundError
from console import queries
from console.deps import ConsoleDeps
from console.views import RATER, ago, page_arg, rating_mark, safe_next, wants_json
from feedback.models import Chat, Message


class FactNames:
    """Fact ids -> facts of the index serving now, rebuilt only when the index changes."""

    def __init__(self, kb: Any) -> None:
        self.kb = kb
        self._index: Any = None
        self._by_id: dict[str, Any] = {}

    def __call__(self) -> dict[str, Any]:
        if self.kb is None:
            return {}
        try:
            index = self.kb.current()
        except DoppelError:
            return self._by_id
        if index is not self._index:
            self._index, self._by_id = index, {f.id: f for f in index.facts}
        return self._by_id


def thread(messages: list[Any], replies: dict[int, list[queries.ReplyView]]) -> list[dict[str, Any]]:
    """Messages in order, each followed by the twin's replies to it. The twin's own copy of a reply
    (stored as a message, for the context) is left out where its reply card is shown."""
    shown = Counter(r.text for rs in replies.values() for r in rs)
    items = []
    for m in messages:
        if m.source == "twin" and shown[m.text] > 0:
            shown[m.text] -= 1
            continue
        items.append({"message": m, "replies": replies.get(m.id, [])})
    return items


def rate_or_correct_response(deps: ConsoleDeps, reply_id: int, message: str) -> Any:
    if wants_json():
        with deps.sessions() as session:
            found = queries.reply_view(session, reply_id)
        view = found[0] if found else None
        return jsonify({"reply_id": reply_id, "message": message,
                        "ratings": [{"rater": r.rater_id, "value": r.value, "mark": rating_mark(r.value),
                                     "ago": ago(r.updated_at)} for r in (view.ratings if view else [])]})
    flash(message, "ok")
    target = safe_next(request.form.get("next"), url_for("console.chats.reply", reply_id=reply_id))
    return redirect(f"{target.split('#')[0]}#reply-{reply_id}")


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("chats", __name__)
    fact_names = FactNames(deps.knowledge)

    @bp.get("/chats")
    def index() -> Any:
        platform = request.args.get("platform", "").strip() or None
        page = page_arg()
        with deps.sessions() as session:
            rows, total = queries.list_chats(session, platform, page)
            platforms = queries.platforms(session)
        return render_template("console/chats.html", rows=rows, total=total, page=page, per_page=queries.PAGE,
                               platform=platform or "", platforms=platforms)

    @bp.get("/chats/<int:chat_id>")
    def chat(chat_id: int) -> Any:
        before = request.args.get("before", type=int)
        with deps.sessions() as session:
            row = session.get(Chat, chat_id)
            if row is None:
                raise NotFoundError(f"No conversation {chat_id}.", hint="Pick one from the list of conversations.")
            messages, older = queries.chat_messages(session, chat_id, before)
            replies = queries.replies_to(session, [m.id for m in messages])
        return render_template("console/chat.html", chat=row, items=thread(messages, replies), older=older,
                               before=before, facts=fact_names(), rater=RATER)

    @bp.get("/replies/<int:reply_id>")
    def reply(reply_id: int) -> Any:
        with deps.sessions() as session:
            found = queries.reply_view(session, reply_id)
            if found is None:
                raise NotFoundError(f"No reply {reply_id}.", hint="Pick one from a conversation or the feedback list.")
            view, row = found
            chat = session.get(Chat, row.chat_id)
            incoming = row.in_reply_to_id and session.get(Message, row.in_reply_to_id)
        return render_template("console/reply.html", r=view, prompt=row.prompt, chat=chat, incoming=incoming or None,
                               facts=fact_names(), rater=RATER)

    @bp.post("/replies/<int:reply_id>/rating")
    def rate(reply_id: int) -> Any:
        raw = request.form.get("value")
        if raw is None and request.is_json:
            raw = (request.get_json(silent=True) or {}).get("value")
        value = {"1": 1, "up": 1, "👍": 1, "-1": -1, "down": -1, "👎": -1, "0": 0, "none": 0}.get(str(raw))
        if value is None:
            raise InputError("A rating is 👍 (1), 👎 (-1) or 0 to withdraw it.")
        deps.agent.rate(reply_id, RATER, value)
        return rate_or_correct_response(deps, reply_id, f"Rated reply {reply_id} {rating_mark(value)}."
                                        if value else f"Withdrew your rating of reply {reply_id}.")

    @bp.post("/replies/<int:reply_id>/correction")
    def correct(reply_id: int) -> Any:
        text = request.form.get("text", "")
        if not text.strip():
            raise InputError("A correction needs the text the reply should have been.",
                             hint="Write what you would have said, then send it.")
        deps.agent.correct(reply_id, RATER, text)
        return rate_or_correct_response(deps, reply_id, f"Recorded your correction of reply {reply_id}.")

    return bp
