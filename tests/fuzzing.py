"""Hostile export files for the parsers, and the checks every one of them must pass.

Shared by ``tests/test_fuzz.py`` (a fast, derandomized run) and ``bench/fuzz.py`` (minutes of it).
Inputs are the real corpus files (``tests/corpus``) mutated, structure-aware (values of the wrong
type, deleted or duplicated keys, huge strings and numbers, deep nesting, impossible dates, lone
surrogates, NUL) and byte by byte (flips, truncation, splices, BOMs, invalid UTF-8), plus exports
generated from scratch. The contract: a parser either gives rows the database will take, or raises
a clear ``InputError``; nothing else. A refused file leaves the database exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from common.errors import InputError

UTC = timezone.utc
# the exporting machine's zone: the far ends of the offsets find dates that overflow on conversion
ZONES: tuple[tzinfo, ...] = (UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12)))
FORMATS = ("telegram", "discord", "discord-txt", "messenger", "whatsapp")
FILE_NAMES = {"telegram": "result.json", "discord": "channel.json", "discord-txt": "channel.txt",
              "messenger": "message_1.json", "whatsapp": "WhatsApp Chat with Fuzz.txt"}
OWNER = "Me"  # the owner every generated export writes as

RULE = "=" * 62
DISCORD_TXT_SAMPLE = (
    f"{RULE}\nGuild: Direct Messages\nChannel: alice\nTopic: plans\n{RULE}\n\n"
    "[1/4/2019 5:52 PM] alice#1234\nhello there\nsecond line\n\n"
    "[1/4/2019 5:53 PM] Me\n\n{Attachments}\nhttps://cdn.example/x.png\n\n"
    "[1/4/2019 5:54 PM] Me (pinned)\nhi!\n\n"
    "[1/5/2019 9:01 AM] alice#1234\nsee you\n{Reactions}\n👍 (1)\n\n"
    f"{RULE}\nExported 4 message(s)\n{RULE}\n"
)


# --- the corpus -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seed:
    """A well-formed export to mutate, with the speaker who is the owner in it."""

    fmt: str
    name: str
    data: bytes
    me: str


def seeds(corpus: Path) -> dict[str, list[Seed]]:
    """The corpus files by format, each with an owner picked from its own speakers."""
    from trainer.ingest.rows import list_speakers

    out: dict[str, list[Seed]] = {f: [] for f in FORMATS}
    files = sorted(p for p in corpus.rglob("*") if p.suffix in (".json", ".txt")) if corpus.is_dir() else []
    for path in files:
        fmt = path.parent.name
        if fmt in out:
            out[fmt].append(_seed(fmt, path.name, path.read_bytes(), list_speakers))
    out["discord-txt"].append(Seed("discord-txt", "sample.txt", DISCORD_TXT_SAMPLE.encode(), "Me"))
    return out


def _seed(fmt: str, name: str, data: bytes, list_speakers: Callable[..., Any]) -> Seed:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FILE_NAMES[fmt]
        path.write_bytes(data)
        speakers, hint = list_speakers([path], fmt, UTC)
    return Seed(fmt, name, data, hint or (speakers[0].key if speakers else OWNER))


# --- JSON with duplicate keys and raw tokens ----------------------------------------------------
@dataclass
class Obj:
    """A JSON object as its list of pairs: keys may repeat, as they can in a hostile file."""

    pairs: list[list[Any]]


@dataclass(frozen=True)
class Raw:
    """Text written into the JSON as it is: a 5,000-digit number, 100,000 open brackets, NaN."""

    text: str


def load_tree(data: bytes) -> Any:
    return json.loads(data.decode("utf-8-sig"), object_pairs_hook=lambda pairs: Obj([list(p) for p in pairs]))


def dump_tree(value: Any, *, ascii_only: bool, indent: int | None) -> str:
    out: list[str] = []
    _dump(value, out, ascii_only, indent, 0)
    return "".join(out)


def _dump(v: Any, out: list[str], ascii_only: bool, indent: int | None, depth: int) -> None:
    nl = "" if indent is None else "\n" + " " * (indent * (depth + 1))
    end = "" if indent is None else "\n" + " " * (indent * depth)
    sep = ", " if indent is None else ","
    if isinstance(v, Raw):
        out.append(v.text)
    elif isinstance(v, Obj):
        if not v.pairs:
            out.append("{}")
            return
        out.append("{")
        for i, (k, item) in enumerate(v.pairs):
            out.append((sep if i else "") + nl + json.dumps(k, ensure_ascii=ascii_only) + ": ")
            _dump(item, out, ascii_only, indent, depth + 1)
        out.append(end + "}")
    elif isinstance(v, list):
        if not v:
            out.append("[]")
            return
        out.append("[")
        for i, item in enumerate(v):
            out.append((sep if i else "") + nl)
            _dump(item, out, ascii_only, indent, depth + 1)
        out.append(end + "]")
    else:
        out.append(json.dumps(v, ensure_ascii=ascii_only))  # NaN and Infinity too, as Python writes them


def copy_tree(v: Any) -> Any:
    if isinstance(v, Obj):
        return Obj([[k, copy_tree(x)] for k, x in v.pairs])
    if isinstance(v, list):
        return [copy_tree(x) for x in v]
    return v


def paths(v: Any, at: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Every place in the tree: a path of indexes (into an object's pairs or an array)."""
    yield at
    if isinstance(v, Obj):
        for i, (_, x) in enumerate(v.pairs):
            yield from paths(x, (*at, i))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from paths(x, (*at, i))


