"""Fact drills: training samples that show the twin what to do with "Facts about you".

A chat history rarely contains the owner stating the facts of their facts file in answer to a
question, so a model trained on history alone learns to ignore the facts in its prompt. For each
fact a drill asks about it in a few plain ways; the prompt is built exactly as the agent would build
it (the same retrieval puts the facts into it), and the target is the fact said back in the owner's
written style (their case and punctuation habits). Questions whose retrieval misses the fact are
left out: the agent could not have answered them either. A share of the drills gets other facts
beside the drilled one, which lands at any place among them (``trainer.dataset.with_distractors``).

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


_PREPOSITIONS = {"in", "at", "on", "near", "with", "for", "from", "to", "by", "around", "before", "after", "along",
                 "since", "during", "about", "every", "than", "because", "so", "but", "and", "or", "twice", "once"}
_TIME_WORDS = re.compile(r"(?i)\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|mondays|tuesdays|"
                         r"wednesdays|thursdays|fridays|saturdays|sundays|weekends?|mornings?|evenings?|nights?|midnight|"
                         r"noon|january|february|march|april|may|june|july|august|september|october|november|december|"
                         r"spring|summer|autumn|winter|every|daily|weekly|\d+\s*(?:am|pm)|\d+:\d+|o'clock|year|month)\b")
_PLACE_VERBS = {"live", "lives", "work", "works", "grew", "study", "studied", "stay", "stays", "eat", "sit", "moved"}


def _cut(words: list[str]) -> list[str]:
    """The words up to the first preposition or conjunction that comes after two words: the head
    of a phrase ("a flat with my partner Jana" -> "a flat")."""
    for i, w in enumerate(words):
        if i >= 2 and w.lower() in _PREPOSITIONS:
            return words[:i]
    return words


def _short_yes_no(fact: str) -> str | None:
    """A yes/no question about the head of the fact, so the answer says more than the question:
    "I share a flat with my partner Jana." -> "do you share a flat?"."""
    c = re.split(r",\s", _clause(fact), maxsplit=1)[0]
    m = re.match(r"(?i)^I (don't |do not |never |mostly |usually |often |still )?(\w+)\s+(.*)$", c)
    if not m or m.group(2).lower() in ("am", "have", "had", "was", "will", "would", "can't", "cannot", "can", "'ve"):
        m2 = re.match(r"(?i)^(?:I am|I'm)\s+(.*)$", c)
        if m2:
            rest = _cut(m2.group(1).split())
            q = f"are you {second_person(' '.join(rest))}?"
            return q if q != _yes_no(fact) else None
        return None
    verb = m.group(2)
    if verb.lower().endswith("ed") or verb.lower() in _PAST:
        return None
    rest = _cut(m.group(3).split())
    q = f"do you {verb} {second_person(' '.join(rest))}?"
    return q if q != _yes_no(fact) else None


def _wh(fact: str) -> str | None:
    """A what / where / when question the fact answers, from its shape: "I live in Prague" ->
    "where do you live?", "My cat is called Knedlík" -> "what's your cat called?"."""
    c = re.split(r",\s|;\s", _clause(fact), maxsplit=1)[0]
    m = re.match(r"(?i)^my (.+?) (?:is|are) (?:called|named) .+$", c)
    if m:
        return f"what's your {m.group(1)} called?"
    m = re.match(r"(?i)^my (.+?) (is|are) (.+)$", c)
    if m:
        head, rest = m.group(1), m.group(3)
        first = rest.split()[0].lower()
        if _TIME_WORDS.search(rest) and first in ("on", "in", "at", "this", "next"):
            return f"when's your {head}?"
        if first in ("in", "on", "at", "near"):
            return f"where's your {head}?"
        if first in ("a", "an", "the") or rest[:1].isupper() or len(rest.split()) <= 2:
            return f"what's your {head}?"
        return None
    m = re.match(r"(?i)^my (.+?) (lives?|works?) (in|at|as) (.+)$", c)
    if m:
        aux = "do" if m.group(2).lower() in ("live", "work") else "does"
        verb = m.group(2).lower().rstrip("s")
        if m.group(3).lower() == "as":
            return f"what {aux} your {m.group(1)} do?"
        return f"where {aux} your {m.group(1)} {verb}?"
    m = re.match(r"(?i)^I'm (\w+ing)\s+(.+)$", c)
    if m:
        return f"what are you {m.group(1)}?"
    m = re.match(r"(?i)^I (mostly |usually |often |always )?(\w+)\s+(.*)$", c)
    if not m:
        return None
    verb, words = m.group(2), m.group(3).split()
    low = verb.lower()
    if low in ("am", "have", "had", "was", "will", "would", "can't", "cannot", "can", "don't", "never", "hate", "love",
               "like") or low.endswith("ed") or low in _PAST:
        return None
    head = _cut(words)
    tail = words[len(head):]
    if tail and _TIME_WORDS.search(" ".join(tail)):
        return f"when do you {verb} {second_person(' '.join(head))}?"
    if low in _PLACE_VERBS and words and words[0].lower() in ("in", "at", "near"):
        return f"where do you {verb}?"
    if low in _PLACE_VERBS and words and words[0].lower() == "as":
        return f"what do you {verb} as?"
    if words and words[0].lower() not in _PREPOSITIONS and len(head) >= 1:
        return f"what do you {verb}?"
    return None


# question templates: {topic} is the fact's heading, {kw} a content word of it, {yn} a yes/no form,
# {yns} a shorter yes/no form about the fact's head, {wh} a what/where/when question it answers
TRAIN_TEMPLATES = ["{yn}", "hey quick question, {yn}", "btw {yn}", "what's the story with {topic}?",
                   "so tell me, anything about {kw}?", "{yns}", "hey, {yns}", "{wh}", "quick one: {wh}",
                   "tell me about your {topic}"]
HELD_OUT_TEMPLATES = ["wait, {yn}", "random q: {yn}", "remind me, what's up with {kw}?"]


@dataclass(frozen=True)
class Drill:
    fact_id: str
    fact: str
    question: str


def questions(fact_id: str, fact: str, topic: str, family: str = "train") -> list[Drill]:
    templates = TRAIN_TEMPLATES if family == "train" else HELD_OUT_TEMPLATES
    forms = {"yn": _yes_no(fact), "yns": _short_yes_no(fact), "wh": _wh(fact)}
    out = []
    for t in templates:
        if any("{" + k + "}" in t and v is None for k, v in forms.items()):
            continue
        q = t.format(**forms, topic=(topic or "you").lower(), kw=_keyword(fact))
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
