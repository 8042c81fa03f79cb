"""From the stored history to training samples in the owner's voice.

Each owner turn is a sample. Its prompt is what the live agent would have built at that moment:
the same turns and time window (``agent.conversation``), the facts the agent would retrieve for the
last incoming turn from the facts file as it is now, and the same prompt builder and limits
(``agent.prompt``). The twin's own replies are context, never targets: only ratings bring them back.

The build streams: messages are read chat by chat, samples are rendered a batch at a time (one
tokenizer call per turn, one embedding call per batch of facts queries) and written as they come,
so memory is bounded by a batch. The split is by time: the newest ``validation_fraction`` of samples
is validation; a first cheap pass finds the time where it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.conversation import (SELF_KEY, ContextConfig, Said, TurnSpan, clean, facts_query, group_turns, in_window,
                                is_self_message, scrub)
from agent.prompt import Persona, PromptLimits, Turn, completion_text, render_prompt, turn_size
from feedback.models import Chat, Message

log = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "Sample", "Counted", "BuildResult", "iter_samples", "count_samples", "build",
           "read_stats", "scrub", "Retriever"]

# facts for many queries at once: [(query, context)] -> for each, [(fact id, fact text)]; it may have a
# ``keep(queries)`` method, called with the queries of samples reused from the last build (their vectors stay cached)
Retriever = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[tuple[str, str]]]]
DRILL_ASKER = "Friend"  # who asks the drill questions
FORMAT = 4  # bump when a sample's record or its facts retrieval changes, so an older build's sample cache is not reused
# (3: the recent context is embedded turn by turn, knowledge.index._context_vector; 4: the facts follow the newest message)


@dataclass(frozen=True)
class DatasetConfig:
    context: ContextConfig = field(default_factory=ContextConfig, metadata={"help": "Turns, window, message cut: as the agent serves."})
    limits: PromptLimits = field(default_factory=PromptLimits, metadata={"help": "Prompt token budget: as the agent serves."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Most recent share of samples for validation."})
    skip_links_only: bool = field(default=True, metadata={"help": "Do not train on messages that are only links."})
    skip_forwarded: bool = field(default=True, metadata={"help": "Do not train on forwarded messages."})
    skip_media_only: bool = field(default=True, metadata={"help": "Do not train on media without text."})
    train_speakers: tuple[str, ...] = field(default=(), metadata={"help": "Other speakers whose turns are samples too."})
    batch_size: int = field(default=1024, metadata={"help": "Samples rendered (and facts retrieved) at a time."})
    drills_per_fact: int = field(default=3, metadata={"help": "Fact drills: questions about each fact, answered with it (0: none)."})

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")


_URL = re.compile(r"^\s*(?:(?:https?://|www\.)\S+\s*)+$", re.I)


@dataclass
class Sample:
    chat_id: int
    at: str
    speaker: str
    context: list[dict[str, Any]]
    reply: str
    owner: bool = True
    split: str = "train"


@dataclass
class Counted:
    turns: int = 0
    samples: int = 0
    filtered: Counter[str] = field(default_factory=Counter)


# --- from rows to turns ---

def _said(session: Session, chat: Chat, cfg: DatasetConfig, counted: Counted) -> Iterator[Said]:
    q = select(Message.sent_at, Message.sender_id, Message.sender_name, Message.is_owner, Message.text,
               Message.kind, Message.is_forwarded, Message.source).where(Message.chat_id == chat.id)
    if chat.context_reset_at is not None:
        q = q.where(Message.sent_at >= chat.context_reset_at)
    ctx = cfg.context
    # through the connection (Core), not the ORM session: the same values, in half the time (200,000 rows: 0.59 s, 1.05 s)
    for row in session.connection().execute(q.order_by(Message.sent_at, Message.id)).yield_per(5000):
        is_self = is_self_message(row.source, row.is_owner)
        if row.kind == "service":
            if is_self:
                counted.filtered["service message"] += 1
            if not ctx.include_service:
                continue
        text = row.text or ""
        if not text.strip():
            if is_self:
                counted.filtered["empty message"] += 1
            continue
        reason = _reason(row.source, row.kind, row.is_forwarded, text, cfg)
        key = SELF_KEY if is_self else (row.sender_id or row.sender_name or "?")
        yield Said(row.sent_at, key, row.sender_name or row.sender_id or "someone", clean(text, ctx), is_self, reason)


def _reason(source: str | None, kind: str | None, forwarded: bool | None, text: str, cfg: DatasetConfig) -> str | None:
    """Why the dataset may not learn from a stored message (None: it may); its context it stays."""
    if source == "twin":
        return "the twin's own reply"
    if kind == "media" and cfg.skip_media_only:
        return "media without text"
    if forwarded and cfg.skip_forwarded:
        return "forwarded message"
    if cfg.skip_links_only and _URL.match(text):
        return "link only"
    if kind == "service":
        return "service message"
    return None


def _target_speakers(cfg: DatasetConfig) -> set[str]:
    return {s.casefold() for s in cfg.train_speakers}


def _is_target(turn: TurnSpan, wanted: set[str]) -> bool:
    if turn.is_self:
        return True
    return bool(wanted) and (turn.key.casefold() in wanted or turn.speaker.casefold() in wanted)


@dataclass
class _Pending:
    chat_id: int
    at: datetime
    key: str
    speaker: str
    owner: bool
    context: list[TurnSpan]
    reply: str

    def turns(self) -> list[Turn]:
        # for another speaker's sample, that speaker is "self" (their own earlier turns are theirs)
        if self.owner:  # the owner's earlier turns that could be samples themselves are targets too
            return [t.owner_context() for t in self.context]
        return [Turn(t.speaker, t.text, t.key == self.key) for t in self.context]


def _pending(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None, counted: Counted) -> Iterator[_Pending]:
    wanted = _target_speakers(cfg)
    q = select(Chat).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    keep = 4 * cfg.context.max_turns
    for chat in session.scalars(q).all():
        history: list[TurnSpan] = []
        for turn in group_turns(_said(session, chat, cfg, counted), cfg.context.gap):
            if _is_target(turn, wanted):
                counted.turns += 1
                usable = [p for p in turn.parts if p.target_reason is None]
                for p in turn.parts:
                    if p.target_reason is not None:
                        counted.filtered[p.target_reason] += 1
                context = in_window(history, turn.start, cfg.context)
                if not usable:
                    pass
                elif not any(t.key != turn.key for t in context):
                    counted.filtered["no one else wrote within the window"] += 1
                else:
                    counted.samples += 1
                    yield _Pending(chat.id, turn.start, turn.key, turn.speaker, turn.is_self, context,
                                   "\n".join(p.text for p in usable))
            history.append(turn)
            if len(history) > keep:
                del history[: len(history) - cfg.context.max_turns]


def iter_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None,
                 counted: Counted | None = None) -> Iterator[Sample]:
    """Every sample of the stored history, chat by chat, in time order within a chat."""
    counted = counted if counted is not None else Counted()
    for p in _pending(session, cfg, chat_ids, counted):
        yield Sample(chat_id=p.chat_id, at=p.at.isoformat(), speaker=p.speaker,
                     context=[{"speaker": t.speaker, "text": t.text, "is_self": t.is_self} for t in p.turns()],
                     reply=p.reply, owner=p.owner)


def count_samples(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None = None) -> Counted:
    """What ``iter_samples`` would count (turns, samples, what was left out and why), without
    building a turn, a context or a sample (the ingest summary runs it over every chat the ingest
    touched)."""
    counted = Counted()
    for _ in _sample_keys(session, cfg, chat_ids, counted):
        pass
    return counted


def _sample_keys(session: Session, cfg: DatasetConfig, chat_ids: Sequence[int] | None,
                 counted: Counted) -> Iterator[tuple[datetime, int]]:
    """(time, chat) of every sample ``_pending`` would make, counted into ``counted`` as it counts:
    a lean pass over the rows' times, speakers and kinds, with no turn, context or sample built (a
    test holds it to ``_pending``). 200,000 messages: 2.5 s through ``_pending``, ~1 s here."""
    filtered = counted.filtered
    found: list[tuple[datetime, int]] = []
    wanted = _target_speakers(cfg)
    ctx = cfg.context
    gap, window, max_turns = ctx.gap, ctx.window, ctx.max_turns
    q = select(Chat.id, Chat.context_reset_at).order_by(Chat.id)
    if chat_ids is not None:
        q = q.where(Chat.id.in_(list(chat_ids)))
    for chat_id, reset_at in session.execute(q).all():
        rows = select(Message.sent_at, Message.sender_id, Message.sender_name, Message.is_owner, Message.text,
                      Message.kind, Message.is_forwarded, Message.source).where(Message.chat_id == chat_id)
        if reset_at is not None:
            rows = rows.where(Message.sent_at >= reset_at)
        # the turns so far, newest last: (end, key); the current turn: its start, end, key, whether
        # it is a target, whether a part of it may be learnt from, its parts' reasons
        ends: list[datetime] = []
        keys: list[str] = []
        cur_key: str | None = None
        cur_start = cur_end = None
        cur_target = cur_usable = False
        cur_reasons: list[str] = []

        def close() -> None:
            if cur_target:
                counted.turns += 1
                for r in cur_reasons:
                    filtered[r] += 1
                if cur_usable:
                    other = False
                    n = len(ends)
                    for i in range(n - 1, max(-1, n - 1 - max_turns), -1):
                        if cur_start - ends[i] > window:
                            break
                        if keys[i] != cur_key:
                            other = True
                            break
                    if other:
                        counted.samples += 1
                        found.append((cur_start, chat_id))
                    else:
                        filtered["no one else wrote within the window"] += 1
            ends.append(cur_end)
            keys.append(cur_key)
            if len(ends) > 4 * max_turns:
                del ends[: len(ends) - max_turns], keys[: len(keys) - max_turns]

        for at, sender_id, sender_name, is_owner, text, kind, forwarded, source in \
                session.connection().execute(rows.order_by(Message.sent_at, Message.id)).yield_per(5000):  # Core: see _said
            is_self = is_self_message(source, is_owner)
            if kind == "service":
                if is_self:
                    filtered["service message"] += 1
                if not ctx.include_service:
                    continue
            if not text or not text.strip():
                if is_self:
                    filtered["empty message"] += 1
                continue
            reason = _reason(source, kind, forwarded, text, cfg)
            key = SELF_KEY if is_self else (sender_id or sender_name or "?")
            if cur_key is not None and key == cur_key and at - cur_end <= gap:
                cur_end = at
            else:
                if cur_key is not None:
                    close()
                    if found:
                        yield from found
                        found.clear()
                speaker = sender_name or sender_id or "someone"
                cur_key, cur_start, cur_end, cur_reasons, cur_usable = key, at, at, [], False
                cur_target = is_self or (bool(wanted) and (key.casefold() in wanted or speaker.casefold() in wanted))
            if reason is None:
                cur_usable = True
            else:
                cur_reasons.append(reason)
        if cur_key is not None:
            close()
            yield from found
            found.clear()


# --- the build ---

@dataclass
class BuildResult:
    path: Path
    fingerprint: str
    train: int
    validation: int
    counted: Counted
    with_facts: int = 0  # samples whose prompt carries at least one fact
    drills: int = 0  # fact drills among the training samples
    reused: int = 0  # samples taken from the last build's cache instead of rendered again


class _Sizes:
    """Each turn's token size, counted once (a turn is context for many samples)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def of(self, span: TurnSpan, turn: Turn) -> int:
        if span.is_self != turn.is_self:  # another speaker's sample sees this turn differently
            return turn_size(self.tokenizer, turn)
        if span.tokens is None:
            span.tokens = turn_size(self.tokenizer, turn)
        return span.tokens


