"""The error vocabulary of Doppel.

Every package raises one of these; each face (the CLI, the bot error handler, the HTTP error
handler) translates them to a message in one place. A message says what happened *and what to do*.
"""

from __future__ import annotations


class DoppelError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1
    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class ConfigError(DoppelError):
    """A setting has a bad value, or the config file cannot be read."""

    exit_code = 2


class DatabaseError(DoppelError):
    """The database cannot be reached, or its schema does not match the code."""

    exit_code = 3
    http_status = 503


class InputError(DoppelError):
    """Input the user handed us (an export, a facts file, a request) is malformed."""

    exit_code = 4


class NotFoundError(DoppelError):
    """Something named by the user does not exist."""

    exit_code = 5
    http_status = 404


class PermissionDenied(DoppelError):
    """The caller may not do this."""

    exit_code = 6
    http_status = 403


class BusyError(DoppelError):
    """The model is busy; the request waited longer than its timeout."""

    exit_code = 7
    http_status = 503


class ModelError(DoppelError):
    """The model or an adapter cannot be loaded or run."""

    exit_code = 8
    http_status = 500
