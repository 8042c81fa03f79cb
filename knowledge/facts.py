"""The facts file: plain Markdown the owner edits by hand.

Headings are topics; each bullet (``-``, ``*``, ``+``, ``1.``) or paragraph under a heading is one
fact. Indented lines continue the bullet above them. HTML comments (``<!-- ... -->``) and fenced code
blocks are ignored, so a file can carry instructions to its reader. A fact's id is a hash of its
normalised text, so ids survive reordering and edits elsewhere in the file, and a reply that used a
fact can be traced back to it later.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InputError

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
LONG_FACT_CHARS = 1000  # the embedding model reads ~256 tokens; longer facts are warned about

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)(?:[-*+]|\d{1,9}[.)])\s+(?:\[[ xX]\]\s+)?(.*)$")
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Fact:
    id: str
    text: str
    topic: str
    line: int  # 1-based line where the fact starts

    @property
    def embedding_text(self) -> str:
        """What is embedded: the topic travels with the fact."""
        return f"{self.topic}: {self.text}" if self.topic else self.text

    @property
    def addressed_text(self) -> str:
        """The fact as someone asking about it would put it ("I am vegetarian" -> "you are
        vegetarian"): people ask the twin in the second person, so a second view of each fact in
        that person matches their questions better (measured in bench/retrieval.py)."""
        return to_second_person(self.text)


@dataclass
class FactsFile:
    facts: list[Fact]
    warnings: list[str] = field(default_factory=list)
    sha256: str = ""

    def by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}


_SECOND = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are",
           "i'm": "you're", "i've": "you've", "i'll": "you'll", "i'd": "you'd", "we": "you", "us": "you",
           "our": "your", "ours": "yours", "ourselves": "yourselves", "we're": "you're", "we've": "you've"}
_FIRST_PERSON = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SECOND), key=len, reverse=True)) + r")\b", re.I)


def to_second_person(text: str) -> str:
    return _FIRST_PERSON.sub(lambda m: _SECOND[m.group(0).lower()], text)


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def fact_id(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()[:12]


def _strip_inline(text: str) -> str:
    text = re.sub(r"\*\*(.+?)\*\*|__(.+?)__", lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    return " ".join(text.split())


def _remove_comments(text: str) -> str:
    # keep the newlines inside comments so line numbers stay right
    return re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def parse_facts(text: str) -> FactsFile:
    """Parse Markdown text into facts. Duplicates (same text up to case and spaces) are kept once."""
    lines = _remove_comments(text.lstrip("\ufeff")).splitlines()
    facts: list[Fact] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    topic = ""
    current: list[str] = []
    start = 0
    in_fence = False

    def flush() -> None:
        nonlocal current
        if current:
            body = _strip_inline(" ".join(current))
            current = []
            if not body:
                return
            fid = fact_id(body)
            if fid in seen:
                warnings.append(f"line {start}: duplicate of the fact on line {seen[fid]}, kept once: {body[:60]!r}")
                return
            if len(body) > LONG_FACT_CHARS:
                warnings.append(f"line {start}: a fact of {len(body)} characters; only its start is used "
                                "for retrieval, consider splitting it")
            seen[fid] = start
            facts.append(Fact(fid, body, topic, start))

    for n, raw in enumerate(lines, 1):
        if _FENCE.match(raw):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = raw.rstrip()
        if not line.strip() or _RULE.match(line):
            flush()
            continue
        if m := _HEADING.match(line):
            flush()
            topic = _strip_inline(m.group(2))
            continue
        if m := _BULLET.match(line):
            flush()
            start = n
            current = [m.group(2)]
            continue
        if line.lstrip().startswith(">"):  # quotes are notes, not facts
            flush()
            continue
        if not current:
            start = n
        current.append(line.strip())
    flush()
    return FactsFile(facts, warnings, hashlib.sha256(text.encode("utf-8")).hexdigest())


def read_facts_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> FactsFile:
    """Read and parse the facts file. A missing file is an empty set of facts, with a warning."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return FactsFile([], [f"no facts file at {path} yet; create it, or add one with `doppel facts add`"],
                         hashlib.sha256(b"").hexdigest())
    if size > max_bytes:
        raise InputError(
            f"The facts file {path} is {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB.",
            hint="Keep only what the twin should know, split it, or raise DOPPEL_FACTS_MAX_BYTES.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"The facts file {path} is not UTF-8 text (bad byte 0x{data[exc.start]:02x} on line {line}).",
            hint="Save it as UTF-8 in your editor (most editors offer 'Save with encoding').") from None
    parsed = parse_facts(text)
    parsed.sha256 = hashlib.sha256(data).hexdigest()
    if not parsed.facts and not parsed.warnings:
        parsed.warnings.append(f"the facts file {path} holds no facts; add bullets such as '- I live in Prague.'")
    return parsed


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_fact(path: Path, text: str, topic: str = "", max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Fact, bool]:
    """Add a bullet at the end of the section ``topic`` (default "Other"; a new heading at the end of
    the file if there is none). Returns the fact
    and whether it was new (an existing duplicate is left alone)."""
    text = " ".join(text.split())
    if not text:
        raise InputError("A fact needs some text.", hint='For example: doppel facts add "I live in Prague."')
    if "\n" in text or text.startswith("#"):
        raise InputError("A fact is one line of text, not a heading.")
    current = read_facts_file(path, max_bytes)
    existing = current.by_id().get(fact_id(text))
    if existing is not None:
        return existing, False
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = old.splitlines()
    topic = topic.strip() or "Other"
    heading_at = next((i for i, line in enumerate(lines)
                       if (m := _HEADING.match(line)) and normalise(m.group(2)) == normalise(topic)), None)
    if heading_at is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"## {topic}", f"- {text}"]
    else:
        at = heading_at + 1
        while at < len(lines) and not _HEADING.match(lines[at]):
            at += 1
        while at > heading_at + 1 and not lines[at - 1].strip():
            at -= 1
        lines.insert(at, f"- {text}")
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    added = read_facts_file(path, max_bytes).by_id()[fact_id(text)]
    return added, True


def iter_texts(facts: Iterable[Fact]) -> list[str]:
    return [f.embedding_text for f in facts]
