"""Evaluation: held-out loss, the rating margin, and fact use; and the gate that decides whether a
new adapter may serve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.examples import Example
from trainer.lora import encode


def completion_logprobs(model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 1024,
                        batch_size: int = 8) -> list[tuple[float, int]]:
    """For each example: (sum of log-probabilities of its completion tokens, number of tokens)."""
    import torch

    from trainer.lora import collate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        rows = []
        for ex in examples[i:i + batch_size]:
            e = encode(tokenizer, ex, max_length)
            rows.append({"input_ids": e.input_ids if e else [pad, pad], "labels": e.labels if e else [-100, -100],
                         "weight": 1.0})
        batch = collate(rows, pad)
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        logits = logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(device)
        mask = target != -100
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for s, n in zip((logp * mask).sum(1).tolist(), mask.sum(1).tolist()):
            out.append((float(s), int(n)))
    return out


def heldout_loss(model: Any, tokenizer: Any, examples: Sequence[Example]) -> float | None:
    """Mean negative log-likelihood per completion token (perplexity = exp of it)."""
    if not examples:
        return None
    lp = completion_logprobs(model, tokenizer, examples)
    tokens = sum(n for _, n in lp)
    return -sum(s for s, _ in lp) / max(tokens, 1)


def mean_logprob(model: Any, tokenizer: Any, examples: Sequence[Example]) -> list[float]:
    """Per-token mean log-probability of each example's completion."""
    return [s / max(n, 1) for s, n in completion_logprobs(model, tokenizer, examples)]


def rating_margin(model: Any, tokenizer: Any, liked: Sequence[Example], disliked: Sequence[Example]) -> float | None:
    """Mean log-prob per token of liked replies minus that of disliked ones, under their prompts."""
    if not liked or not disliked:
        return None
    up = mean_logprob(model, tokenizer, liked)
    down = mean_logprob(model, tokenizer, disliked)
    return sum(up) / len(up) - sum(down) / len(down)


@dataclass
class FactUse:
    asked: int
    stated: int

    @property
    def share(self) -> float:
        return self.stated / self.asked if self.asked else 0.0


def fact_questions(facts: Sequence[Any]) -> list[tuple[Any, str]]:
    """A question for each fact about its topic ("I live in Prague" under "Home" -> "what can you
    tell me about home?"), so the question does not hand the reply its answer."""
    out = []
    for f in facts:
        topic = (f.topic or "yourself").strip().lower()
        out.append((f, f"what can you tell me about {topic}?" if topic != "yourself" else "tell me something about yourself"))
    return out


def content_words(text: str) -> set[str]:
    from knowledge.lexical import tokenize

    return {w for w in tokenize(text) if len(w) > 2}


def states_fact(reply: str, fact_text: str) -> bool:
    """The reply states the fact when it carries at least half of the fact's content words."""
    words = content_words(fact_text)
    if not words:
        return False
    return len(words & content_words(reply)) >= math.ceil(len(words) / 2)


def fact_use(runtime: Any, tokenizer: Any, persona: Any, facts: Sequence[Any], limit: int = 8,
             max_new_tokens: int = 40) -> FactUse:
    """Ask about each fact's topic with that fact in the prompt; count replies that state it."""
    from agent.prompt import Turn, render_prompt
    from agent.runtime import GenerationConfig

    cfg = GenerationConfig(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.1)
    asked = stated = 0
    for fact, question in fact_questions(facts)[:limit]:
        prompt = render_prompt(tokenizer, persona, [fact.text], [Turn("friend", question)]).text
        reply = runtime.generate(prompt, cfg, {"friend"}, persona.name).text
        asked += 1
        stated += states_fact(reply, fact.text)
    return FactUse(asked, stated)


@dataclass
class GateDecision:
    accept: bool
    reason: str


def gate(candidate: dict[str, Any], current: dict[str, Any], loss_tolerance: float, margin_tolerance: float) -> GateDecision:
    """Accept when held-out loss rose by at most ``loss_tolerance`` (relative) and the rating margin
    fell by at most ``margin_tolerance``. A metric that cannot be measured does not block."""
    c_loss, o_loss = candidate.get("heldout_loss"), current.get("heldout_loss")
    if c_loss is not None and o_loss is not None and c_loss > o_loss * (1 + loss_tolerance):
        return GateDecision(False, f"held-out loss rose from {o_loss:.4f} to {c_loss:.4f} "
                                   f"(more than the {loss_tolerance:.0%} tolerance)")
    c_m, o_m = candidate.get("rating_margin"), current.get("rating_margin")
    if c_m is not None and o_m is not None and c_m < o_m - margin_tolerance:
        return GateDecision(False, f"the liked-vs-disliked margin fell from {o_m:.4f} to {c_m:.4f}")
    parts = []
    if c_loss is not None and o_loss is not None:
        parts.append(f"held-out loss {o_loss:.4f} -> {c_loss:.4f}")
    if c_m is not None and o_m is not None:
        parts.append(f"rating margin {o_m:.4f} -> {c_m:.4f}")
    return GateDecision(True, "; ".join(parts) or "no held-out data to compare on")
