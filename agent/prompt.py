"""The one prompt format (DESIGN promise 1).

``render_prompt`` turns (persona, facts, windowed context) into model input text. The trainer
builds every training sample through ``render_example``, which calls ``render_prompt``; the agent
calls ``render_prompt`` when it serves. What the model sees in training is what it sees in service.

Roles: the twin's own earlier messages are ``assistant`` turns, everyone else's are ``user`` turns
written as "Name: text" (so group chats keep who said what). The tokenizer's chat template is used
when it has one; a plain transcript otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Tokenizer(Protocol):  # the part of a Hugging Face tokenizer we use
    chat_template: Any

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Persona:
    name: str = "me"
    description: str = ""


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    is_self: bool = False
    target: bool = False  # training only: the owner wrote this turn, so the model may learn it too


@dataclass
class Prompt:
    text: str  # the exact model input
    context_used: int  # how many context turns fit
    token_count: int
    truncated_newest: bool = False
    turns: list[Turn] = field(default_factory=list)
    # training only: character spans of the text that are the owner's own earlier replies (their
    # assistant turns and end markers), for turns marked ``target``
    targets: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class PromptLimits:
    max_context_tokens: int = 256  # budget of the context turns (the newest are kept)
    max_length: int = 1024  # the whole input, the reply's room included
    reserve_for_reply: int = 64


def system_text(persona: Persona, facts: Sequence[str] = ()) -> str:
    lines = [f"You are {persona.name}, chatting with people you know. Write your next message "
             f"the way {persona.name} writes: same language, length and tone."]
    if persona.description:
        lines.append(persona.description.strip())
    if facts:
        lines.append(facts_block(facts))
    return "\n".join(lines)


def facts_block(facts: Sequence[str]) -> str:
    return "\n".join([FACTS_HEADER, *(f"- {f}" for f in facts)])


FACTS_HEADER = "Facts about you:"


def split_facts(prompt: str) -> tuple[str, list[str]]:
    """The prompt with its facts block (the header and its "- " lines) taken out, and the facts'
    lines as they stand in it (without the "- "): what the repetition penalty may hold against a
    reply, and what the fact boost favours (see ``agent.runtime.ReplyRepetitionPenalty``)."""
    at = prompt.find(FACTS_HEADER + "\n")
    if at < 0:
        return prompt, []
    end = at + len(FACTS_HEADER) + 1
    facts = []
    while prompt.startswith("- ", end):
        nl = prompt.find("\n", end)
        stop = len(prompt) if nl < 0 else nl
        facts.append(prompt[end + 2:stop])
        end = len(prompt) if nl < 0 else nl + 1
    return prompt[:at] + prompt[end:], facts


def without_facts(prompt: str) -> str:
    """The prompt with its facts block taken out (see ``split_facts``)."""
    return split_facts(prompt)[0]


LENGTH_BIAS_LIMIT = 2.0  # at most e^2 times the odds of stopping, either way


def length_bias(own: Sequence[str], typical: float | None, follow: float = 1.0, prior: float = 1.0) -> float:
    """The stop bias (``GenerationConfig.stop_bias``) that lets a reply's length follow the owner's
    own turns earlier in this conversation (``own``), measured against ``typical``, the median
    length of the replies the serving adapter learnt from.

    A person writes longer in some conversations and periods than in others, and a twin that learnt
    their whole history writes their average: on the stand-in history the owner's replies in the
    newest tenth (the validation period) have a median of 196 characters against 67 in the training
    period, and their own earlier turns in those conversations 178 against 66; the twin wrote 65
    (README "Reply length"). The estimate is the geometric mean of the earlier turns' lengths,
    shrunk toward ``typical`` as if ``prior`` turns of typical length stood beside them, and the
    bias is ``-follow`` times its log ratio to ``typical`` (where stopping is rare and even, the
    odds of stopping scale by ``exp(bias)`` and the expected length by its inverse), clamped to
    ``LENGTH_BIAS_LIMIT``. No earlier turn of the owner's, no ``typical`` or ``follow`` 0: 0."""
    lengths = [len(t.strip()) for t in own if t and t.strip()]
    if not lengths or not typical or typical <= 0 or not follow:
        return 0.0
    n = len(lengths)
    estimate = (sum(math.log(x) for x in lengths) + prior * math.log(typical)) / (n + prior)
    bias = -follow * (estimate - math.log(typical))
    return max(-LENGTH_BIAS_LIMIT, min(LENGTH_BIAS_LIMIT, bias))