def _validation_cut(session: Session, cfg: DatasetConfig) -> tuple[tuple[datetime, int] | None, int, int]:
    """(the first (time, chat) key of validation, train count, validation count), by a pass that
    renders nothing: the newest ``validation_fraction`` of samples is validation."""
    keys = sorted(_sample_keys(session, cfg, None, Counted()))
    n_val = int(round(len(keys) * cfg.validation_fraction))
    if cfg.validation_fraction > 0 and len(keys) >= 2:
        n_val = max(n_val, 1)
    cut = len(keys) - n_val
    if n_val == 0:
        return None, cut, 0
    first = keys[cut]
    # ties at the cut: everything from the first key on is validation, so the counts stay exact
    cut = bisect_left(keys, first)
    return first, cut, len(keys) - cut


class _SampleCache:
    """Rendered samples of the last build, keyed by everything that shapes them (the sample's turns
    and reply, the settings, the persona, the tokenizer, the facts), so a rebuild after new messages
    renders and retrieves only the new ones. Each build writes a fresh cache of what it used."""

    def __init__(self, path: Path, shape: str) -> None:
        import sqlite3

        self.shape = shape
        self.path = path
        self.tmp = path.with_suffix(path.suffix + ".tmp")
        self.tmp.unlink(missing_ok=True)
        self.old = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if path.is_file() else None
        self.new = sqlite3.connect(self.tmp)
        self.new.execute("PRAGMA journal_mode=OFF")
        self.new.execute("PRAGMA synchronous=OFF")
        self.new.execute("CREATE TABLE samples (key TEXT PRIMARY KEY, line TEXT NOT NULL)")
        self.reused = 0

    def key(self, p: _Pending, turns: Sequence[Turn]) -> str:
        h = hashlib.blake2b(self.shape.encode(), digest_size=16)
        h.update(json.dumps([p.chat_id, p.at.isoformat(), p.speaker, p.owner, p.reply,
                             [(t.speaker, t.text, t.is_self, t.target) for t in turns]], ensure_ascii=False).encode())
        return h.hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        if self.old is None or not keys:
            return {}
        rows: list[tuple[str, str]] = []
        try:
            for i in range(0, len(keys), 500):  # SQLite takes at most 999 parameters a statement
                chunk = list(keys[i:i + 500])
                rows += self.old.execute(f"SELECT key, line FROM samples WHERE key IN ({','.join('?' * len(chunk))})",
                                         chunk).fetchall()
        except Exception as exc:  # an unreadable cache is only a slower build
            log.warning("the sample cache %s could not be read (%s); rendering every sample", self.path, exc)
            return {}
        self.reused += len(rows)
        return dict(rows)

    def put(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.new.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?)", pairs)

    def close(self, keep: bool) -> None:
        if self.old is not None:
            self.old.close()
        self.new.commit()
        self.new.close()
        if keep:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def build(session: Session, cfg: DatasetConfig, tokenizer: Any, persona: Persona, out: Path,
          retrieve: Retriever | None = None, progress: Callable[[int], None] | None = None,
          facts: Sequence[tuple[str, str, str]] = (), facts_version: str = "") -> BuildResult:
    """Write the training set as JSONL (train then validation) with a fingerprint. ``retrieve``
    gives each sample the facts the agent would put into its prompt (None: no facts); ``facts``
    (id, text, topic) are drilled (see ``trainer.drills``) when ``retrieve`` is given too.
    ``facts_version`` names the facts and retrieval (a file hash): samples rendered by the last
    build with the same settings and facts are reused from its cache, not rendered again."""
    first_val, _, _ = _validation_cut(session, cfg)
    counted = Counted()
    # the tokenizer by its folder's name, not its path: a data directory moved keeps its cache
    shape = json.dumps([FORMAT, asdict(cfg), asdict(persona), Path(getattr(tokenizer, "name_or_path", "") or "").name,
                        getattr(tokenizer, "chat_template", ""), len(tokenizer), retrieve is not None, facts_version],
                       sort_keys=True, default=list)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = _SampleCache(out.with_suffix(".cache.sqlite"), shape)
    reused = 0
    sizes = _Sizes(tokenizer)
    tmp_train = out.with_suffix(out.suffix + ".tmp")
    tmp_val = out.with_suffix(out.suffix + ".val.tmp")
    h = hashlib.sha256()
    with_facts = 0
    written = {"train": 0, "validation": 0}
    try:
        with tmp_train.open("w", encoding="utf-8") as f_train, tmp_val.open("w", encoding="utf-8") as f_val:
            batch: list[_Pending] = []

            def flush() -> None:
                nonlocal with_facts
                turns_of = [p.turns() for p in batch]
                keys = [cache.key(p, t) for p, t in zip(batch, turns_of)]
                known = cache.get(keys)
                facts: list[list[tuple[str, str]]] = [[] for _ in batch]
                if retrieve is not None:
                    queries = [facts_query(t) for t in turns_of]
                    asked = [(i, q) for i, (q, k) in enumerate(zip(queries, keys)) if q is not None and k not in known]
                    if asked:
                        for (i, _), got in zip(asked, retrieve([q for _, q in asked])):
                            facts[i] = got
                    keep = getattr(retrieve, "keep", None)  # a reused sample's query vectors stay cached
                    if keep is not None and known:
                        keep([q for q, k in zip(queries, keys) if q is not None and k in known])
                fresh: list[tuple[str, str]] = []
                for p, turns, fs, key in zip(batch, turns_of, facts, keys):
                    split = "validation" if first_val is not None and (p.at, p.chat_id) >= first_val else "train"
                    line = known.get(key)
                    if line is not None:
                        if split == "validation":
                            line = line.replace('"split": "train"', '"split": "validation"', 1)
                        with_facts += '"fact_ids": []' not in line
                        h.update(line.encode())
                        (f_val if split == "validation" else f_train).write(line + "\n")
                        written[split] += 1
                        fresh.append((key, line.replace('"split": "validation"', '"split": "train"', 1)))
                        continue
                    who = persona if p.owner else Persona(p.speaker, "")
                    prompt = render_prompt(tokenizer, who, [t for _, t in fs], turns, cfg.limits,
                                           sizes=[sizes.of(s, t) for s, t in zip(p.context, turns)])
                    completion = completion_text(tokenizer, p.reply)
                    record = {"chat_id": p.chat_id, "at": p.at.isoformat(), "speaker": p.speaker, "owner": p.owner,
                              "split": split, "reply": p.reply, "prompt": prompt.text, "completion": completion,
                              "fact_ids": [i for i, _ in fs], "targets": [list(t) for t in prompt.targets],
                              "prompt_tokens": prompt.token_count,
                              "completion_tokens": len(tokenizer.encode(completion, add_special_tokens=False))}
                    with_facts += bool(fs)
                    line = json.dumps(record, ensure_ascii=False, sort_keys=True)
                    h.update(line.encode())
                    (f_val if split == "validation" else f_train).write(line + "\n")
                    written[split] += 1
                    fresh.append((key, line if split == "train" else line.replace('"split": "validation"', '"split": "train"', 1)))
                cache.put(fresh)
                if progress:
                    progress(len(batch))
                batch.clear()

            owner_replies: list[str] = []
            for p in _pending(session, cfg, None, counted):
                batch.append(p)
                if p.owner and len(owner_replies) < 2000:
                    owner_replies.append(p.reply)
                if len(batch) >= cfg.batch_size:
                    flush()
            if batch:
                flush()
            reused = cache.reused
            n_drills = 0
            if retrieve is not None and facts and cfg.drills_per_fact > 0:
                for line in _drill_lines(tokenizer, persona, cfg, retrieve, facts, owner_replies):
                    h.update(line.encode())
                    f_train.write(line + "\n")
                    n_drills += 1
                written["train"] += n_drills
        with tmp_train.open("a", encoding="utf-8") as f_train, tmp_val.open(encoding="utf-8") as f_val:
            for line in f_val:
                f_train.write(line)
        os.unlink(tmp_val)
        h.update(json.dumps(asdict(cfg), sort_keys=True, default=list).encode())
        fingerprint = h.hexdigest()[:16]
        tmp_train.replace(out)  # atomic: a crash never leaves half a dataset
    except BaseException:
        cache.close(keep=False)
        raise
    cache.close(keep=True)
    meta = {"fingerprint": fingerprint, "config": asdict(cfg), "train": written["train"],
            "validation": written["validation"], "with_facts": with_facts, "drills": n_drills, "reused": reused,
            "filtered": dict(counted.filtered), "built_at": datetime.now().astimezone().isoformat()}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2, default=list), encoding="utf-8")
    return BuildResult(out, fingerprint, written["train"], written["validation"], counted, with_facts, n_drills, reused)


