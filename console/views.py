"""Helpers the console's pages share: content negotiation, safe redirects, and what every template
gets (the CSRF token, the navigation, time and rating formatting)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, request, url_for
from markupsafe import Markup, escape

NAV = (("console.status.index", "Status"), ("console.facts.index", "Facts"), ("console.chats.index", "Conversations"),
       ("console.feedback.index", "Feedback"), ("console.learning.index", "Learning"),
       ("console.playground.index", "Playground"))

RATER = "console:owner"  # who rates and corrects from the console (bots use "telegram:<user id>" and so on)


def wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return request.is_json or best == "application/json"


def safe_next(target: str | None, default: str) -> str:
    """Only a path on this site: never an absolute URL (an open redirect would sign people in elsewhere)."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def page_arg(name: str = "page") -> int:
    try:
        return max(1, int(request.args.get(name, 1)))
    except ValueError:
        return 1


def when(value: datetime | None) -> str:
    """A stored (UTC) time in the server's local time."""
    if value is None:
        return "—"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    seconds = ((now or datetime.now(timezone.utc)) - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            text = f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "in a moment" if future else "just now"


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 chat``, ``2,000 chats``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def rating_mark(value: int | None) -> str:
    return {1: "👍", -1: "👎", 0: "withdrawn"}.get(value if value is not None else 99, "")


def time_tag(value: datetime | None) -> Markup:
    if value is None:
        return Markup("—")
    iso = value.isoformat() if value.tzinfo else value.replace(tzinfo=timezone.utc).isoformat()
    return Markup(f'<time datetime="{escape(iso)}" title="{escape(when(value))}">{escape(ago(value))}</time>')


def _asset_version(static: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(static.glob("*")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()[:8]


def register_template_helpers(app: Flask, deps: Any) -> None:
    from console.auth import csrf_token, signed_in

    version = _asset_version(Path(__file__).parent / "static")
    app.jinja_env.filters.update(when=when, ago=ago, rating=rating_mark, time=time_tag, count=count)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        if not (request.blueprint or "").startswith("console"):
            return {}
        return {"csrf_token": csrf_token, "nav": NAV, "signed_in": signed_in(), "asset_version": version,
                "persona": getattr(getattr(getattr(deps.agent, "config", None), "persona", None), "name", "the twin"),
                "url_for": url_for}
