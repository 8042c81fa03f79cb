"""The HTTP face of the agent (Flask). ``create_app`` takes the agent and the facts it serves; the
composition root (``doppel serve``, or ``doppel.app:create_app`` for a WSGI server) builds them.

The routes under ``/api/`` and ``/metrics`` need ``Authorization: Bearer <token>``, except the
OpenAPI description at ``/api/openapi.json`` (``agent/openapi.py``); other paths belong to whoever
else is mounted on the app (the owner's console signs in with a session). Every error is JSON,
``{"error": what happened, "hint": what to do}``, whatever went wrong: a body too large, not JSON,
of the wrong shape, an unknown route or id, a wrong method, a bug (never a traceback or a page).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge, UnsupportedMediaType

from agent.openapi import MAX_MESSAGE_ID_CHARS, MAX_NAME_CHARS, MAX_ROW_ID, openapi_document
from agent.service import Agent
from common.errors import DoppelError, InputError, NotFoundError, PermissionDenied

log = logging.getLogger(__name__)

OPENAPI_PATH = "/api/openapi.json"
_SEE_SPEC = f"See GET {OPENAPI_PATH} for the routes and what each takes."
_HINTS = {  # for an error raised without a hint of its own
    400: _SEE_SPEC,
    401: "Send the header 'Authorization: Bearer <DOPPEL_API_TOKEN>'.",
    403: "Ask the owner of this server.",
    404: _SEE_SPEC,
    415: "Send the body as JSON, with the header 'Content-Type: application/json'.",
    500: "Try again; if it keeps failing, the server's log says what failed.",
    503: "Try again in a moment.",
}
# NUL (PostgreSQL refuses it) and unpaired surrogates ("\ud800" in JSON: no database can encode them)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class ApiConfig:
    token: str | None  # None: every /api route is refused (the server must not be open by accident)
    max_body_bytes: int = 1_000_000


def server_options(config: ApiConfig, threads: int = 4) -> dict[str, Any]:
    """waitress settings for serving the app. waitress buffers a body (up to 1 GB by default, to a
    temporary file) before the app sees it; past a few times the app's own limit it now refuses the
    request itself, so a hostile client cannot fill the disk or hold a thread. Bodies between the two
    limits still reach the app, which answers 413 as JSON with the limit in its hint."""
    return {"threads": threads, "max_request_body_size": max(4 * config.max_body_bytes, 1 << 20),
            "max_request_header_size": 64 * 1024, "channel_timeout": 60}


def _error(status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": message, "hint": hint or _HINTS.get(status, _SEE_SPEC)})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _string(data: dict[str, Any], key: str, *, default: str | None = None, max_chars: int = MAX_NAME_CHARS,
            numbers: bool = False) -> str | None:
    """A string field of the body (or, with ``numbers``, an integer id, as a string) that the
    database can store; ``default`` when it is absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if numbers and type(value) in (int, float) and value == value // 1 and -MAX_ROW_ID - 1 <= value <= MAX_ROW_ID:
        value = str(int(value))  # JSON Schema counts 12.0 as an integer, and so do clients
    if not isinstance(value, str):
        want = "a string or an integer" if numbers else "a string"
        raise InputError(f"'{key}' must be {want}, not {_type(value)}.", hint=_SEE_SPEC)
    if len(value) > max_chars:
        raise InputError(f"'{key}' is {len(value)} characters long; it may be at most {max_chars}.")
    _storable(key, value)
    return value


def _storable(what: str, value: str) -> None:
    bad = _UNSTORABLE.search(value)
    if bad:
        raise InputError(f"'{what}' holds the character U+{ord(bad.group()):04X} at position {bad.start()}, "
                         "which cannot be stored.", hint="Send text without NUL or unpaired surrogates.")


def _flag(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"'{key}' must be true or false, not {_type(value)}.")
    return value


def _chat_id(chat_id: str) -> str:
    if len(chat_id) > MAX_NAME_CHARS:
        raise InputError(f"The chat id is {len(chat_id)} characters long; it may be at most {MAX_NAME_CHARS}.")
    _storable("chat_id", chat_id)
    return chat_id


