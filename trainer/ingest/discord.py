"""DiscordChatExporter exports: JSON (`{"guild", "channel", "messages"}`) and plain text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from common.errors import InputError
from trainer.ingest.jsonstream import JsonStream
from trainer.ingest.records import ChatStream, ParseStats, RawMessage, as_id, as_str
from trainer.ingest.timeutil import from_iso, localize

TEXT_TYPES = {"Default", "Reply", "ThreadStarterMessage"}
PRIVATE_CHANNELS = {"DirectTextChat"}


def _obj(value: Any) -> dict[str, Any]:
    """A value that should be an object: itself, else an empty one."""
    return value if isinstance(value, dict) else {}


def normalize(m: dict[str, Any], stats: ParseStats, local_tz: tzinfo) -> RawMessage | None:
    try:
        sent_at = from_iso(m.get("timestamp"), local_tz)
    except ValueError:
        stats.skip("no date")
        return None
    author = _obj(m.get("author"))
    name = as_str(author.get("nickname")) or as_str(author.get("name"))
    mtype = m.get("type", "Default")
    if mtype.__class__ is not str:
        mtype = "Default"
    text = as_str(m.get("content")) or ""
    kind = "text"
    if mtype not in TEXT_TYPES:
        kind, text = "service", mtype
    elif not text.strip():
        stickers = m.get("stickers")
        if stickers and isinstance(stickers, list):
            sticker = as_str(_obj(stickers[0]).get("name")) or ""
            text, kind = f"[sticker {sticker}]".replace(" ]", "]"), "media"
        elif m.get("attachments"):
            text, kind = "[attachment]", "media"
        elif m.get("embeds"):
            text, kind = "[embed]", "media"
    edited_at = None
    edited = m.get("timestampEdited")
    if edited:
        try:
            edited_at = from_iso(edited, local_tz)
        except ValueError:
            pass  # the message stands; only when it was edited is unknown
    ref = _obj(m.get("reference"))
    return RawMessage(
        sent_at=sent_at,
        sender_id=as_id(author.get("id")),
        sender_name=name,
        text=text,
        kind=kind,
        platform_message_id=as_id(m.get("id")),
        reply_to=as_id(ref.get("messageId")) or None,
        is_forwarded=bool(m.get("forwardedMessage") or ref.get("type") == "Forward"),
        edited_at=edited_at,
    )


def parse_json(path: Path, stats: ParseStats, local_tz: tzinfo) -> Iterator[ChatStream]:
    with path.open("r", encoding="utf-8-sig") as fh:
        js = JsonStream(fh, name=path.name)
        guild: dict[str, Any] = {}
        channel: dict[str, Any] = {}
        for key in js.iter_object():
            if key == "guild":
                guild = _obj(js.value())
            elif key == "channel":
                channel = _obj(js.value())
            elif key == "messages":
                title = as_str(channel.get("name"))
                guild_name = as_str(guild.get("name"))
                if guild_name and guild_name != "Direct Messages" and title:
                    title = f"{guild_name} / #{title}"
                kind = "private" if as_str(channel.get("type")) in PRIVATE_CHANNELS else "group"
                external_id = as_id(channel.get("id")) or f"file:{path.stem}"

                def messages() -> Iterator[RawMessage]:
                    for m in js.iter_values():
                        msg = normalize(m, stats, local_tz) if isinstance(m, dict) else None
                        if msg is not None:
                            yield msg

                it = messages()
                yield ChatStream("discord", external_id, title, kind, it)
                for _ in it:
                    pass
            else:
                js.skip_value()
        js.at_end()


# --- plain-text export (PlainTextMessageWriter) ---
RULE = "=" * 62
_HEADER = re.compile(r"^\[(?P<date>[^\]]+)\] (?P<author>.+?)(?P<pinned> \(pinned\))?$")
_BLOCK = re.compile(r"^\{(Attachments|Embed|Stickers|Reactions|Forwarded Message)\}$")
_DATE_FORMATS = (
    "%m/%d/%Y %I:%M %p", "%d/%m/%Y %I:%M %p", "%m/%d/%Y %H:%M", "%d/%m/%Y %H:%M", "%d.%m.%Y %H:%M",
    "%Y-%m-%d %H:%M", "%d-%b-%y %I:%M %p", "%d-%b-%y %H:%M", "%m/%d/%Y %I:%M:%S %p", "%d/%m/%Y %H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
)


def _parse_txt_date(value: str, formats: list[str], local_tz: tzinfo) -> datetime | None:
    for i, fmt in enumerate(formats):
        try:
            dt = datetime.strptime(value, fmt)
        except ValueError:
            continue
        if i:  # keep the format that worked first, files use one format throughout
            formats.insert(0, formats.pop(i))
        try:
            return localize(dt, local_tz)
        except ValueError:  # the year 1 or 9999 pushed past the calendar by the zone
            return None
    return None


def _read_lines(path: Path) -> Iterator[str]:
    try:
        with path.open("r", encoding="utf-8-sig") as fh:
            yield from fh
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path.name} is not valid UTF-8 (bad byte near byte {exc.start}).",
            hint="DiscordChatExporter writes UTF-8; export the channel again.",
        ) from None


def parse_txt(path: Path, stats: ParseStats, local_tz: tzinfo) -> Iterator[ChatStream]:
    lines = _read_lines(path)
    try:
        guild = channel = None
        first = next(lines, "").rstrip("\n")
        if first != RULE:
            raise InputError(f"{path.name} is not a DiscordChatExporter text export (no header rule).")
        for line in lines:
            line = line.rstrip("\n")
            if line == RULE:
                break
            if line.startswith("Guild: "):
                guild = line[7:]
            elif line.startswith("Channel: "):
                channel = line[9:]
        formats = list(_DATE_FORMATS)
        title = f"{guild} / {channel}" if guild and guild != "Direct Messages" else channel

        def messages() -> Iterator[RawMessage]:
            current: dict[str, Any] | None = None
            body: list[str] = []
            in_block = False
            for raw in lines:
                line = raw.rstrip("\n")
                header = _HEADER.match(line) if not line.startswith(" ") else None
                dt = _parse_txt_date(header["date"], formats, local_tz) if header else None
                if header and dt is not None:
                    if current is not None:
                        yield _txt_message(current, body)
                    current, body, in_block = {"at": dt, "author": header["author"]}, [], False
                    continue
                if current is None:
                    continue
                if _BLOCK.match(line):
                    in_block = True
                    current.setdefault("blocks", []).append(line)
                    continue
                if in_block:
                    continue
                body.append(line)
            if current is not None:
                yield _txt_message(current, body)

        def _txt_message(cur: dict[str, Any], body: list[str]) -> RawMessage:
            text = "\n".join(body).strip("\n")
            kind = "text"
            if not text.strip() and cur.get("blocks"):
                text, kind = "[attachment]", "media"
            author = cur["author"]
            return RawMessage(cur["at"], author, author.split("#")[0], text, kind)

        it = messages()
        yield ChatStream("discord", f"txt:{guild or ''}/{channel or path.stem}", title, "group", it)
        for _ in it:
            pass
    finally:
        lines.close()
