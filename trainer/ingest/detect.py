"""Which parser reads a file: decided from its first bytes, or forced with --format."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import tzinfo
from pathlib import Path

from common.errors import InputError
from trainer.ingest import discord, messenger, telegram, whatsapp
from trainer.ingest.records import ChatStream, ParseStats

FORMATS = ("telegram", "discord", "discord-txt", "messenger", "whatsapp")
_HEAD_BYTES = 64 * 1024


def detect(path: Path) -> str:
    try:
        head = path.open("rb").read(_HEAD_BYTES)
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror}.") from None
    if not head.strip():
        raise InputError(f"{path} is empty.", hint="Export the chat again.")
    text = head.decode("utf-8-sig", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("{"):
        if re.search(r'"guild"\s*:', text) and re.search(r'"channel"\s*:', text):
            return "discord"
        if re.search(r'"(sender_name|timestamp_ms|participants)"\s*:', text):
            return "messenger"
        if re.search(r'"(personal_information|chats|date_unixtime|from_id|text_entities)"\s*:', text) or re.search(
            r'"type"\s*:\s*"(message|service|personal_chat|private_group|private_supergroup)"', text
        ):
            return "telegram"
        if len(head) < _HEAD_BYTES:  # the whole file was read: a cut-off or malformed one says so here
            import io

            from trainer.ingest.jsonstream import JsonStream

            JsonStream(io.StringIO(text), name=path.name).value()
        raise InputError(
            f"{path.name} is JSON, but not an export Doppel knows.",
            hint=f"Supported: Telegram Desktop, DiscordChatExporter, Messenger JSON; force one with --format ({', '.join(FORMATS)}).",
        )
    if stripped.startswith(discord.RULE):
        return "discord-txt"
    for line in text.translate(whatsapp._MARKS).splitlines()[:50]:
        if whatsapp._match(line):
            return "whatsapp"
    raise InputError(
        f"{path.name}: unknown export format.",
        hint=f"Supported: Telegram/Discord/Messenger JSON and WhatsApp/Discord text; force one with --format ({', '.join(FORMATS)}).",
    )


def expand(paths: list[Path]) -> list[list[Path]]:
    """Files to ingest, each a unit (Messenger's message_N.json of one thread form one unit)."""
    units: list[list[Path]] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path} does not exist.")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".txt"))
            if not files:
                raise InputError(f"{path} holds no .json or .txt export files.")
        else:
            files = [path]
        threads: dict[Path, list[Path]] = {}
        for f in files:
            if re.fullmatch(r"message_\d+\.json", f.name):
                threads.setdefault(f.parent, []).append(f)
            else:
                units.append([f])
        units.extend(threads.values())
    return units


def open_unit(files: list[Path], fmt: str | None, stats: ParseStats, local_tz: tzinfo) -> tuple[str, Iterator[ChatStream]]:
    fmt = fmt or detect(files[0])
    if fmt not in FORMATS:
        raise InputError(f"Unknown format {fmt!r}.", hint=f"Use one of: {', '.join(FORMATS)}.")
    if fmt == "messenger":
        return fmt, messenger.parse_thread(files, stats)
    if len(files) != 1:
        raise InputError(f"Only Messenger threads span several files; got {len(files)} {fmt} files together.")
    path = files[0]
    if fmt == "telegram":
        return fmt, telegram.parse(path, stats, local_tz)
    if fmt == "discord":
        return fmt, discord.parse_json(path, stats, local_tz)
    if fmt == "discord-txt":
        return fmt, discord.parse_txt(path, stats, local_tz)
    return fmt, whatsapp.parse(path, stats, local_tz)