def _turn_content(turn: Turn) -> str:
    return turn.text if turn.is_self else f"{turn.speaker}: {turn.text}"


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """How many tokens ``text`` is (no special tokens added): the tokenizer's own ``count`` where
    it has one (``agent.fasttok``'s counts the pieces between the template's markers once each)."""
    count = getattr(tokenizer, "count", None)
    if count is not None:
        return int(count(text))
    return len(tokenizer.encode(text, add_special_tokens=False))


def turn_size(tokenizer: Tokenizer, turn: Turn) -> int:
    """A turn's share of the context budget: its tokens plus the template's few around it."""
    return len(tokenizer.encode(_turn_content(turn), add_special_tokens=False)) + 4


def to_messages(persona: Persona, facts: Sequence[str], turns: Sequence[Turn]) -> list[dict[str, str]]:
    """The chat as the template's messages. The facts go right after the newest incoming message,
    next to where the reply starts, not into the system message at the top. Fact use measured the
    same either way within one run's noise (README "The twin's quality"); what decides it is that
    the conversation before them stays one prefix from message to message, which the serving
    backend's prompt cache reuses (a chat's next message prefilled in 225 ms instead of 637). Where the newest turn is the twin's own, the facts
    stay in the system message (no template lets them stand in an assistant turn)."""
    msgs = [{"role": "system", "content": system_text(persona)}]
    for turn in turns:
        role = "assistant" if turn.is_self else "user"
        content = _turn_content(turn)
        if msgs[-1]["role"] == role:  # templates expect alternating roles
            msgs[-1]["content"] += "\n" + content
        else:
            msgs.append({"role": role, "content": content})
    if facts:
        if msgs[-1]["role"] == "user":
            msgs[-1]["content"] += "\n\n" + facts_block(facts)
        else:
            msgs[0]["content"] = system_text(persona, facts)
    return msgs