def _container(tree: Any, path: tuple[int, ...]) -> tuple[Any, int]:
    """The object or array holding the value at ``path`` (non-empty), and its index there."""
    node = tree
    for i in path[:-1]:
        node = node.pairs[i][1] if isinstance(node, Obj) else node[i]
    return node, path[-1]


# --- hostile values ---------------------------------------------------------------------------
NASTY_STRINGS = [
    "", " ", "\n", "\x00", "a\x00b", "\ud800", "x\udfffy", "\ufeff", "\u200e\u202e", "\r\n", "null", "NaN",
    "💩" * 3, "ё" * 20, "\\u0000", "user", "user1", "<script>", "🤓:", "a" * 70, "9" * 80, "0", "-1", "1e999",
    # dates: impossible, out of range, at the ends of the calendar, or not dates at all
    "2020-02-30T10:00:00", "2020-13-01T00:00:00", "0001-01-01T00:00:00+05:00", "0001-01-01T00:00:00",
    "9999-12-31T23:59:59-12:00", "9999-12-31T23:59:59", "2024-01-01T25:61:61", "2024-01-01T10:00:00Z",
    "2024-01-01T10:00:00.1234567+00:00", "20240101", "1700000000", "-62135596800", "253402300800",
    "99999999999999999999", "1.5", "yesterday",
]
KNOWN_KEYS = {
    "telegram": ["id", "type", "date", "date_unixtime", "edited", "edited_unixtime", "from", "from_id", "actor",
                 "actor_id", "action", "text", "text_entities", "media_type", "sticker_emoji", "photo", "file",
                 "forwarded_from", "forwarded_from_id", "reply_to_message_id", "poll", "name", "messages",
                 "personal_information", "user_id", "chats", "list", "left_chats"],
    "discord": ["id", "type", "timestamp", "timestampEdited", "content", "author", "name", "nickname",
                "stickers", "attachments", "embeds", "reference", "messageId", "forwardedMessage", "guild",
                "channel", "messages"],
    "messenger": ["sender_name", "timestamp_ms", "content", "type", "is_unsent", "call_duration", "photos",
                  "sticker", "share", "participants", "name", "title", "thread_path", "messages"],
}


