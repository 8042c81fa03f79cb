"""The owner's web console: facts, conversations, feedback, learning, a playground and the status of
the twin, as server-rendered pages. ``create_console(deps)`` returns a Flask blueprint that the
composition root (``doppel serve``, ``doppel.app:create_app``) mounts at ``/`` beside the JSON API.

Every page but the sign-in needs a session: the owner signs in with the console password (default:
the API token); the session is Flask's signed cookie (HttpOnly, SameSite=Lax), its key derived from
that password, so it survives restarts and every worker agrees. Each form carries a per-session CSRF
token (fetch requests send it as ``X-CSRF-Token``); a request without it is refused with 403.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from common.errors import ConfigError, DoppelError
from console import auth, chats, facts, feedback, learning, playground, status
from console.deps import ConsoleDeps, SystemInfo
from console.retrain import Retrainer
from console.views import register_template_helpers, wants_json

__all__ = ["ConsoleDeps", "Retrainer", "SystemInfo", "create_console"]

log = logging.getLogger(__name__)

# what a console page may load: its own files only (nothing from a CDN: it works offline)
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def create_console(deps: ConsoleDeps) -> Blueprint:
    """The console as one blueprint (each page a blueprint of its own inside it).

    Raises:
        ConfigError: no password is configured; the console would be open to anyone.
    """
    if not deps.secret:
        raise ConfigError("The console has no password configured; it would be open to anyone who reaches it.",
                          hint="Set DOPPEL_CONSOLE_PASSWORD (or DOPPEL_API_TOKEN, which it defaults to) to a long "
                               "random string, e.g. `openssl rand -hex 32`.")
    here = Path(__file__).parent
    bp = Blueprint("console", __name__, template_folder=str(here / "templates"), static_folder=str(here / "static"),
                   static_url_path="/assets")

    @bp.record_once
    def _configure(state: Any) -> None:
        app = state.app
        app.secret_key = auth.session_key(deps.secret or "")
        app.config.update(SESSION_COOKIE_NAME="doppel_console", SESSION_COOKIE_HTTPONLY=True,
                          SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=deps.secure_cookie,
                          PERMANENT_SESSION_LIFETIME=timedelta(days=deps.session_days))
        register_template_helpers(app, deps)

    bp.before_request(auth.guard)

    @bp.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.endpoint != "console.static":
            response.headers["Cache-Control"] = "no-store"  # the owner's private data
        return response

    def _error(status_code: int, message: str, hint: str | None) -> Any:
        if wants_json():
            body = {"error": message, **({"hint": hint} if hint else {})}
            return jsonify(body), status_code
        return render_template("console/error.html", status=status_code, message=message, hint=hint), status_code

    @bp.errorhandler(DoppelError)
    def _doppel_error(exc: DoppelError) -> Any:
        return _error(exc.http_status, exc.message, exc.hint)

    @bp.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        hint = getattr(exc, "hint", None)
        if exc.code == 413:
            hint = "Send less at once (the limit is DOPPEL_API_MAX_BODY_BYTES)."
        return _error(exc.code or 500, exc.description or exc.name, hint)

    @bp.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("console request failed")
        return _error(500, "Something went wrong inside the console; it was logged.",
                      "Reload the page. If it happens again, the server's log says what failed.")

    for module in (auth, status, facts, chats, feedback, learning, playground):
        bp.register_blueprint(module.create(deps))
    return bp
