"""Timestamps: exports mix unix seconds, ISO strings with and without offsets, and local times.

Each function raises ``ValueError`` and nothing else for a value that is not a time it can place
between the years 1 and 9999 in UTC (a string that is no date, a number out of range, a value of
another JSON type): the parsers skip such a message as "bad date"."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from typing import Any

_UTC = timezone.utc


def from_unix(value: Any) -> datetime:
    """Unix seconds, as an integer or a string of one."""
    try:
        return datetime.fromtimestamp(int(value), _UTC)
    except (TypeError, OverflowError, OSError) as exc:  # int(None), int(inf), out of the platform's range
        raise ValueError(f"not a unix time: {value!r:.40}") from exc


def from_unix_ms(value: Any) -> datetime:
    """Unix milliseconds (Messenger)."""
    try:
        return datetime.fromtimestamp(int(value) / 1000, _UTC)
    except (TypeError, OverflowError, OSError) as exc:
        raise ValueError(f"not a unix time in milliseconds: {value!r:.40}") from exc


def from_iso(value: Any, local_tz: tzinfo) -> datetime:
    """ISO 8601; a value without an offset is in ``local_tz`` (the exporting machine's zone)."""
    if not isinstance(value, str):
        raise ValueError(f"not an ISO 8601 time: {value!r:.40}")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=local_tz)
    try:
        return dt.astimezone(_UTC)
    except OverflowError as exc:  # "0001-01-01T00:00+05:00" is in the year 0 in UTC
        raise ValueError(f"{value!r:.40} is outside the years 1 to 9999 in UTC") from exc


def localize(dt: datetime, local_tz: tzinfo) -> datetime:
    """A naive local time (a text export's) in UTC."""
    try:
        return dt.replace(tzinfo=local_tz).astimezone(_UTC)
    except OverflowError as exc:
        raise ValueError(f"{dt} is outside the years 1 to 9999 in UTC") from exc