@functools.cache
def hostile_values() -> st.SearchStrategy[Any]:
    """Values of every JSON type, odd ones first in line (built once: building it costs more than drawing)."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.sampled_from(NASTY_STRINGS),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**20, 253402300800, -62135596801, 10**15]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from([Raw("1" * 5000), Raw("-" + "9" * 4400), Raw("1e999"), Raw("-Infinity"), Raw("NaN"),
                         Raw("[" * 5000 + "]" * 5000), Raw('{"a":' * 3000 + "1" + "}" * 3000),
                         Raw('"' + "x" * 300_000 + '"'), Raw("0.0000000000000000000000001")]),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(st.sampled_from(sum(KNOWN_KEYS.values(), [])), inner), max_size=3)
        .map(lambda ps: Obj([list(p) for p in ps])),
    ), max_leaves=6)


@st.composite
def mutated_json(draw: st.DrawFn, seed: Seed) -> bytes:
    """The seed's JSON with a few structural edits, written out in a random style."""
    tree = copy_tree(load_tree(seed.data))
    keys = KNOWN_KEYS.get(seed.fmt, [])
    for _ in range(draw(st.integers(1, 4))):
        places = list(paths(tree))[1:]
        if not places:
            break
        path = draw(st.sampled_from(places))
        holder, i = _container(tree, path)
        op = draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "add_key", "nest", "empty"]))
        if op == "replace":
            value = draw(hostile_values())
            if isinstance(holder, Obj):
                holder.pairs[i][1] = value
            else:
                holder[i] = value
        elif op == "delete":
            del (holder.pairs if isinstance(holder, Obj) else holder)[i]
        elif op == "duplicate":  # a key twice (the last one wins in Python), or an element twice
            seq = holder.pairs if isinstance(holder, Obj) else holder
            item = seq[i]
            twin = [item[0], draw(hostile_values())] if isinstance(holder, Obj) and draw(st.booleans()) else copy_tree(item)
            seq.insert(draw(st.integers(0, len(seq))), twin)
        elif op == "add_key":
            target = holder if isinstance(holder, Obj) else None
            value = holder.pairs[i][1] if isinstance(holder, Obj) else holder[i]
            target = value if isinstance(value, Obj) else target
            if target is not None and keys:
                target.pairs.append([draw(st.sampled_from(keys)), draw(hostile_values())])
        elif op == "nest":  # the value wrapped in arrays / objects
            value = holder.pairs[i][1] if isinstance(holder, Obj) else holder[i]
            for _ in range(draw(st.integers(1, 3))):
                value = [value] if draw(st.booleans()) else Obj([["text", value]])
            if isinstance(holder, Obj):
                holder.pairs[i][1] = value
            else:
                holder[i] = value
        else:  # an empty container where one was
            empty = draw(st.sampled_from([[], Obj([]), "", None]))
            if isinstance(holder, Obj):
                holder.pairs[i][1] = empty
            else:
                holder[i] = empty
    return draw(json_style(tree))


@st.composite
def json_style(draw: st.DrawFn, tree: Any) -> bytes:
    text = dump_tree(tree, ascii_only=draw(st.booleans()), indent=draw(st.sampled_from([None, None, 1, 2])))
    # a lone surrogate written raw is not UTF-8 at all: the decoder must say so
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ["utf-8-sig", "utf-16", "utf-16-le", "latin-1"]))
    if encoding.startswith("utf-8"):
        return text.encode(encoding, "surrogatepass")
    return text.encode(encoding, "replace")


# --- byte and line mutations ----------------------------------------------------------------
SPLICES = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\n", b'"', b"{", b"[", b"]",
           b"}", b",", b":", b"\\", b"\\u", b'\\ud800"', b"1e999", b"-", b"9" * 50, b"[" * 3000, b"null", b"true",
           "\u202e".encode(), "\u200e".encode(), b"\t", b" " * 100, b"\xe2\x80", b"NaN", b"0x1F"]


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, max_ops: int = 4) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(buf)
        op = draw(st.sampled_from(["flip", "truncate", "delete", "copy", "splice", "splice", "replace"]))
        pos = draw(st.integers(0, n))
        if op == "flip" and n:
            p = min(pos, n - 1)
            buf[p] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 64))]
        elif op == "copy" and n:
            start = draw(st.integers(0, n - 1))
            chunk = bytes(buf[start:start + draw(st.integers(1, 256))])
            buf[pos:pos] = chunk * draw(st.integers(1, 3))
        elif op == "splice":
            buf[pos:pos] = draw(st.sampled_from(SPLICES))
        elif op == "replace":
            buf[pos:pos + draw(st.integers(1, 8))] = draw(st.sampled_from(SPLICES))
    return bytes(buf)


_TEXT_DATE_PARTS = st.integers(0, 13).map(str) | st.sampled_from(["00", "31", "32", "99", "0000", "2024", "9999",
                                                                  "1", "29", "30", "366", "12345"])


