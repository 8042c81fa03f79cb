"""Telegram Desktop JSON exports: a single chat (`{"name", "type", "id", "messages"}`) or the full
account (`{"personal_information", "chats": {"list": [...]}, "left_chats": ...}`)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any

from trainer.ingest.jsonstream import JsonStream
from trainer.ingest.records import ChatStream, ParseStats, RawMessage, as_id, as_str, describe
from trainer.ingest.timeutil import from_iso, from_unix

PRIVATE_TYPES = {"personal_chat", "bot_chat", "saved_messages"}
MEDIA_LABELS = {
    "sticker": "sticker", "voice_message": "voice message", "video_message": "video message",
    "animation": "GIF", "video_file": "video", "audio_file": "audio",
}


def flatten_text(text: Any) -> str:
    """`text` is a string, or an array of strings and entity objects ({"type", "text", ...})."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        parts = []
        for part in text:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                parts.append(as_str(part.get("text")) or "")
        return "".join(parts)
    return ""


def _media_label(m: dict[str, Any]) -> str | None:
    if "media_type" in m:
        media_type = as_str(m["media_type"])
        return MEDIA_LABELS.get(media_type, media_type) if media_type else "media"
    for key, label in (("photo", "photo"), ("file", "file"), ("contact_information", "contact"),
                       ("location_information", "location"), ("place_name", "place"), ("poll", "poll"),
                       ("game_title", "game"), ("invoice_information", "invoice"), ("todo_list", "to-do list"),
                       ("giveaway_information", "giveaway"), ("giveaway_results", "giveaway")):
        if key in m:
            return label
    return None


_UTC = timezone.utc


def normalize(m: dict[str, Any], stats: ParseStats, local_tz: tzinfo) -> RawMessage | None:
    try:
        # The common case, kept short (it runs once per message): a plain text message with a unix
        # time. Anything else, a missing key or a bad value included, takes the careful path below.
        # Every value of another type than the writer's (a hostile or damaged file) is a miss.
        text, sender_id, sender = m["text"], m["from_id"], m["from"]
        if (text.__class__ is str and m["type"] == "message" and text.strip()
                and sender_id.__class__ is str and sender.__class__ is str
                and "forwarded_from" not in m and "edited" not in m):
            sent_at = datetime.fromtimestamp(int(m["date_unixtime"]), _UTC)
            mid, reply = m["id"], m.get("reply_to_message_id")
            if mid.__class__ is int and (reply is None or reply.__class__ is int):
                return RawMessage(sent_at, sender_id, sender, text, "text", str(mid),
                                  None if reply is None else str(reply))
    except (KeyError, ValueError, TypeError, OverflowError, OSError):
        pass
    mtype = m.get("type")
    if mtype != "message" and mtype != "service":
        stats.skip(f"unsupported message type {describe(mtype)}")
        return None
    try:
        if "date_unixtime" in m:
            sent_at = from_unix(m["date_unixtime"])
        elif "date" in m:
            sent_at = from_iso(m["date"], local_tz)
        else:
            stats.skip("no date")
            return None
    except ValueError:
        stats.skip("bad date")
        return None
    pid = as_id(m.get("id"))
    if mtype == "service":
        sender_id = as_id(m.get("actor_id")) or as_id(m.get("from_id"))
        sender_name = as_str(m.get("actor")) or as_str(m.get("from"))
        action = as_str(m.get("action")) or "service"
        return RawMessage(sent_at, sender_id, sender_name, action, "service", pid)

    text = flatten_text(m.get("text"))
    kind = "text"
    if not text.strip():
        emoji = as_str(m.get("sticker_emoji"))
        if m.get("media_type") == "sticker" and emoji:
            text = emoji  # a sticker counts as its emoji
        else:
            label = _media_label(m)
            text = f"[{label}]" if label else ""
            kind = "media" if label else "text"
    edited_at = None
    try:
        if "edited_unixtime" in m:
            edited_at = from_unix(m["edited_unixtime"])
        elif "edited" in m:
            edited_at = from_iso(m["edited"], local_tz)
    except ValueError:
        edited_at = None
    return RawMessage(
        sent_at=sent_at,
        sender_id=as_id(m.get("from_id")),
        sender_name=as_str(m.get("from")),
        text=text,
        kind=kind,
        platform_message_id=pid,
        reply_to=as_id(m.get("reply_to_message_id")),
        is_forwarded=bool(m.get("forwarded_from") or m.get("forwarded_from_id")),
        edited_at=edited_at,
    )


def parse(path: Path, stats: ParseStats, local_tz: tzinfo) -> Iterator[ChatStream]:
    with path.open("r", encoding="utf-8-sig") as fh:
        js = JsonStream(fh, name=path.name)
        meta: dict[str, Any] = {}
        for key in js.iter_object():
            if key == "personal_information":
                info = js.value()
                user_id = as_id(info.get("user_id")) if isinstance(info, dict) else None
                if user_id is not None:
                    stats.owner_hint = f"user{user_id}"
            elif key in ("chats", "left_chats"):
                yield from _chat_list_holder(js, stats, local_tz, path)
            elif key == "messages":
                yield from _emit(js, meta, stats, local_tz, path)
            elif key in ("name", "type", "id"):
                meta[key] = js.value()
            else:
                js.skip_value()
        js.at_end()


def _chat_list_holder(js: JsonStream, stats: ParseStats, local_tz: tzinfo, path: Path) -> Iterator[ChatStream]:
    if js.peek() != "{":
        js.skip_value()
        return
    for key in js.iter_object():
        if key == "list" and js.peek() == "[":
            for _ in js.iter_array():
                meta: dict[str, Any] = {}
                for ckey in js.iter_object():
                    if ckey == "messages":
                        yield from _emit(js, meta, stats, local_tz, path)
                    elif ckey in ("name", "type", "id"):
                        meta[ckey] = js.value()
                    else:
                        js.skip_value()
        else:
            js.skip_value()


def _emit(js: JsonStream, meta: dict[str, Any], stats: ParseStats, local_tz: tzinfo, path: Path) -> Iterator[ChatStream]:
    chat_id, name, chat_type = as_id(meta.get("id")), as_str(meta.get("name")), as_str(meta.get("type"))
    if chat_id is not None:
        external_id = chat_id
    elif name:
        external_id = f"name:{name}"
    else:
        external_id = f"file:{path.stem}"
    kind = "private" if chat_type in PRIVATE_TYPES or chat_type is None else "group"

    def messages() -> Iterator[RawMessage]:
        for m in js.iter_values():
            if m.__class__ is not dict and not isinstance(m, dict):
                stats.skip("not a message object")
                continue
            msg = normalize(m, stats, local_tz)
            if msg is not None:
                yield msg

    it = messages()
    yield ChatStream("telegram", external_id, name, kind, it)
    for _ in it:  # drain what the consumer left, so the stream stays in step
        pass