def _drill_lines(tokenizer: Any, persona: Persona, cfg: DatasetConfig, retrieve: Retriever,
                 facts: Sequence[tuple[str, str, str]], owner_replies: Sequence[str]) -> Iterator[str]:
    """Fact drills as training records: each question with the facts the agent would retrieve for
    it, answered with the drilled fact in the owner's style; left out when retrieval misses it."""
    from trainer.drills import Style, answer, drills

    style = Style.of(owner_replies)
    asked = drills(facts, "train", cfg.drills_per_fact)
    got = retrieve([(d.question, []) for d in asked])
    for d, fs in zip(asked, got):
        if d.fact_id not in [i for i, _ in fs]:
            continue
        turns = [Turn(DRILL_ASKER, clean(d.question, cfg.context))]
        prompt = render_prompt(tokenizer, persona, [t for _, t in fs], turns, cfg.limits)
        reply = answer(d.fact, style)
        completion = completion_text(tokenizer, reply)
        record = {"chat_id": 0, "at": "", "speaker": persona.name, "owner": True, "split": "train", "reply": reply,
                  "prompt": prompt.text, "completion": completion, "fact_ids": [i for i, _ in fs],
                  "drill": d.fact_id, "prompt_tokens": prompt.token_count,
                  "completion_tokens": len(tokenizer.encode(completion, add_special_tokens=False))}
        yield json.dumps(record, ensure_ascii=False, sort_keys=True)


def read_stats(path: Path) -> dict[str, Any]:
    """Counts and token-length histogram of a built set."""
    splits: Counter[str] = Counter()
    lengths: list[int] = []
    for line in path.open(encoding="utf-8"):
        rec = json.loads(line)
        splits[rec["split"]] += 1
        lengths.append(rec["prompt_tokens"] + rec["completion_tokens"])
    edges = [0, 64, 128, 256, 512, 1024, 2048, 10**9]
    hist: Counter[tuple[int, int]] = Counter()
    for n in lengths:
        for lo, hi in zip(edges, edges[1:]):
            if lo <= n < hi:
                hist[(lo, hi)] += 1
    return {"splits": dict(splits), "total": len(lengths),
            "histogram": [(lo, hi, hist[(lo, hi)]) for lo, hi in zip(edges, edges[1:])],
            "max_tokens": max(lengths, default=0), "mean_tokens": (sum(lengths) / len(lengths)) if lengths else 0}
