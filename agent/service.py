"""``Agent.reply()``: the one path from an incoming message to a stored, sendable reply.

incoming message -> stored (its own transaction: never lost, even if generation fails)
-> the chat's context inside the time window -> facts retrieved for it -> the one prompt builder
-> generation -> the reply stored with its prompt, fact ids, adapter version and latency.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from agent.conversation import SELF_KEY, ContextConfig, Said, clean, facts_query, group_turns, in_window, is_self_message
from agent.metrics import Metrics
from agent.prompt import Persona, PromptLimits, length_bias, render_prompt
from agent.runtime import GenerationConfig, ModelRuntime, split_reply
from common.errors import InputError
from feedback import store

log = logging.getLogger(__name__)


class Facts(Protocol):  # the part of knowledge.index.KnowledgeBase the agent uses
    def search(self, query: str, context: Sequence[str] = (), top_k: int | None = None,
               min_score: float | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class AgentConfig:
    persona: Persona = Persona()
    limits: PromptLimits = PromptLimits()  # the dataset builder gets the same (DESIGN promise 1)
    context: ContextConfig = ContextConfig()  # likewise
    generation: GenerationConfig = GenerationConfig()
    max_input_chars: int = 4000  # an incoming message longer than this is refused


@dataclass
class Reply:
    id: int
    chat_id: str
    text: str
    messages: list[str]  # what to send, in order (a reply may be several short messages)
    facts: list[dict[str, Any]]
    adapter_version: str | None
    latency_ms: float
    prompt_tokens: int
    new_tokens: int
    context_messages: int
    prompt: str = field(repr=False, default="")

    def to_dict(self, with_prompt: bool = False) -> dict[str, Any]:
        d = {"reply_id": self.id, "chat_id": self.chat_id, "text": self.text, "messages": self.messages,
             "facts": self.facts, "adapter_version": self.adapter_version, "latency_ms": round(self.latency_ms, 1),
             "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
             "context_messages": self.context_messages}
        if with_prompt:
            d["prompt"] = self.prompt
        return d


class Agent:
    def __init__(self, runtime: ModelRuntime, facts: Facts | None, sessions: sessionmaker[Session],
                 config: AgentConfig = AgentConfig(), metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.facts = facts
        self.sessions = sessions
        self.config = config
        self.metrics = metrics or Metrics()

    def _chat(self, session: Session, platform: str, chat_id: str, title: str | None = None, kind: str = "private"):  # type: ignore[no-untyped-def]
        return store.get_chat(session, platform, str(chat_id), title, kind)

    def observe(self, chat_id: str, sender: str, text: str, *, platform: str = "api", sender_id: str | None = None,
                message_id: str | None = None, chat_title: str | None = None, kind: str = "private") -> None:
        """Store a message without replying (a group message not addressed to the twin still counts
        as context)."""
        with self.sessions.begin() as session:
            chat = self._chat(session, platform, chat_id, chat_title, kind)
            store.add_message(session, chat, text[: self.config.max_input_chars], sender_id or sender, sender,
                              platform_message_id=message_id)

    def reply(self, chat_id: str, sender: str, text: str, *, platform: str = "api", sender_id: str | None = None,
              message_id: str | None = None, chat_title: str | None = None, kind: str = "private") -> Reply:
        cfg = self.config
        if not text or not text.strip():
            raise InputError("The message is empty.", hint="Send some text for the twin to answer.")
        if len(text) > cfg.max_input_chars:
            raise InputError(f"The message is {len(text)} characters; the twin reads at most {cfg.max_input_chars}.",
                             hint="Send a shorter message.")
        t0 = time.perf_counter()
        ctx = cfg.context
        # 1. the incoming message is stored first, in its own transaction
        with self.sessions.begin() as session:
            chat = self._chat(session, platform, chat_id, chat_title, kind)
            incoming = store.add_message(session, chat, text, sender_id or sender, sender, platform_message_id=message_id)
            incoming_id, chat_pk, now = incoming.id, chat.id, incoming.sent_at
            limit = 8 * ctx.max_turns
            rows = store.recent_messages(session, chat, now, ctx.window, limit)
            said = [Said(m.sent_at, SELF_KEY if is_self_message(m.source, m.is_owner) else (m.sender_id or m.sender_name or "?"),
                         m.sender_name or m.sender_id or "someone", clean(m.text, ctx), is_self_message(m.source, m.is_owner))
                    for m in rows if m.text and m.text.strip() and (m.kind != "service" or ctx.include_service)]
        # 2. the conversation as the dataset builder sees it: turns inside the window
        spans = list(group_turns(said, ctx.gap))
        if len(rows) == limit and len(spans) > 1:
            spans = spans[1:]  # the oldest turn may have been cut by the limit
        turns = [s.turn() for s in in_window(spans, now, ctx)]
        if not turns:  # the incoming message is always there, unless a clock went backwards
            turns = [Said(now, sender, sender, clean(text, ctx), False)]
            turns = [s.turn() for s in group_turns(turns, ctx.gap)]
        # 3. facts for the newest incoming turn, nudged by the two before it
        hits = []
        query = facts_query(turns)
        if self.facts is not None and query is not None:
            try:
                hits = self.facts.search(query[0], context=query[1])
            except Exception as exc:  # a broken facts file must not silence the twin
                log.warning("facts unavailable for this reply: %s", exc)
        fact_texts = [h.fact.text for h in hits]
        # 4. the one prompt builder, then the model
        limits = cfg.limits
        if limits.max_length > self.runtime.max_length:  # a model shorter than the setting
            limits = PromptLimits(limits.max_context_tokens, self.runtime.max_length, limits.reserve_for_reply)
        prompt = render_prompt(self.runtime.tokenizer, cfg.persona, fact_texts, turns, limits)
        others = {t.speaker for t in turns if not t.is_self}
        generation = cfg.generation
        bias = length_bias([t.text for t in prompt.turns if t.is_self], getattr(self.runtime, "reply_chars", None),
                           generation.length_follow)
        if bias:
            generation = dataclasses.replace(generation, stop_bias=bias)
        gen = self.runtime.generate(prompt.text, generation, others, cfg.persona.name)
        reply_text = gen.text or "…"
        parts = split_reply(reply_text) if cfg.generation.split_messages else [reply_text]
        latency = (time.perf_counter() - t0) * 1000
        # 5. the record (DESIGN promise 2) and the twin's side of the conversation
        with self.sessions.begin() as session:
            chat = session.get(store.Chat, chat_pk)
            assert chat is not None
            incoming = session.get(store.Message, incoming_id)
            row = store.record_reply(session, chat, incoming, reply_text, prompt.text, [h.fact.id for h in hits],
                                     gen.adapter_version, latency)
            store.add_message(session, chat, reply_text, store.TWIN_SENDER, cfg.persona.name, from_twin=True)
            reply_id = row.id
        self.metrics.observe_reply(latency / 1000)
        return Reply(reply_id, str(chat_id), reply_text, parts, [h.to_dict() for h in hits], gen.adapter_version,
                     latency, gen.prompt_tokens, gen.new_tokens, prompt.context_used, prompt.text)

    def sent(self, reply_id: int, platform_message_ids: Sequence[str]) -> None:
        """Remember the platform's ids of the messages a reply went out as (reactions point at them)."""
        with self.sessions.begin() as session:
            reply = store.find_reply(session, reply_id)
            reply.platform_message_id = ",".join(platform_message_ids)[:255] if platform_message_ids else None

    def rate(self, reply_id: int, rater_id: str, value: int, at: datetime | None = None) -> bool:
        """Set a rating; ``at``: when the person reacted, by the platform's clock (an older event than
        the one recorded is ignored). Returns whether the rating changed."""
        with self.sessions.begin() as session:
            _, changed = store.rate(session, store.find_reply(session, reply_id), rater_id, value, at)
        if changed:
            self.metrics.observe_rating(value)
        return changed

    def correct(self, reply_id: int, author_id: str, text: str) -> None:
        with self.sessions.begin() as session:
            store.correct(session, store.find_reply(session, reply_id), author_id, text)

    def reset(self, chat_id: str, platform: str = "api") -> None:
        with self.sessions.begin() as session:
            store.reset(session, self._chat(session, platform, chat_id))
