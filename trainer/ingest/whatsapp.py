"""WhatsApp "Export chat" text files, Android and iOS layouts.

Android: ``12/31/20, 23:55 - Name: text``; iOS: ``[31/12/2020, 23:55:01] Name: text``; 12- or
24-hour times (``PM``, ``p. m.``); dates in any order. The day/month order is decided from the whole
file: an order is impossible if a field exceeds 12, and among the possible ones the order that
keeps the messages most chronological wins."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, tzinfo
from hashlib import sha1
from pathlib import Path

from common.errors import InputError
from trainer.ingest.records import ChatStream, ParseStats, RawMessage
from trainer.ingest.timeutil import localize

_MARKS = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\ufeff"), None)
_TIME = r"(?P<h>\d{1,2})[:.](?P<mi>\d{2})(?:[:.](?P<s>\d{2}))?(?:\s?(?P<ampm>[aApP])\.?\s?[mM]\.?)?"
_DATE = r"(?P<d1>\d{1,4})[./-](?P<d2>\d{1,2})[./-](?P<d3>\d{1,4})"
ANDROID = re.compile(rf"^{_DATE},? {_TIME} [-–] (?P<rest>.*)$")
IOS = re.compile(rf"^\[{_DATE},? {_TIME}\] (?P<rest>.*)$")
SENDER = re.compile(r"^(?P<sender>[^:\n]{1,100}?):(?: (?P<text>.*)|(?P<tight>\S.*)|)$", re.S)
SYSTEM_PHRASES = (
    "end-to-end encrypted", "end-to-end encryption", "created group", "created this group", "added you",
    " added ", " removed ", " left", "changed the subject", "changed this group's", "changed the group",
    "joined using this group's invite link", "security code changed", "changed their phone number",
    "You were added", "deleted this group's icon", "is a contact", "disappearing messages",
)
MEDIA_TEXTS = {"<media omitted>", "<Media omitted>", "image omitted", "video omitted", "audio omitted",
               "sticker omitted", "GIF omitted", "document omitted", "Contact card omitted"}
DELETED_TEXTS = {"This message was deleted", "You deleted this message", "Waiting for this message"}
ENCRYPTION_NOTICE = "messages and calls are end-to-end encrypted"


def _match(line: str) -> re.Match[str] | None:
    return IOS.match(line) or ANDROID.match(line)


def _read_lines(path: Path) -> Iterator[str]:
    try:
        with path.open("r", encoding="utf-8-sig", newline=None) as fh:
            for line in fh:
                yield line.rstrip("\n").translate(_MARKS)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path.name} is not valid UTF-8 (bad byte near byte {exc.start}).",
            hint="WhatsApp writes UTF-8; convert the file (e.g. iconv -f cp1252 -t utf-8).",
        ) from None


def _first_pass(path: Path) -> tuple[str, bool]:
    """Decide the date order ('ymd', 'dmy' or 'mdy') and whether the chat is a group."""
    triples: list[tuple[int, int, int, int]] = []
    twelve = False
    senders: set[str] = set()
    group = False
    for line in _read_lines(path):
        m = _match(line)
        if not m:
            continue
        sender, text, kind = _classify(m["rest"])
        if sender:
            senders.add(sender)
        elif "group" in text:
            group = True
        h, mi = int(m["h"]), int(m["mi"])
        triples.append((int(m["d1"]), int(m["d2"]), int(m["d3"]), h * 60 + mi))
        twelve = twelve or bool(m["ampm"])
    if not triples:
        raise InputError(f"{path.name}: no WhatsApp message lines found.", hint="Is this a WhatsApp chat export?")
    group = group or len(senders) > 2
    if any(len(str(t[0])) == 4 or t[0] > 31 for t in triples):
        return "ymd", group
    candidates = []
    if all(t[1] <= 12 for t in triples):
        candidates.append("dmy")
    if all(t[0] <= 12 for t in triples):
        candidates.append("mdy")
    if not candidates:
        raise InputError(f"{path.name}: dates fit neither day/month nor month/day order.")
    if len(candidates) == 1:
        return candidates[0], group

    def inversions(order: str) -> int:
        keys = [((t[2], t[1], t[0]) if order == "dmy" else (t[2], t[0], t[1]), t[3]) for t in triples]
        return sum(1 for a, b in zip(keys, keys[1:]) if b < a)

    dmy, mdy = inversions("dmy"), inversions("mdy")
    if dmy != mdy:
        return ("dmy" if dmy < mdy else "mdy"), group
    return ("mdy" if twelve else "dmy"), group  # a tie: US locales use 12-hour clocks


def _timestamp(m: re.Match[str], order: str, local_tz: tzinfo) -> datetime:
    a, b, c = int(m["d1"]), int(m["d2"]), int(m["d3"])
    y, mo, d = (a, b, c) if order == "ymd" else (c, b, a) if order == "dmy" else (c, a, b)
    if y < 100:
        y += 2000
    h = int(m["h"])
    if m["ampm"]:
        pm = m["ampm"].lower() == "p"
        h = (h % 12) + (12 if pm else 0)
    return localize(datetime(y, mo, d, h, int(m["mi"]), int(m["s"] or 0)), local_tz)  # ValueError if impossible


def _classify(rest: str) -> tuple[str | None, str, str]:
    """(sender, text, kind) for the part of a header line after the timestamp."""
    if ENCRYPTION_NOTICE in rest.lower() or "messages you send to this group are now secured" in rest.lower():
        return None, rest, "service"
    sm = SENDER.match(rest)
    if sm:
        sender = sm["sender"].strip()
        text = sm["text"] if sm["text"] is not None else (sm["tight"] or "")
        return sender, text, "text"
    return None, rest, "service"


def _finish(sender: str | None, text: str, kind: str) -> tuple[str, str]:
    stripped = text.strip()
    if kind == "text":
        if stripped in MEDIA_TEXTS or stripped.endswith(" omitted") and len(stripped) < 30:
            return "[media]", "media"
        if stripped in DELETED_TEXTS:
            return stripped, "service"
        if stripped.startswith("Location: http"):
            return "[location]", "media"
    return text, kind


def parse(path: Path, stats: ParseStats, local_tz: tzinfo) -> Iterator[ChatStream]:
    order, group = _first_pass(path)
    title = None
    stem = path.stem
    for prefix in ("WhatsApp Chat with ", "WhatsApp Chat - ", "Chat de WhatsApp con "):
        if stem.startswith(prefix):
            title = stem[len(prefix):]
    first_line = next((ln for ln in _read_lines(path) if _match(ln)), "")
    external_id = f"title:{title}" if title else "first:" + sha1(first_line.encode()).hexdigest()[:16]

    def messages() -> Iterator[RawMessage]:
        cur: tuple[datetime, str | None, str] | None = None
        body: list[str] = []
        for line in _read_lines(path):
            m = _match(line)
            if m:
                if cur is not None:
                    yield _make(cur, body)
                try:
                    at = _timestamp(m, order, local_tz)
                except ValueError:
                    stats.skip("bad date")
                    cur, body = None, []
                    continue
                sender, text, kind = _classify(m["rest"])
                cur, body = (at, sender, kind), [text]
            elif cur is not None:
                body.append(line)  # a continuation line of a multi-line message
            elif line.strip():
                stats.skip("text before the first message")
        if cur is not None:
            yield _make(cur, body)

    def _make(cur: tuple[datetime, str | None, str], body: list[str]) -> RawMessage:
        at, sender, kind = cur
        text, kind = _finish(sender, "\n".join(body).rstrip(), kind)
        return RawMessage(at, sender, sender, text, kind)

    yield ChatStream("whatsapp", external_id, title, "group" if group else "private", messages())
