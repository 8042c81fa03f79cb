"""Fact drills: training samples that show the twin what to do with "Facts about you".

A chat history rarely contains the owner stating the facts of their facts file in answer to a
question, so a model trained on history alone learns to ignore the facts in its prompt. For each
fact a drill asks about it in a few plain ways; the prompt is built exactly as the agent would build
it (the same retrieval puts the facts into it), and the target is the fact said back in the owner's
written style (their case and punctuation habits). Questions whose retrieval misses the fact are
left out: the agent could not have answered them either.

The questions are split in two families: ``train`` templates are drilled, ``held_out`` templates
are only ever asked by the evaluation, so fact use is measured on questions the model never saw.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_SUBJECT_SWAP = [  # first person -> second person, longest first
    (r"\bI am\b", "you are"), (r"\bI'm\b", "you're"), (r"\bI've\b", "you've"), (r"\bI'll\b", "you'll"),
    (r"\bI'd\b", "you'd"), (r"\bI was\b", "you were"), (r"\bI\b", "you"), (r"\bmy\b", "your"), (r"\bMy\b", "your"),
    (r"\bme\b", "you"), (r"\bmine\b", "yours"), (r"\bmyself\b", "yourself"), (r"\bwe\b", "you"),
    (r"\bour\b", "your"), (r"\bus\b", "you"),
]


def second_person(text: str) -> str:
    """'I live in Prague' -> 'you live in Prague' (English; other languages pass through)."""
    for pattern, repl in _SUBJECT_SWAP:
        text = re.sub(pattern, repl, text)
    return text


def _clause(fact: str) -> str:
    return re.split(r"[;.!?]\s", fact.strip(), maxsplit=1)[0].rstrip(" .;!?")


def _yes_no(fact: str) -> str | None:
    """A yes/no question from the fact's first clause, or None when its shape is not known."""
    c = _clause(fact)
    m = re.match(r"(?i)^(I am|I'm)\s+(.*)$", c)
    if m:
        return f"are you {second_person(m.group(2))}?"
    m = re.match(r"(?i)^I (don't|do not|can't|cannot|never)\s+(.*)$", c)
    if m:
        aux = "can" if m.group(1).lower() in ("can't", "cannot") else "do"
        return f"{aux} you {second_person(m.group(2))}?"
    m = re.match(r"(?i)^I've been\s+(.*)$", c)
    if m:
        return f"have you been {second_person(m.group(1))}?"
    m = re.match(r"(?i)^I (\w+)\s+(.*)$", c)
    if m and (m.group(1).lower().endswith("ed") or m.group(1).lower() in _PAST):
        return f"so you {second_person(m.group(1) + ' ' + m.group(2))}?"
    if m and m.group(1).lower() not in ("have", "had", "was", "will", "would", "should", "could"):
        verb = m.group(1)
        base = verb[:-1] if verb.endswith("s") and not verb.endswith("ss") else verb
        return f"do you {base} {second_person(m.group(2))}?"
    m = re.match(r"(?i)^my (.+?) (is|are|was|lives|turns) (.*)$", c)
    if m:
        return f"what about your {m.group(1)}?"
    return None


_PAST = {"grew", "went", "got", "met", "had", "made", "took", "came", "left", "found", "bought", "began", "saw",
         "wrote", "won", "lost", "spent", "knew", "became", "built", "gave", "ran", "sold", "taught", "thought"}


_ENGLISH = {"i", "i'm", "my", "me", "the", "a", "an", "and", "is", "am", "are", "to", "of", "in", "on", "at",
            "with", "for", "don't", "have", "every", "was", "we", "our"}


def english_share(facts: Iterable[str]) -> float:
    """The share of facts that read as English (the drills' questions are English templates)."""
    facts = list(facts)
    if not facts:
        return 1.0
    hits = sum(bool(_ENGLISH & set(re.findall(r"[a-z']+", f.lower()))) for f in facts)
    return hits / len(facts)


def _keyword(fact: str) -> str:
    words = [w for w in re.findall(r"[A-Za-zÀ-ž']+", _clause(fact)) if len(w) > 3
             and w.lower() not in {"about", "every", "with", "from", "that", "this", "have", "been", "they", "there",
                                   "when", "where", "which", "still", "some", "most", "mostly", "called", "don't", "than",
                                   "then", "into", "over", "very", "really", "just", "also", "only"}]
    return words[-1] if words else "that"


# question templates: {topic} is the fact's heading, {kw} a content word of it, {yn} a yes/no form
TRAIN_TEMPLATES = ["{yn}", "hey quick question, {yn}", "btw {yn}", "what's the story with {topic}?",
                   "so tell me, anything about {kw}?"]
HELD_OUT_TEMPLATES = ["wait, {yn}", "random q: {yn}", "remind me, what's up with {kw}?"]


@dataclass(frozen=True)
class Drill:
    fact_id: str
    fact: str
    question: str


def questions(fact_id: str, fact: str, topic: str, family: str = "train") -> list[Drill]:
    templates = TRAIN_TEMPLATES if family == "train" else HELD_OUT_TEMPLATES
    yn = _yes_no(fact)
    out = []
    for t in templates:
        if "{yn}" in t and yn is None:
            continue
        q = t.format(yn=yn, topic=(topic or "you").lower(), kw=_keyword(fact))
        out.append(Drill(fact_id, fact, q))
    return out


def drills(facts: Iterable[tuple[str, str, str]], family: str = "train", per_fact: int = 3,
           seed: int = 0) -> list[Drill]:
    """Up to ``per_fact`` questions for each (id, text, topic), drawn from ``family``'s templates."""
    rng = random.Random(seed)
    out: list[Drill] = []
    for fid, text, topic in facts:
        qs = questions(fid, text, topic, family)
        rng.shuffle(qs)
        out.extend(qs[:per_fact])
    return out


@dataclass(frozen=True)
class Style:
    """How the owner writes, in the few habits a restated fact can copy."""

    lowercase: bool = False  # most messages start in lower case
    final_period: bool = True  # most messages end with a full stop

    @classmethod
    def of(cls, texts: Sequence[str]) -> Style:
        texts = [t.strip() for t in texts if t.strip() and t.strip()[0].isalpha()]
        if not texts:
            return cls()
        lower = sum(t[0].islower() for t in texts) / len(texts)
        period = sum(t.endswith(".") for t in texts) / len(texts)
        return cls(lowercase=lower > 0.5, final_period=period > 0.5)

    def apply(self, text: str) -> str:
        text = text.strip()
        if self.lowercase and text[:1].isupper() and not text.startswith("I ") and not text.startswith("I'"):
            text = text[0].lower() + text[1:]
        if not self.final_period and text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
        return text


def answer(fact: str, style: Style) -> str:
    """The fact said back as a chat reply: the owner's own words for it, in their style."""
    return style.apply(fact)
