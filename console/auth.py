"""Signing in and out, the session, and the CSRF check every state-changing request passes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from werkzeug.exceptions import Forbidden, TooManyRequests, Unauthorized

from console.deps import ConsoleDeps
from console.views import safe_next, wants_json

SIGNED_IN = "signed_in"
CSRF = "csrf"
OPEN_ENDPOINTS = {"console.auth.login", "console.static"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
MAX_FAILURES = 10  # wrong passwords from one address within FAILURE_WINDOW_S, then a pause
FAILURE_WINDOW_S = 300.0


def session_key(secret: str) -> str:
    """Flask's signing key, derived from the password: sessions survive a restart and every worker
    agrees, and changing the password signs everyone out."""
    return hmac.new(secret.encode("utf-8"), b"doppel console session key v1", hashlib.sha256).hexdigest()


def csrf_token() -> str:
    token = session.get(CSRF)
    if not token:
        token = session[CSRF] = secrets.token_urlsafe(32)
    return str(token)


def signed_in() -> bool:
    return bool(session.get(SIGNED_IN))


def _csrf_ok() -> bool:
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get(CSRF) or ""
    return bool(sent) and bool(expected) and hmac.compare_digest(str(sent).encode(), str(expected).encode())


class _Refused(Unauthorized):
    hint = "Sign in on the console's sign-in page first."


class _BadCsrf(Forbidden):
    hint = "Reload the page and send the form again (the page may have been open since before a restart or a sign-out)."


def guard() -> Any:
    """Before every console request: a session for every page but the sign-in, and the CSRF token
    on every request that changes something."""
    if request.endpoint not in OPEN_ENDPOINTS and not signed_in():
        if request.method in SAFE_METHODS and not wants_json():
            return redirect(url_for("console.auth.login", next=request.full_path.rstrip("?")))
        raise _Refused("You are not signed in to the console.")
    if request.method not in SAFE_METHODS and not _csrf_ok():
        raise _BadCsrf("The request was refused: its CSRF token is missing or wrong, so it may not come from "
                       "a page of this console.")
    return None


class _Failures:
    """Wrong passwords per address, to slow down guessing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}

    def blocked(self, who: str) -> bool:
        with self._lock:
            q = self._seen.get(who)
            now = time.monotonic()
            while q and now - q[0] > FAILURE_WINDOW_S:
                q.popleft()
            return bool(q) and len(q) >= MAX_FAILURES

    def add(self, who: str) -> None:
        with self._lock:
            self._seen.setdefault(who, deque()).append(time.monotonic())

    def clear(self, who: str) -> None:
        with self._lock:
            self._seen.pop(who, None)


def create(deps: ConsoleDeps) -> Blueprint:
    bp = Blueprint("auth", __name__)
    failures = _Failures()
    secret = (deps.secret or "").encode("utf-8")

    @bp.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        target = safe_next(request.values.get("next"), url_for("console.status.index"))
        if request.method == "GET":
            if signed_in():
                return redirect(target)
            return render_template("console/login.html", next=target)
        who = request.remote_addr or "?"
        if failures.blocked(who):
            raise TooManyRequests("Too many wrong passwords from this address; wait five minutes and try again.")
        given = request.form.get("password", "").encode("utf-8")
        if not given or not hmac.compare_digest(given, secret):
            failures.add(who)
            return render_template("console/login.html", next=target,
                                   error="Wrong password. It is DOPPEL_CONSOLE_PASSWORD, or the API token "
                                         "(DOPPEL_API_TOKEN) when no console password is set."), 401
        failures.clear(who)
        session.clear()  # a fresh session (and CSRF token) on every sign-in
        session[SIGNED_IN] = True
        session.permanent = True
        csrf_token()
        return redirect(target)

    @bp.post("/logout")
    def logout() -> Any:
        session.clear()
        flash("Signed out.", "ok")
        return redirect(url_for("console.auth.login"))

    return bp
