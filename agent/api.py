"""The HTTP face of the agent (Flask). ``create_app`` takes the agent and the facts it serves; the
composition root (``doppel serve``, or ``doppel.app:create_app`` for a WSGI server) builds them.

The routes under ``/api/`` and ``/metrics`` need ``Authorization: Bearer <token>``; other paths
belong to whoever else is mounted on the app (the owner's console signs in with a session). Errors are JSON:
``{"error": message, "hint": what to do}``.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from agent.service import Agent
from common.errors import DoppelError, InputError, PermissionDenied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    token: str | None  # None: every /api route is refused (the server must not be open by accident)
    max_body_bytes: int = 1_000_000


def _error(status: int, message: str, hint: str | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": message}
    if hint:
        body["hint"] = hint
    return jsonify(body), status


def create_app(agent: Agent, knowledge: Any | None, config: ApiConfig) -> Flask:
    app = Flask("doppel")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    @app.before_request
    def _auth() -> Any:
        if not (request.path.startswith("/api/") or request.path == "/metrics"):
            return None  # /healthz is open; the console's pages check their own session
        if not config.token:
            return _error(503, "The API has no token configured.", "Set DOPPEL_API_TOKEN and restart.")
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), config.token.encode()):
            return _error(401, "Missing or wrong bearer token.", "Send the header 'Authorization: Bearer <DOPPEL_API_TOKEN>'.")
        return None

    @app.errorhandler(DoppelError)
    def _doppel_error(exc: DoppelError) -> Any:
        if exc.http_status >= 500:
            agent.metrics.observe_error()
        return _error(exc.http_status, exc.message, exc.hint)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        hint = "Send at most %d bytes." % config.max_body_bytes if exc.code == 413 else None
        return _error(exc.code or 500, exc.description or exc.name, hint)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        agent.metrics.observe_error()
        log.exception("request failed")
        return _error(500, "Something went wrong inside the twin; it was logged.")

    def _json() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InputError("The body must be a JSON object.", hint='For example {"text": "hi", "sender": "Bob"}.')
        return data

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok", "adapter_version": agent.runtime.adapter_version})

    @app.post("/api/chats/<chat_id>/messages")
    def post_message(chat_id: str) -> Any:
        data = _json()
        text = data.get("text")
        if not isinstance(text, str):
            raise InputError("'text' (a string) is required.")
        sender = str(data.get("sender") or "someone")
        reply_wanted = data.get("reply", True)
        if not reply_wanted:
            agent.observe(chat_id, sender, text, platform="http", sender_id=data.get("sender_id"))
            return jsonify({"stored": True}), 202
        reply = agent.reply(chat_id, sender, text, platform="http", sender_id=data.get("sender_id"),
                            message_id=data.get("message_id"))
        return jsonify(reply.to_dict(with_prompt=bool(data.get("include_prompt")))), 201

    @app.post("/api/chats/<chat_id>/reset")
    def reset_chat(chat_id: str) -> Any:
        agent.reset(chat_id, platform="http")
        return jsonify({"chat_id": chat_id, "reset": True})

    @app.post("/api/replies/<int:reply_id>/rating")
    def rate(reply_id: int) -> Any:
        data = _json()
        value = data.get("value")
        if isinstance(value, str):
            value = {"up": 1, "+": 1, "👍": 1, "down": -1, "-": -1, "👎": -1, "none": 0}.get(value, value)
        if value not in (-1, 0, 1) or isinstance(value, bool):
            raise InputError("'value' must be 1 (👍), -1 (👎) or 0 (withdraw).")
        rater = str(data.get("rater") or "http")
        changed = agent.rate(reply_id, rater, int(value))
        return jsonify({"reply_id": reply_id, "rater": rater, "value": value, "changed": changed})

    @app.post("/api/replies/<int:reply_id>/correction")
    def correction(reply_id: int) -> Any:
        data = _json()
        agent.correct(reply_id, str(data.get("author") or "http"), str(data.get("text") or ""))
        return jsonify({"reply_id": reply_id, "recorded": True}), 201

    @app.get("/api/facts")
    def get_facts() -> Any:
        if knowledge is None:
            raise PermissionDenied("Facts are not served by this instance.")
        facts = knowledge.facts()
        text = knowledge.facts_path.read_text(encoding="utf-8") if knowledge.facts_path.exists() else ""
        return jsonify({"facts": [{"id": f.id, "topic": f.topic, "text": f.text} for f in facts], "text": text})

    @app.put("/api/facts")
    def put_facts() -> Any:
        from knowledge.facts import parse_facts, write_atomic

        if knowledge is None:
            raise PermissionDenied("Facts are not served by this instance.")
        if request.is_json:
            body = _json().get("text")
            if not isinstance(body, str):
                raise InputError("'text' (the whole facts file, Markdown) is required.")
            raw = body.encode("utf-8")
        else:
            raw = request.get_data()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("The facts file must be UTF-8 text; nothing was changed.") from None
        parsed = parse_facts(raw.decode("utf-8"))
        write_atomic(knowledge.facts_path, raw)
        report = knowledge.refresh()
        return jsonify({"facts": len(parsed.facts), "warnings": parsed.warnings,
                        "embedded": report.embedded if report else 0})

    @app.get("/metrics")
    def metrics() -> Any:
        extra = {"doppel_queue_waiting": agent.runtime.waiting}
        return Response(agent.metrics.render(extra), mimetype="text/plain; version=0.0.4")

    return app
