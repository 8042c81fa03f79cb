"""Facebook Messenger JSON (`message_1.json`, `message_2.json`, ... of one thread, newest first).

Meta writes UTF-8 bytes as ``\\u00XX`` escapes ("mojibake"); every string is repaired. Each file
is small (Meta splits threads at 10,000 messages), so one thread is read whole and sorted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import InputError
from trainer.ingest.records import ChatStream, ParseStats, RawMessage, as_str
from trainer.ingest.timeutil import from_unix_ms


def fix_mojibake(value: str) -> str:
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _text(value: Any) -> str:
    """A string of the file, repaired; "" for a value that is not a string."""
    return fix_mojibake(value) if value.__class__ is str else ""


def _load(path: Path) -> dict[str, Any]:
    damaged = "Re-download the Messenger export; nothing from this file was stored."
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path.name} is not valid UTF-8.", hint="Re-download the Messenger export.") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}); the file looks truncated or damaged.",
            hint=damaged,
        ) from None
    except ValueError:  # not a JSONDecodeError: Python reads no integer of more than 4,300 digits
        raise InputError(f"{path.name} is not a Messenger export (it holds a number of over 4,300 digits).",
                         hint=damaged) from None
    except RecursionError:
        raise InputError(f"{path.name} is not a Messenger export (arrays or objects nested too deeply).",
                         hint=damaged) from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputError(f"{path.name} is not a Messenger thread file (no 'messages' list).", hint=damaged)
    return data


def normalize(m: dict[str, Any], stats: ParseStats) -> RawMessage | None:
    try:
        sent_at = from_unix_ms(m["timestamp_ms"])
    except (KeyError, ValueError):
        stats.skip("no date")
        return None
    sender = _text(m.get("sender_name")) or None
    text = _text(m.get("content"))
    kind = "text"
    if m.get("is_unsent"):
        stats.skip("unsent message")
        return None
    if m.get("type") in ("Call", "Subscribe", "Unsubscribe") or "call_duration" in m:
        return RawMessage(sent_at, sender, sender, as_str(m.get("type")) or "call", "service")
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
        title = title or _text(data.get("title")) or None
        thread = thread or as_str(data.get("thread_path")) or None
        people = data.get("participants")
        if not participants and isinstance(people, list):
            participants = [_text(p.get("name")) for p in people if isinstance(p, dict)]
        for m in data["messages"]:
            msg = normalize(m, stats) if isinstance(m, dict) else None
            if msg is not None:
                collected.append(msg)
            elif not isinstance(m, dict):
                stats.skip("not a message object")
    collected.sort(key=lambda r: r.sent_at)  # files are newest-first
    external_id = thread or f"dir:{paths[0].parent.name}:{','.join(sorted(participants))}"
    kind = "private" if len(participants) <= 2 else "group"
    yield ChatStream("messenger", external_id, title or ", ".join(participants) or None, kind, iter(collected))