def _header_bytes(value: str) -> bytes:
    """A header's bytes as the client sent them (WSGI hands them on decoded as Latin-1), so that a
    token with non-ASCII characters, sent in UTF-8, compares equal."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not from a WSGI server (a test client given any string)
        return value.encode("utf-8")


def _reply_id(reply_id: int) -> int:
    if reply_id > MAX_ROW_ID:  # no row has it, and the database cannot even look for it
        raise NotFoundError(f"No reply {reply_id}.", hint="Use the reply_id of a reply the twin sent.")
    return reply_id


def create_app(agent: Agent, knowledge: Any | None, config: ApiConfig) -> Flask:
    app = Flask("doppel")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    spec = openapi_document(config.max_body_bytes, agent.config.max_input_chars)
    max_chars = agent.config.max_input_chars

    @app.before_request
    def _auth() -> Any:
        if not (request.path.startswith("/api/") or request.path == "/metrics") or request.path == OPENAPI_PATH:
            return None  # /healthz and the description are open; the console's pages check their own session
        if not config.token:
            return _error(503, "The API has no token configured.", "Set DOPPEL_API_TOKEN and restart.")
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(_header_bytes(given), config.token.encode("utf-8")):
            return _error(401, "Missing or wrong bearer token.", _HINTS[401])
        return None

    @app.errorhandler(DoppelError)
    def _doppel_error(exc: DoppelError) -> Any:
        if exc.http_status >= 500:
            agent.metrics.observe_error()
        return _error(exc.http_status, exc.message, exc.hint)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = exc.code or 500
        headers = {}
        hint = None
        if code == 413:
            hint = f"Send at most {config.max_body_bytes} bytes."
        elif isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            allowed = sorted(exc.valid_methods)
            headers["Allow"] = ", ".join(allowed)
            hint = f"{request.path} takes {' or '.join(m for m in allowed if m not in ('HEAD', 'OPTIONS'))}."
        elif code == 404:
            hint = _SEE_SPEC if request.path.startswith("/api/") else "Nothing is served at this address."
        return _error(code, exc.description or exc.name, hint, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        agent.metrics.observe_error()
        log.exception("request failed")
        return _error(500, "Something went wrong inside the twin; it was logged.")

    def _body() -> bytes:
        """The request's body; 413 past ``max_body_bytes``. Werkzeug checks a Content-Length, but stops
        reading a body without one (chunked, as gunicorn passes it on; waitress buffers it and sets a
        Content-Length) at the limit without a word, and gives what it read as the whole: a facts
        file cut short."""
        data = request.get_data(cache=True)
        if request.content_length is None and len(data) >= config.max_body_bytes:
            if request.environ["wsgi.input"].read(1):  # more was sent than was read
                raise RequestEntityTooLarge()
        return data

    def _json() -> dict[str, Any]:
        if not request.is_json:
            given = request.mimetype or "no Content-Type"
            raise UnsupportedMediaType(f"The body must be JSON (application/json), not {given}.")
        raw = _body()
        example = 'For example {"text": "hi", "sender": "Bob"}.'
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
                             hint=example) from None
        except ValueError as exc:  # not UTF-8, or a number of over 4,300 digits
            raise InputError(f"The body is not valid JSON: {str(exc).split(';')[0]}.", hint=example) from None
        except RecursionError:
            raise InputError("The body nests arrays or objects too deeply.", hint=example) from None
        if not isinstance(data, dict):
            raise InputError(f"The body must be a JSON object, not {_type(data)}.", hint=example)
        return data

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok", "adapter_version": agent.runtime.adapter_version})

    @app.get(OPENAPI_PATH)
    def openapi() -> Any:
        return jsonify(spec)

    @app.post("/api/chats/<chat_id>/messages")
    def post_message(chat_id: str) -> Any:
        chat_id = _chat_id(chat_id)
        data = _json()
        text = data.get("text")
        if not isinstance(text, str):
            raise InputError("'text' (a string) is required." if text is None else
                             f"'text' must be a string, not {_type(text)}.", hint='For example {"text": "hi"}.')
        if not text.strip():
            raise InputError("The message is empty.", hint="Send some text for the twin to answer.")
        if len(text) > max_chars:
            raise InputError(f"The message is {len(text)} characters; the twin reads at most {max_chars}.",
                             hint="Send a shorter message.")
        _storable("text", text)
        sender = _string(data, "sender", default="someone") or "someone"
        sender_id = _string(data, "sender_id", numbers=True)
        message_id = _string(data, "message_id", max_chars=MAX_MESSAGE_ID_CHARS, numbers=True)
        with_prompt = _flag(data, "include_prompt", False)
        if not _flag(data, "reply", True):
            agent.observe(chat_id, sender, text, platform="http", sender_id=sender_id, message_id=message_id)
            return jsonify({"stored": True}), 202
        reply = agent.reply(chat_id, sender, text, platform="http", sender_id=sender_id, message_id=message_id)
        return jsonify(reply.to_dict(with_prompt=with_prompt)), 201

    @app.post("/api/chats/<chat_id>/reset")
    def reset_chat(chat_id: str) -> Any:
        agent.reset(_chat_id(chat_id), platform="http")
        return jsonify({"chat_id": chat_id, "reset": True})

    @app.post("/api/replies/<int:reply_id>/rating")
    def rate(reply_id: int) -> Any:
        reply_id = _reply_id(reply_id)
        data = _json()
        value = data.get("value")
        if isinstance(value, str):
            value = {"up": 1, "+": 1, "👍": 1, "down": -1, "-": -1, "👎": -1, "none": 0}.get(value, value)
        if value not in (-1, 0, 1) or isinstance(value, bool):
            raise InputError("'value' must be 1 (👍), -1 (👎) or 0 (withdraw).",
                             hint='For example {"value": 1, "rater": "bob"}.')
        value = int(value)
        rater = _string(data, "rater", default="http") or "http"
        changed = agent.rate(reply_id, rater, value)
        return jsonify({"reply_id": reply_id, "rater": rater, "value": value, "changed": changed})

    @app.post("/api/replies/<int:reply_id>/correction")
    def correction(reply_id: int) -> Any:
        reply_id = _reply_id(reply_id)
        data = _json()
        text = _string(data, "text", default="", max_chars=1 << 30) or ""
        author = _string(data, "author", default="http") or "http"
        agent.correct(reply_id, author, text)
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
            _storable("text", body)
            raw = body.encode("utf-8")
        elif request.mimetype.startswith("text/"):
            raw = _body()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("The facts file must be UTF-8 text; nothing was changed.") from None
        else:
            raise UnsupportedMediaType(f"The facts file must be sent as text/markdown (or JSON {{\"text\": ...}}), "
                                       f"not {request.mimetype or 'without a Content-Type'}; nothing was changed.")
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