def _render(tokenizer: Tokenizer, persona: Persona, facts: Sequence[str], turns: Sequence[Turn]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(to_messages(persona, facts, turns), tokenize=False, add_generation_prompt=True)
    lines = [system_text(persona), ""]
    lines += [f"{persona.name if t.is_self else t.speaker}: {t.text}" for t in turns]
    if facts:
        lines += ["", facts_block(facts)]
    lines.append(f"{persona.name}:")
    return "\n".join(lines)


def _target_spans(tokenizer: Tokenizer, text: str, turns: Sequence[Turn]) -> list[tuple[int, int]]:
    """Where the assistant messages made only of ``target`` turns sit in ``text`` (their content
    and end marker, as a completion is labelled). Empty where the template frames replies in a way
    the probe does not recognise."""
    frame = _completion_frame(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if frame is None:
        return []
    groups: list[tuple[str, bool]] = []  # the assistant messages, as ``to_messages`` merges them
    role = None
    for turn in turns:
        r = "assistant" if turn.is_self else "user"
        if r == "assistant":
            if role == "assistant":
                content, target = groups[-1]
                groups[-1] = (content + "\n" + _turn_content(turn), target and turn.target)
            else:
                groups.append((_turn_content(turn), turn.target))
        role = r
    spans, pos = [], 0
    for content, target in groups:
        needle = frame[0] + content + frame[1]
        at = text.find(needle, pos)
        if at < 0:
            continue
        if target:
            spans.append((at + len(frame[0]), at + len(needle)))
        pos = at + len(needle)
    return spans


_PROBE = "\x00reply\x00"


def completion_text(tokenizer: Tokenizer, reply: str) -> str:
    """What follows the prompt for a reply: the reply and the end-of-turn marker."""
    if getattr(tokenizer, "chat_template", None):
        frame = _completion_frame(tokenizer)
        if frame is not None:
            return frame[0] + reply + frame[1]
        probe = [{"role": "user", "content": "x"}]
        prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": reply}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return f" {reply}\n{eos}"


def reply_of(tokenizer: Tokenizer, completion: str) -> str:
    """The reply text of a ``completion_text`` (the template's frame around it removed)."""
    frame = _completion_frame(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if frame and completion.startswith(frame[0]) and completion.endswith(frame[1]):
        return completion[len(frame[0]): len(completion) - len(frame[1])].strip()
    return completion.strip()


def _completion_frame(tokenizer: Tokenizer) -> tuple[str, str] | None:
    """What the template writes before and after an assistant reply, found once per tokenizer with
    a probe (None when the template does something else with the reply's text)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_doppel_completion_frame", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": _PROBE}], tokenize=False)
    frame = None
    if full.startswith(prompt) and full.count(_PROBE) == 1:
        before, after = full[len(prompt):].split(_PROBE)
        check = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": "a b"}], tokenize=False)
        if check == prompt + before + "a b" + after:
            frame = (before, after)
    try:
        tokenizer._doppel_completion_frame = (template, frame)  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return frame


def render_prompt(tokenizer: Tokenizer, persona: Persona, facts: Sequence[str], turns: Sequence[Turn],
                  limits: PromptLimits = PromptLimits(), sizes: Sequence[int] | None = None) -> Prompt:
    """Fit the context into the budget: drop the oldest turns first, never the newest one; if the
    newest alone is too long, keep its end. Never exceeds ``limits.max_length``.

    ``sizes`` are the turns' ``turn_size``s when the caller has them already (the dataset builder
    counts each turn once, not once per prompt it appears in)."""
    if not turns:
        raise ValueError("a prompt needs at least the newest message")
    turns = list(turns)
    sizes = list(sizes) if sizes is not None else [turn_size(tokenizer, t) for t in turns]
    if len(sizes) != len(turns):
        raise ValueError("one size per turn")
    start, total = 0, sum(sizes)
    while start < len(turns) - 1 and total > limits.max_context_tokens:
        total -= sizes[start]
        start += 1
    budget = limits.max_length - limits.reserve_for_reply
    truncated = False
    while True:
        used = turns[start:]
        text = _render(tokenizer, persona, facts, used)
        n = count_tokens(tokenizer, text)
        if n <= budget:
            targets = _target_spans(tokenizer, text, used) if any(t.target for t in used) else []
            return Prompt(text, len(used) - 1, n, truncated, used, targets)
        if start < len(turns) - 1:
            start += 1
            continue
        # Only the newest message is left and it is still too long: keep its end.
        newest = turns[-1]
        excess = n - budget
        ids = tokenizer.encode(newest.text, add_special_tokens=False)
        if excess >= len(ids):
            raise ValueError("the persona and facts alone exceed the model's length; shorten them")
        cut = tokenizer.decode(ids[excess + 8:]) if hasattr(tokenizer, "decode") else newest.text[-(len(newest.text) // 2):]
        turns[-1] = Turn(newest.speaker, "…" + cut, newest.is_self)
        truncated = True


@dataclass
class Example:
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: loss only on the reply


def render_example(tokenizer: Tokenizer, persona: Persona, facts: Sequence[str], turns: Sequence[Turn],
                   reply: str, limits: PromptLimits = PromptLimits()) -> Example:
    """A training example built through ``render_prompt``; labels cover only the reply tokens."""
    prompt = render_prompt(tokenizer, persona, facts, turns, limits)
    completion = completion_text(tokenizer, reply)
    p_ids = tokenizer.encode(prompt.text, add_special_tokens=False)
    c_ids = tokenizer.encode(completion, add_special_tokens=False)
    room = limits.max_length - len(p_ids)
    c_ids = c_ids[:max(room, 1)]
    return Example(prompt.text, completion, p_ids + c_ids, [-100] * len(p_ids) + c_ids)