@st.composite
def header_line(draw: st.DrawFn, fmt: str) -> str:
    """A WhatsApp or Discord text message line with any numbers in its date."""
    d1, d2, d3 = draw(_TEXT_DATE_PARTS), draw(_TEXT_DATE_PARTS), draw(_TEXT_DATE_PARTS)
    h, mi, s = draw(st.integers(0, 99)), draw(st.integers(0, 99)), draw(st.integers(0, 99))
    ampm = draw(st.sampled_from(["", " AM", " PM", " p. m.", "\u202fPM", "am"]))
    sep = draw(st.sampled_from(["/", ".", "-"]))
    sender = draw(st.sampled_from([OWNER, "Bo", "", " ", "🤓", "a:b", "x" * 300, "+1 555 0100"]))
    text = draw(st.sampled_from(NASTY_STRINGS) | st.text(max_size=20))
    if fmt == "discord-txt":
        return f"[{d1}{sep}{d2}{sep}{d3} {h}:{mi:02d}{ampm}] {sender}\n{text}"
    if draw(st.booleans()):
        return f"[{d1}{sep}{d2}{sep}{d3}, {h}:{mi:02d}:{s:02d}{ampm}] {sender}: {text}"
    return f"{d1}{sep}{d2}{sep}{d3}, {h}:{mi:02d}{ampm} - {sender}: {text}"


@st.composite
def mutated_lines(draw: st.DrawFn, seed: Seed) -> bytes:
    lines = seed.data.decode("utf-8-sig").splitlines()
    for _ in range(draw(st.integers(1, 4))):
        n = len(lines)
        pos = draw(st.integers(0, n))
        op = draw(st.sampled_from(["header", "header", "delete", "duplicate", "nasty", "long", "swap"]))
        if op == "header":
            lines.insert(pos, draw(header_line(seed.fmt)))
        elif op == "delete" and n:
            del lines[min(pos, n - 1)]
        elif op == "duplicate" and n:
            lines.insert(pos, lines[draw(st.integers(0, n - 1))])
        elif op == "nasty":
            lines.insert(pos, draw(st.sampled_from(NASTY_STRINGS)))
        elif op == "long":
            lines.insert(pos, "x" * draw(st.sampled_from([70_000, 300_000])))
        elif op == "swap" and n > 1:
            a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            lines[a], lines[b] = lines[b], lines[a]
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "cp1252"]))
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf-8") else "replace")


# --- exports generated from scratch ---------------------------------------------------------
def _plausible(fmt: str) -> dict[str, st.SearchStrategy[Any]]:
    names = st.sampled_from([OWNER, "Bo", "Ann", None])
    iso = st.datetimes().map(lambda d: d.isoformat()) | st.sampled_from(NASTY_STRINGS)
    unix = st.integers(-(2**40), 2**40).map(str) | st.integers(-(2**40), 2**40)
    text = st.text(max_size=30) | st.lists(st.text(max_size=5) | st.fixed_dictionaries(
        {"type": st.sampled_from(["bold", "link"]), "text": st.text(max_size=5)}), max_size=3)
    if fmt == "telegram":
        return {"id": st.integers(0, 10**6), "type": st.sampled_from(["message", "service", "unsupported"]),
                "date": iso, "date_unixtime": unix, "from": names, "from_id": st.sampled_from(["user1", "user2", None]),
                "text": text, "edited": iso, "reply_to_message_id": st.integers(0, 10),
                "media_type": st.sampled_from(["sticker", "voice_message", "weird"]), "sticker_emoji": st.text(max_size=2),
                "forwarded_from": names, "action": st.text(max_size=8), "actor": names}
    if fmt == "discord":
        return {"id": st.integers(0, 10**18).map(str), "type": st.sampled_from(["Default", "Reply", "Call"]),
                "timestamp": iso, "timestampEdited": iso | st.none(), "content": st.text(max_size=30),
                "author": st.fixed_dictionaries({"id": st.integers(0, 9).map(str), "name": names}),
                "reference": st.fixed_dictionaries({"messageId": st.integers(0, 9).map(str)}),
                "attachments": st.lists(st.just({"url": "x"}), max_size=1),
                "stickers": st.lists(st.fixed_dictionaries({"name": st.text(max_size=4)}), max_size=1)}
    return {"sender_name": names, "timestamp_ms": st.integers(-(2**50), 2**50), "content": st.text(max_size=30),
            "type": st.sampled_from(["Generic", "Call", "Share"]), "is_unsent": st.booleans(),
            "photos": st.lists(st.just({"uri": "x"}), max_size=1)}


@functools.cache
def _messages(fmt: str) -> st.SearchStrategy[list[Any]]:
    fields = _plausible(fmt)
    value = {k: s | hostile_values() if k != "type" else s for k, s in fields.items()}
    message = st.fixed_dictionaries({}, optional=value).map(lambda d: Obj([[k, v] for k, v in d.items()]))
    return st.lists(message | hostile_values(), max_size=8)


