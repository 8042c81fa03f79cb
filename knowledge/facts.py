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
from functools import cached_property
from pathlib import Path

from common.errors import InputError, NotFoundError

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
    end: int = field(default=0, compare=False)  # 1-based line where it ends (0: unknown, e.g. from a saved index)

    @property
    def embedding_text(self) -> str:
        """What is embedded: the topic travels with the fact."""
        return f"{self.topic}: {self.text}" if self.topic else self.text

    @cached_property  # a rebuild after a one-fact edit asks it of every fact twice
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
    start = last = 0
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
            facts.append(Fact(fid, body, topic, start, last))

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
            start = last = n
            current = [m.group(2)]
            continue
        if line.lstrip().startswith(">"):  # quotes are notes, not facts
            flush()
            continue
        if not current:
            start = n
        current.append(line.strip())
        last = n
    flush()
    return FactsFile(facts, warnings, hashlib.sha256(text.encode("utf-8")).hexdigest())


def read_facts_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> FactsFile:
    """Read and parse the facts file. A missing file is an empty set of facts, with a warning; what
    ``check_facts`` finds (an empty bullet, an unclosed code block...) is a warning too."""
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
    # what a hand edit may have written otherwise than meant (the console and `facts edit` refuse it)
    parsed.warnings.extend(str(p) for p in check_facts(text, max_bytes))
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
    write_atomic(path, insert_fact(old, text, topic).encode("utf-8"))
    added = read_facts_file(path, max_bytes).by_id()[fact_id(text)]
    return added, True


# --- editing the file in place: each edit is text -> text, the rest of the file byte for byte -------

@dataclass(frozen=True)
class Problem:
    """Something in the file that would not be read as its writer meant."""

    line: int | None  # 1-based; None: the file as a whole
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


_BARE_MARKER = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s*$")
_PREFIX = re.compile(r"^\s*(?:(?:[-*+]|\d{1,9}[.)])\s+(?:\[[ xX]\]\s+)?)?")


def check_facts(text: str, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Problem]:
    """Mistakes that ``parse_facts`` would silently read otherwise than meant: an unclosed comment or
    code block (the rest of the file disappears), an empty bullet (it glues onto the fact above), a
    heading without a title or without the space after its ``#`` (it becomes a fact). Duplicates and
    long facts are ``parse_facts``' warnings, not problems."""
    problems: list[Problem] = []
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        problems.append(Problem(None, f"the file would be {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB "
                                      "(DOPPEL_FACTS_MAX_BYTES)"))
    body = text.lstrip("\ufeff")
    at = 0
    while (start := body.find("<!--", at)) >= 0:
        end = body.find("-->", start + 4)
        if end < 0:
            problems.append(Problem(body.count("\n", 0, start) + 1, "a comment opens here with '<!--' and is never "
                                    "closed with '-->'; close it, or remove the '<!--'"))
            break
        at = end + 3
    fence_at = 0
    for n, raw in enumerate(_remove_comments(body).splitlines(), 1):
        if _FENCE.match(raw):
            fence_at = 0 if fence_at else n
            continue
        if fence_at:
            continue
        line = raw.rstrip()
        if _BARE_MARKER.match(line):
            problems.append(Problem(n, f"an empty bullet ({line.strip()!r}); write the fact after it, or remove the line"))
        elif line.startswith("#"):
            m = _HEADING.match(line)
            if m is None and re.match(r"^#{1,6}[^#\s]", line):
                title = line.lstrip("#")
                problems.append(Problem(n, f"{line[:40]!r} is not a heading: put a space after the '#' "
                                           f"('{line[: len(line) - len(title)]} {title.strip()[:30]}')"))
            elif m is None and not line.strip("#").strip():
                problems.append(Problem(n, "a heading without a title; name the topic after the '#', or remove the line"))
            elif m is None:
                problems.append(Problem(n, f"{line[:40]!r} is not a heading (a heading has 1 to 6 '#' and a space); "
                                           "a fact cannot start with '#'"))
            elif not _strip_inline(m.group(2)):
                problems.append(Problem(n, "a heading without a title; name the topic after the '#', or remove the line"))
    if fence_at:
        problems.append(Problem(fence_at, "a code block opens here and is never closed, so everything after it would "
                                          "be ignored; close it with another ``` line"))
    return sorted(problems, key=lambda p: p.line or 0)


def clean_fact_text(text: str) -> str:
    """One fact as the owner typed it, on one line; refused with a message when it could not be a fact."""
    text = " ".join(text.split())
    if not text:
        raise InputError("A fact needs some text.", hint='For example: "I live in Prague."')
    if text.startswith(("#", ">", "```", "~~~")) or _RULE.match(text) or "<!--" in text or "-->" in text:
        raise InputError(f"{text[:60]!r} would not be read as a fact (it starts a heading, a quote, a code block "
                         "or a comment).", hint="Write the fact as a plain sentence.")
    return text


