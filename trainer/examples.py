"""Training examples: the ingest dataset, and ratings replayed with the exact prompt the model saw.

An example is (prompt, completion, weight): the loss covers only the completion's tokens. A
positive weight teaches the completion (likelihood); a negative one pushes it down (unlikelihood).

A sample of the history is read with its facts still to come (``Example.pending``): its prompt is
the one its turns make without facts, and ``with_facts`` retrieves them for the examples a run
actually uses, in one embedding pass, and renders those prompts again, as the agent renders them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.prompt import Persona, PromptLimits, Turn, completion_text, render_prompt
from common.errors import InputError, NotFoundError
from feedback.models import Correction, Rating, Reply


@dataclass(frozen=True)
class Pending:
    """What a history sample's facts are retrieved and its prompt rendered from, where it is used."""

    query: tuple[str, tuple[str, ...]]  # the newest message someone else wrote, and the turns before it
    turns: tuple[Turn, ...]  # the turns its prompt starts from (the newest uncut)
    speaker: str | None = None  # another speaker's sample (``train_speakers``): their name; None: the owner's


@dataclass(frozen=True)
class InFile:
    """Where a history sample's line is: its turns and query are read again where its facts are
    needed, not held for every sample read (at 1,000,000 messages, 315,000 samples: they doubled
    the memory of reading the training set)."""

    path: Path
    offset: int


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str  # the reply followed by the end-of-turn marker
    weight: float = 1.0  # < 0: an undesirable completion
    source: str = "dataset"  # dataset | drill | rating | correction
    # character spans of ``prompt`` that are the owner's earlier replies: learned too, in training only
    targets: tuple[tuple[int, int], ...] = ()
    pending: Pending | InFile | None = field(default=None, compare=False)  # facts not retrieved yet (see ``with_facts``)
    drill: str | None = field(default=None, compare=False)  # a fact drill: the id of the fact it asks about
    fact_ids: tuple[str, ...] = field(default=(), compare=False)  # the facts its prompt carries, where known
    owner: bool = field(default=True, compare=False)  # a sample of the owner's (not of a ``train_speakers`` one)
    # every reply it teaches is taught by the covering samples (see ``read_dataset``); a run with
    # ``history_samples`` "covering" leaves it out
    redundant: bool = field(default=False, compare=False)


@dataclass
class RatingSet:
    examples: list[Example] = field(default_factory=list)
    rating_ids: list[int] = field(default_factory=list)
    correction_ids: list[int] = field(default_factory=list)
    liked: int = 0
    disliked: int = 0


def read_dataset(path: Path, split: str | None = None) -> list[Example]:
    """The examples of ``split`` (all where None) in the training set at ``path``, each history
    sample marked ``redundant`` where it is not one of the covering samples (``_redundant``)."""
    if not path.is_file():
        raise NotFoundError(f"No training set at {path}.", hint="Run `doppel dataset build` first.")
    out = []
    learned: list[tuple[str, Any, int, list[int]] | None] = []  # for the covering: split, (chat, at), replies
    offset = 0
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            at, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"{path}, line {n}: not JSON.", hint="Rebuild it with `doppel dataset build`.") from None
            if split is None or row.get("split") == split:
                pending = InFile(path, at) if row.get("query") and row.get("turns") else None
                ex = Example(row["prompt"], row["completion"], source="drill" if row.get("drill") else "dataset",
                             targets=tuple((int(a), int(b)) for a, b in row.get("targets") or ()),
                             pending=pending, owner=bool(row.get("owner", True)))
                out.append(ex)
                learned.append(_replies(row, ex))
    for i in _redundant(learned):
        out[i] = replace(out[i], redundant=True)
    return out


def _replies(row: dict[str, Any], ex: Example) -> tuple[str, Any, int, list[int]] | None:
    """What a history sample of the owner's teaches, for ``_redundant``: its split, its place
    (chat, time), and its own reply's and the earlier replies' keys (a hash of the chat and the
    text with its end marker, as the loss learns them); None for anything else."""
    if ex.source != "dataset" or not ex.owner or "chat_id" not in row or "at" not in row:
        return None
    chat = row["chat_id"]
    return (str(row.get("split")), (chat, str(row["at"])), hash((chat, ex.completion)),
            [hash((chat, ex.prompt[a:b])) for a, b in ex.targets])


def _redundant(learned: Sequence[tuple[str, Any, int, list[int]] | None]) -> list[int]:
    """The history samples left out of the covering: going from each chat's newest sample back, a
    sample is kept where its own reply is in no kept sample's prompt yet, so the kept ones teach
    every reply of the owner's (as their reply, or as an earlier reply inside their prompt, where
    ``context_targets`` learns it) about once. A pass over all samples learns each reply about as
    many times as the prompts that hold it (3.5 on the stand-in history), and the held-out loss
    rises after the first repetitions (README, "Measured")."""
    covered: set[Any] = set()
    out = []
    order = sorted((i for i, r in enumerate(learned) if r is not None), key=lambda i: learned[i][:2], reverse=True)
    for i in order:
        split, _, reply, earlier = learned[i]
        if (split, reply) in covered:
            out.append(i)
            continue
        covered.add((split, reply))
        covered.update((split, k) for k in earlier)
    return out