@st.composite
def generated_json(draw: st.DrawFn, fmt: str) -> bytes:
    """An export of ``fmt`` built from its keys, each value plausible or hostile."""
    messages = draw(_messages(fmt))
    if fmt == "telegram":
        chat = Obj([["name", draw(st.sampled_from(["Bo", None, 5, ["x"]]))],
                    ["type", draw(st.sampled_from(["personal_chat", "private_group", ["x"], {"a": 1}, None]))],
                    ["id", draw(st.sampled_from([1, "1", None, 2**80, [1]]))], ["messages", messages]])
        tree = chat if draw(st.booleans()) else Obj([
            ["personal_information", Obj([["user_id", draw(hostile_values())]])],
            ["chats", Obj([["list", [chat, draw(hostile_values())]]])]])
    elif fmt == "discord":
        tree = Obj([["guild", Obj([["name", draw(st.sampled_from(["G", "Direct Messages", None, 3]))]])],
                    ["channel", Obj([["id", draw(hostile_values())], ["type", draw(hostile_values())],
                                     ["name", draw(hostile_values())]])],
                    ["messages", messages]])
    else:
        participant = st.sampled_from([Obj([["name", OWNER]]), Obj([["name", "Bo"]]), Obj([]), "x", 5]) | \
            hostile_values().map(lambda v: Obj([["name", v]]))
        tree = Obj([["participants", draw(st.lists(participant, max_size=3) | hostile_values())],
                    ["title", draw(hostile_values())], ["thread_path", draw(hostile_values())],
                    ["messages", messages]])
    return draw(json_style(tree))


@st.composite
def generated_text(draw: st.DrawFn, fmt: str) -> bytes:
    lines = draw(st.lists(header_line(fmt), min_size=1, max_size=8))
    head = f"{RULE}\nGuild: {draw(st.sampled_from(['G', 'Direct Messages', '']))}\nChannel: c\n{RULE}\n\n" \
        if fmt == "discord-txt" else ""
    return (head + "\n".join(lines)).encode("utf-8", "surrogatepass")


def hostile_file(fmt: str, format_seeds: list[Seed]) -> st.SearchStrategy[tuple[bytes, str]]:
    """(file content, owner) for one format: a mutated seed, a seed broken byte by byte, or a new export."""
    texty = fmt in ("whatsapp", "discord-txt")
    by_seed = st.sampled_from(format_seeds)
    structural = by_seed.flatmap(lambda s: (mutated_lines(s) if texty else mutated_json(s)).map(lambda d: (d, s.me)))
    bytewise = by_seed.flatmap(lambda s: mutated_bytes(s.data).map(lambda d: (d, s.me)))
    both = structural.flatmap(lambda pair: mutated_bytes(pair[0], max_ops=2).map(lambda d: (d, pair[1])))
    generated = (generated_text(fmt) if texty else generated_json(fmt)).map(lambda d: (d, OWNER))
    return st.one_of(structural, structural, bytewise, both, generated)


# --- the checks ---------------------------------------------------------------------------
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


class ParserBug(AssertionError):
    """A parser broke its contract (gave a row the database would refuse, or an unclear error)."""


@contextlib.contextmanager
def chunk_chars(n: int) -> Iterator[None]:
    """Make the streaming JSON reader read ``n`` characters at a time (values then straddle chunks)."""
    from trainer.ingest.jsonstream import JsonStream

    defaults = JsonStream.__init__.__kwdefaults__
    old = defaults["chunk_chars"]
    defaults["chunk_chars"] = n
    try:
        yield
    finally:
        defaults["chunk_chars"] = old


def check_error(exc: InputError) -> None:
    if not isinstance(exc.message, str) or not exc.message.strip():
        raise ParserBug(f"an InputError without a message: {exc!r}")
    if "This is a bug" in str(exc) or "Traceback" in str(exc):
        raise ParserBug(f"an unexpected failure dressed as an InputError: {exc}")