def _split_bom(text: str) -> tuple[str, str]:
    return ("\ufeff", text[1:]) if text.startswith("\ufeff") else ("", text)


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _find(text: str, fid: str) -> Fact:
    fact = parse_facts(text).by_id().get(fid)
    if fact is None:
        raise NotFoundError("That fact is not in the facts file any more.",
                            hint="Reload the page: the file changed since it was shown.")
    return fact


def fact_source(text: str, fact: Fact) -> str:
    """The fact as written in the file (its inline Markdown kept), on one line, without its bullet."""
    return fact_sources(text, [fact])[fact.id]


def fact_sources(text: str, facts: Iterable[Fact]) -> dict[str, str]:
    """``fact_source`` for many facts of one file, reading its lines once."""
    lines = _remove_comments(_split_bom(text)[1]).splitlines()
    out = {}
    for fact in facts:
        chunk = lines[fact.line - 1: max(fact.end, fact.line)]
        if not chunk:
            out[fact.id] = fact.text
            continue
        first = _PREFIX.sub("", chunk[0], count=1)
        out[fact.id] = " ".join(part.strip() for part in [first, *chunk[1:]] if part.strip())
    return out


def insert_fact(text: str, fact_text: str, topic: str = "") -> str:
    """``text`` with a bullet for ``fact_text`` at the end of the section ``topic`` (default "Other",
    a new heading at the end when there is none)."""
    bom, body = _split_bom(text)
    nl = _newline(body)
    lines = body.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += nl
    topic = " ".join(topic.split()) or "Other"
    heading_at = next((i for i, line in enumerate(lines)
                       if (m := _HEADING.match(line.rstrip("\r\n"))) and normalise(_strip_inline(m.group(2))) == normalise(topic)),
                      None)
    if heading_at is None:
        if lines and lines[-1].strip():
            lines.append(nl)
        lines += [f"## {topic}{nl}", f"- {fact_text}{nl}"]
    else:
        at = heading_at + 1
        while at < len(lines) and not _HEADING.match(lines[at].rstrip("\r\n")):
            at += 1
        while at > heading_at + 1 and not lines[at - 1].strip():
            at -= 1
        lines.insert(at, f"- {fact_text}{nl}")
    return bom + "".join(lines)


def replace_fact(text: str, fid: str, new_text: str) -> str:
    """``text`` with the fact ``fid`` rewritten as ``new_text``, on its own lines, keeping its bullet."""
    new_text = clean_fact_text(new_text)
    fact = _find(text, fid)
    duplicate = parse_facts(text).by_id().get(fact_id(_strip_inline(new_text)))
    if duplicate is not None and duplicate.id != fid:
        raise InputError(f"That fact is already in the file (line {duplicate.line}, topic {duplicate.topic or '-'}).",
                         hint="Delete one of the two instead.")
    bom, body = _split_bom(text)
    lines = body.splitlines(keepends=True)
    first = _remove_comments(body).splitlines()[fact.line - 1]
    prefix = _PREFIX.match(first).group(0)  # type: ignore[union-attr]
    last = lines[fact.end - 1]
    ending = last[len(last.rstrip("\r\n")):]
    lines[fact.line - 1: fact.end] = [f"{prefix}{new_text}{ending}"]
    out = bom + "".join(lines)
    _must_read_as_fact(out, new_text)
    return out


def remove_fact(text: str, fid: str) -> str:
    """``text`` without the lines of the fact ``fid``."""
    fact = _find(text, fid)
    bom, body = _split_bom(text)
    lines = body.splitlines(keepends=True)
    del lines[fact.line - 1: fact.end]
    at = fact.line - 1  # the line that followed the fact
    if at < len(lines) and not lines[at].strip() and (at == 0 or not lines[at - 1].strip()):
        del lines[at]  # no double blank line where a paragraph was
    return bom + "".join(lines)


def move_fact(text: str, fid: str, topic: str) -> str:
    """``text`` with the fact ``fid`` moved to the end of the section ``topic`` (created if missing)."""
    fact = _find(text, fid)
    topic = " ".join(topic.split())
    if not topic:
        raise InputError("Name the topic to move the fact to.")
    if normalise(topic) == normalise(fact.topic):
        return text
    source = fact_source(text, fact)
    out = insert_fact(remove_fact(text, fid), source, topic)
    _must_read_as_fact(out, source)
    return out


def _must_read_as_fact(text: str, written: str) -> None:
    if fact_id(_strip_inline(written)) not in parse_facts(text).by_id():
        raise InputError(f"{written[:60]!r} would not be read as a fact where it stands.",
                         hint="Write it as a plain sentence.")


def iter_texts(facts: Iterable[Fact]) -> list[str]:
    return [f.embedding_text for f in facts]
