"""Facebook Messenger JSON (`message_1.json`, `message_2.json`, ... of one thread, newest first).

Meta writes UTF-8 bytes as ``\\u00XX`` escapes ("mojibake"); every string is repaired. Each file
is small (Meta splits threads at 10,000 messages), so one thread is read whole and sorted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import InputError
from trainer.ingest.records import ChatStream, ParseStats, RawMessage


def fix_mojibake(value: str) -> str:
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path.name} is not valid UTF-8.", hint="Re-download the Messenger export.") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}); the file looks truncated or damaged.",
            hint="Re-download the Messenger export; nothing from this file was stored.",
        ) from None
    if not isinstance(data, dict) or "messages" not in data:
        raise InputError(f"{path.name} is not a Messenger thread file (no 'messages').")
    return data


def normalize(m: dict[str, Any], stats: ParseStats) -> RawMessage | None:
    try:
        sent_at = datetime.fromtimestamp(int(m["timestamp_ms"]) / 1000, timezone.utc)
    except (KeyError, ValueError, TypeError, OverflowError):
        stats.skip("no date")
        return None
    sender = fix_mojibake(m.get("sender_name") or "") or None
    text = fix_mojibake(m.get("content") or "")
    kind = "text"
    if m.get("is_unsent"):
        stats.skip("unsent message")
        return None
    if m.get("type") in ("Call", "Subscribe", "Unsubscribe") or "call_duration" in m:
        return RawMessage(sent_at, sender, sender, m.get("type", "call"), "service")
    if not text.strip():
        for key, label in (("photos", "photo"), ("videos", "video"), ("gifs", "GIF"), ("audio_files", "audio"),
                           ("files", "file"), ("sticker", "sticker"), ("share", "link")):
            if m.get(key):
                text, kind = f"[{label}]", "media"
                break
    is_forwarded = False
    return RawMessage(sent_at, sender, sender, text, kind, None, None, is_forwarded)


def parse_thread(paths: list[Path], stats: ParseStats) -> Iterator[ChatStream]:
    """All files of one thread become one chat, oldest message first."""
    title = None
    thread = None
    participants: list[str] = []
    collected: list[RawMessage] = []
    for path in sorted(paths):
        data = _load(path)
        title = title or fix_mojibake(data.get("title") or "") or None
        thread = thread or data.get("thread_path")
        participants = participants or [fix_mojibake(p.get("name", "")) for p in data.get("participants", [])]
        for m in data["messages"]:
            msg = normalize(m, stats) if isinstance(m, dict) else None
            if msg is not None:
                collected.append(msg)
    collected.sort(key=lambda r: r.sent_at)  # files are newest-first
    external_id = thread or f"dir:{paths[0].parent.name}:{','.join(sorted(participants))}"
    kind = "private" if len(participants) <= 2 else "group"
    yield ChatStream("messenger", external_id, title or ", ".join(participants) or None, kind, iter(collected))