def _pending_of(row: dict[str, Any]) -> Pending | None:
    if not row.get("query") or not row.get("turns"):
        return None
    (text, context), turns = row["query"], row["turns"]
    return Pending((text, tuple(context)), tuple(Turn(*t) for t in turns),
                   None if row.get("owner", True) else row.get("speaker"))


def _load(examples: list[Example], todo: Sequence[int]) -> None:
    """The pending examples of ``todo`` that are places in a file, read from it (in file order)."""
    places = sorted((e.pending.path, e.pending.offset, i) for i in todo
                    if isinstance((e := examples[i]).pending, InFile))
    fh = None
    try:
        for path, offset, i in places:
            if fh is None or fh.name != str(path):
                if fh is not None:
                    fh.close()
                fh = open(path, "rb")
            fh.seek(offset)
            try:
                row = json.loads(fh.readline())
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = {}
            if row.get("prompt") != examples[i].prompt:
                raise InputError(f"{path} changed while this run was reading it (a `doppel dataset build` at the same time?).",
                                 hint="Run it again once the build is done.")
            examples[i] = replace(examples[i], pending=_pending_of(row))
    finally:
        if fh is not None:
            fh.close()


# facts for many (query, context) pairs at once: for each, [(fact id, fact text)] (``doppel.context.facts_retriever``)
Retrieve = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[tuple[str, str]]]]
BATCH = 1024  # queries retrieved at a time


def with_facts(examples: Sequence[Example], tokenizer: Any, persona: Persona, limits: PromptLimits,
               retrieve: Retrieve | None) -> list[Example]:
    """The examples with their facts: for each one read with its facts to come, the facts the agent
    retrieves for its query now, and its prompt rendered with them (the same builder and limits as
    the agent's, so it is the prompt the agent would build). Without facts (``retrieve`` None, or
    nothing retrieved) the prompt read is already that prompt. The others are returned as they are."""
    out = list(examples)
    todo = [i for i, e in enumerate(out) if e.pending is not None]
    for lo in range(0, len(todo), BATCH):
        part = todo[lo: lo + BATCH]
        _load(out, part)
        part = [i for i in part if out[i].pending is not None]
        got = retrieve([out[i].pending.query for i in part]) if retrieve is not None else [[] for _ in part]  # type: ignore[union-attr]
        for i, fs in zip(part, got):
            e = out[i]
            assert isinstance(e.pending, Pending)
            if fs:
                who = persona if e.pending.speaker is None else Persona(e.pending.speaker, "")
                prompt = render_prompt(tokenizer, who, [t for _, t in fs], e.pending.turns, limits)
                out[i] = replace(e, prompt=prompt.text, targets=tuple(prompt.targets), pending=None)
            else:
                out[i] = replace(e, pending=None)
    return out


def dataset_fingerprint(path: Path) -> str | None:
    meta = path.with_suffix(".meta.json")
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
    return None


def rating_examples(session: Session, tokenizer: Any, since_id: int = 0, exclude_ids: Sequence[int] = (),
                    balance: bool = True) -> RatingSet:
    """Current 👍/👎 ratings (newer than ``since_id``) and all corrections as examples. Several people
    rating one reply count once each; a withdrawn rating (0) is not used."""
    out = RatingSet()
    rows = session.execute(
        select(Rating, Reply).join(Reply, Rating.reply_id == Reply.id)
        .where(Rating.id > since_id, Rating.value != 0).order_by(Rating.id)
    ).all()
    excluded = set(exclude_ids)
    for rating, reply in rows:
        if rating.id in excluded:
            continue
        sign = 1.0 if rating.value > 0 else -1.0
        out.examples.append(Example(reply.prompt, completion_text(tokenizer, reply.text), sign, "rating"))
        out.rating_ids.append(rating.id)
        if sign > 0:
            out.liked += 1
        else:
            out.disliked += 1
    for corr, reply in session.execute(select(Correction, Reply).join(Reply, Correction.reply_id == Reply.id)
                                       .order_by(Correction.id)).all():
        out.examples.append(Example(reply.prompt, completion_text(tokenizer, corr.text), 1.0, "correction"))
        out.correction_ids.append(corr.id)
        out.liked += 1
    if balance and out.liked and out.disliked:
        # each class carries half of the rating signal, whatever the counts
        total = out.liked + out.disliked
        pos_w, neg_w = total / (2 * out.liked), total / (2 * out.disliked)
        out.examples = [Example(e.prompt, e.completion, e.weight * (pos_w if e.weight > 0 else neg_w), e.source)
                        for e in out.examples]
    return out


def mix_with_replay(ratings: list[Example], dataset: list[Example], ratio: float, seed: int) -> list[Example]:
    """The rating examples plus ``ratio`` times as many dataset examples, drawn at random, so the
    twin keeps the person's voice while it learns from feedback."""
    rng = random.Random(seed)
    k = min(len(dataset), int(round(len(ratings) * ratio)))
    mixed = ratings + rng.sample(dataset, k)
    rng.shuffle(mixed)
    return mixed
