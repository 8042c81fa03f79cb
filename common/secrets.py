"""Secrets kept out of everything a run writes: log lines, tracebacks, error pages, stored texts.

The process has one ``Redactor``. The composition root (``doppel/``) fills it with the configured
secret values (tokens, passwords); it also knows the shape of bot tokens, so a token that reaches a
chat (a BotFather message in the owner's export, a token pasted to the twin) is not stored either.
Everything else asks it through ``redact``. Nothing here knows where the secrets come from.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from urllib.parse import quote

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 8  # a shorter value would blank out ordinary words; such a secret is too weak anyway

# Telegram bot tokens (123456789:AA… 35 characters) and Discord bot tokens (three base64url parts)
_TELEGRAM = r"(?<![\w-])\d{6,12}:[A-Za-z0-9_-]{30,}(?![\w-])"
_DISCORD = r"(?<![\w.-])[MNO][A-Za-z0-9_-]{23,27}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,}(?![\w.-])"
_TELEGRAM_RE, _DISCORD_RE = re.compile(_TELEGRAM), re.compile(_DISCORD)


class Redactor:
    """Replaces the registered secret values, and anything shaped like a bot token, with ``[REDACTED]``."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def set_values(self, values: Iterable[str | None]) -> list[str]:
        """Keep ``values`` (and their URL-encoded forms) out of what is written, instead of the ones
        set before. Returns the values too short to redact (``MIN_SECRET_CHARS``) and so ignored."""
        keep: set[str] = set()
        short = []
        for v in values:
            if not v:
                continue
            if len(v) < MIN_SECRET_CHARS:
                short.append(v)
                continue
            keep.update({v, quote(v, safe=""), quote(v)})
        with self._lock:
            self._values = tuple(sorted(keep, key=len, reverse=True))  # longest first: no half-replaced value
        return short

    @property
    def active(self) -> bool:
        return bool(self._values)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        n = len(text)  # cheap tests first: this runs on every message ingested, and most are short
        if n >= 37 and ":" in text:
            text = _TELEGRAM_RE.sub(REDACTED, text)
        if n >= 59 and text.count(".") >= 2:
            text = _DISCORD_RE.sub(REDACTED, text)
        return text


redactor = Redactor()


def redact(text: str) -> str:
    """``text`` without any secret the process knows of."""
    return redactor(text)
