"""Timestamps: exports mix unix seconds, ISO strings with and without offsets, and local times."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo


def from_unix(value: str | int | float) -> datetime:
    return datetime.fromtimestamp(int(value), timezone.utc)


def from_iso(value: str, local_tz: tzinfo) -> datetime:
    """ISO 8601; a value without an offset is in ``local_tz`` (the exporting machine's zone)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=local_tz)
    return dt.astimezone(timezone.utc)
