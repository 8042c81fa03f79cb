"""Keeping the configured secrets out of what a process writes, installed by its composition root
(``AppContext``): log records, uncaught tracebacks, stored rows, HTTP responses.

Every configured secret value (``*_token``, ``console_password``, the database password) goes into
``common.secrets.redactor``; then:

- every log record is redacted as it is made (a record factory, so it holds for every logger and
  handler, the libraries' included: aiogram logs a failed request with the server's answer, which
  can quote the URL, and the URL carries the Telegram token);
- an uncaught exception's traceback is printed redacted (``sys.excepthook``, ``threading.excepthook``);
- rows are redacted before they are written (``feedback.privacy.guard_rows``), so neither a
  message, a prompt, a reply nor a run's error keeps a secret someone pasted into a chat;
- HTTP responses are redacted before they leave (``guard_responses``, for the API and the console).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any

from common.secrets import redact, redactor

log = logging.getLogger(__name__)
_SECRET_FIELDS = ("api_token", "console_password", "telegram_token", "discord_token")
_installed = False


def secret_values(settings: Any) -> list[str]:
    """The configured secrets, as plain strings."""
    values = [s.get_secret_value() for s in (getattr(settings, f, None) for f in _SECRET_FIELDS) if s is not None]
    try:
        from sqlalchemy.engine import make_url

        password = make_url(settings.resolved_database_url).password
        if password:
            values.append(str(password))
    except Exception:  # an unparseable URL is reported where it is used
        pass
    return values


def protect(settings: Any) -> None:
    """Register ``settings``' secrets and install the guards (once per process; the secrets of the
    latest settings win)."""
    short = redactor.set_values(secret_values(settings))
    _install()
    for field in _SECRET_FIELDS:
        value = getattr(settings, field, None)
        if value is not None and value.get_secret_value() in short:
            log.warning("DOPPEL_%s is shorter than 8 characters: too short to be kept out of logs, and easy to "
                        "guess. Use a long random value, e.g. `openssl rand -hex 32`.", field.upper())


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from feedback.privacy import guard_rows

    guard_rows()
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def redact_record(record: logging.LogRecord) -> None:
    """The record's message, traceback and stack without secrets (formatted now, once, where one
    is found)."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports that itself
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        if clean != text:  # the formatted, redacted traceback stands in for the exception itself
            record.exc_info, record.exc_text = None, clean
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))


def guard_responses(app: Any) -> None:
    """Redact every text response of the Flask ``app`` (the API's JSON, the console's pages and
    their error pages) before it leaves."""

    @app.after_request
    def _no_secrets(response: Any) -> Any:
        if response.direct_passthrough or response.is_streamed:
            return response
        mimetype = response.mimetype or ""
        if not (mimetype.startswith("text/") or mimetype.endswith("json") or mimetype.endswith("javascript")):
            return response
        body = response.get_data(as_text=True)
        clean = redact(body)
        if clean != body:
            response.set_data(clean)
        return response