def parse_file(path: Path, fmt: str | None, me: str, tz: tzinfo, sqlite: bool = True) -> list[Any] | InputError:
    """Everything ``ingest`` would insert for this file (chat tuples and rows), or the InputError it
    refuses the file with. Any other exception is a bug and propagates; so does a row the database
    could not store (``ParserBug``)."""
    from trainer.ingest.rows import ParseJob, Tally, parse_rows

    chats: dict[tuple[Any, ...], int] = {}

    def chat_id_for(chat: tuple[str, str, str | None, str]) -> int:
        check_chat(chat)
        return chats.setdefault(chat, len(chats) + 1)

    out: list[Any] = []
    try:
        for batch in parse_rows(ParseJob([path], me, fmt, tz, sqlite), chat_id_for, Tally()):
            for row in batch:
                check_row(row, sqlite)
            out.extend(batch)
    except InputError as exc:
        check_error(exc)
        return exc
    return [sorted(chats.items(), key=lambda kv: kv[1]), out]


def _fits(value: Any, limit: int, what: str, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    if value.__class__ is not str:
        raise ParserBug(f"{what} is {type(value).__name__} {value!r:.80}, not a string")
    if len(value) > limit:
        raise ParserBug(f"{what} is {len(value)} characters; the column holds {limit}")


def check_chat(chat: tuple[Any, ...]) -> None:
    platform, external_id, title, kind = chat
    _fits(platform, 32, "platform", nullable=False)
    _fits(external_id, 255, "chat external_id", nullable=False)
    _fits(title, 512, "chat title")
    if kind not in ("private", "group"):
        raise ParserBug(f"chat kind {kind!r}")
    for v in (external_id, title):
        if v is not None and _BAD_CHARS.search(v):
            raise ParserBug(f"chat field {v!r:.80} holds NUL or a lone surrogate")


def check_row(row: tuple[Any, ...], sqlite: bool) -> None:
    """A row as ``service._insert_sql`` binds it must fit the ``messages`` columns of both databases.
    (Lone surrogates and NUL in the row are repaired at insert time: see ``rows.scrub_rows``.)"""
    from datetime import datetime

    from trainer.ingest.rows import MAX_STORED_CHARS

    chat_id, key, pid, sid, name, is_owner, text, kind, fwd, reply_to = row[:10]
    _fits(key, 64, "dedup_key", nullable=False)
    _fits(pid, 64, "platform_message_id")
    _fits(sid, 255, "sender_id")
    _fits(name, 255, "sender_name")
    _fits(text, MAX_STORED_CHARS, "text", nullable=False)
    _fits(reply_to, 64, "reply_to")
    if is_owner.__class__ is not bool or fwd.__class__ is not bool:
        raise ParserBug(f"is_owner/is_forwarded not booleans: {is_owner!r}, {fwd!r}")
    if kind not in ("text", "media", "service"):
        raise ParserBug(f"message kind {kind!r}")
    if sqlite:
        times = [row[10:12]] + ([row[12:14]] if row[12:14] != (None, None) else [])
        for second, frac in times:
            if second.__class__ is not int or frac.__class__ is not str or not re.fullmatch(r"\.\d{6}", frac):
                raise ParserBug(f"time {second!r} {frac!r}")
            if not -62135596800 <= second <= 253402300799:
                raise ParserBug(f"time {second} is outside years 1..9999")
    else:
        for t in row[10:11] + tuple(t for t in row[11:12] if t is not None):
            if not isinstance(t, datetime) or t.tzinfo is not None:
                raise ParserBug(f"time {t!r} is not a naive UTC datetime")


# --- the database stays as it was ---------------------------------------------------------
def dump_database(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (the application's and Alembic's), in primary-key order."""
    from sqlalchemy import MetaData, select

    meta = MetaData()
    meta.reflect(engine)
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            order = list(table.primary_key.columns) or list(table.columns)
            out[table.name] = [tuple(r) for r in conn.execute(select(table).order_by(*order))]
    return out


def ingest_check(engine: Any, path: Path, fmt: str | None, me: str, tz: tzinfo, *, parser_process: bool = False,
                 before: dict[str, list[tuple[Any, ...]]] | None = None) -> str:
    """Ingest ``path`` through ``ingest_paths``; a refused file must leave every table as it was.
    Returns "accepted" or "refused"."""
    from trainer.ingest.service import IngestOptions, ingest_paths

    before = dump_database(engine) if before is None else before
    options = IngestOptions(me=me, fmt=fmt, local_tz=tz, parallel_min_bytes=0 if parser_process else 1 << 40)
    try:
        ingest_paths(engine, [path], options)
    except InputError as exc:
        check_error(exc)
        after = dump_database(engine)
        if after != before:
            changed = [t for t in before if before[t] != after.get(t)]
            raise ParserBug(f"a refused file changed the database (tables {changed})") from None
        return "refused"
    return "accepted"
