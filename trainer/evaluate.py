"""Evaluation: held-out loss, the rating margin, and fact use; and the gate that decides whether a
new adapter may serve."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.runtime import FACT_BOOST
from trainer.examples import Example
from trainer.lora import adapted_layers, encode

log = logging.getLogger(__name__)


def first_adapted_layer(adapter: Path | None, n_layers: int, top_layers: float) -> int:
    """The lowest layer ``adapter`` changes (its ``layers_to_transform``; 0: every layer, or it
    cannot be told). For the base model (None): the lowest layer a new adapter would change."""
    import json

    if adapter is None:
        layers = adapted_layers(n_layers, top_layers)
    else:
        try:
            layers = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")).get("layers_to_transform")
        except (OSError, ValueError, AttributeError):
            layers = None
        if isinstance(layers, int):
            layers = [layers]
    if not layers or not all(isinstance(i, int) for i in layers):
        return 0
    return max(0, min(layers))


class LowerStates:
    """The hidden states entering layer ``split`` for each held-out example, computed once.

    A new adapter changes only the top layers (``top_layers``, half by default), so below ``split``
    the base model, the serving adapter and the candidate compute the same thing. The gate's
    held-out loss runs the lower layers once per validation set and each model's upper layers from
    their output: on a 2-core CPU without bf16, 96 examples (31,611 tokens) took 114 s a model with
    the whole stack. Kept in ``path`` (the evaluation cache) for the next run on the same
    validation set and base model; one file, the newest."""

    def __init__(self, split: int, path: Path | None = None) -> None:
        self.split = split
        self.path = path
        self._key: str | None = None
        self._states: list[Any] | None = None

    def _fingerprint(self, decoder: Any, rows: list[dict[str, Any]], dtype: Any) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.split}|{dtype}|{len(decoder.layers)}|".encode())
        for r in rows:
            h.update(str(r["input_ids"]).encode())
        # the lower layers' weights, sampled (a different base model differs here)
        params = [decoder.get_input_embeddings().weight, *decoder.layers[self.split - 1].parameters()]
        for w in params:
            h.update(w.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:20]

    def states(self, decoder: Any, rows: list[dict[str, Any]], batches: list[list[int]], pad: int,
               device: Any, bf16: bool) -> list[Any]:
        """Each row's hidden states entering layer ``split`` (its tokens only), from memory, the
        file, or computed now by ``decoder``'s lower layers."""
        import torch

        from trainer.lora import collate

        key = self._fingerprint(decoder, rows, torch.bfloat16 if bf16 else next(decoder.parameters()).dtype)
        if self._key == key and self._states is not None:
            return self._states
        file = self.path / f"lower-{key}.pt" if self.path is not None else None
        if file is not None and file.is_file():
            try:
                self._states, self._key = torch.load(file, map_location="cpu"), key
                return self._states
            except Exception as exc:  # a damaged file is computed again
                log.warning("held-out states in %s are unreadable (%s): computing them again", file, exc)
        out: list[Any] = [None] * len(rows)
        with _layers(decoder, 0, self.split, norm=False):
            for idx in batches:
                batch = collate([rows[j] for j in idx], pad)
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                     use_cache=False).last_hidden_state
                for i, j in enumerate(idx):
                    # kept in the precision they were computed in (bf16: half the memory and file)
                    out[j] = hidden[i, : len(rows[j]["input_ids"])].to(torch.bfloat16 if bf16 else torch.float32).cpu().clone()
        self._states, self._key = out, key
        if file is not None:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                for old in file.parent.glob("lower-*.pt"):
                    old.unlink(missing_ok=True)
                tmp = file.with_suffix(".tmp")
                torch.save(out, tmp)
                tmp.replace(file)
            except OSError as exc:
                log.warning("could not keep the held-out states in %s: %s", file.parent, exc)
        return out


@contextmanager
def _layers(decoder: Any, lo: int, hi: int, norm: bool) -> Iterator[None]:
    """``decoder`` running only its layers ``lo:hi`` (and its final norm only when ``norm``). A
    per-layer list in its config (Gemma 3's ``layer_types``: sliding or full attention, looked up
    by the layer's place in the loop) is cut the same way."""
    import torch

    layers, final = decoder.layers, decoder.norm
    cfg = getattr(decoder, "config", None)
    types = getattr(cfg, "layer_types", None)
    decoder.layers = torch.nn.ModuleList(list(layers)[lo:hi])
    if isinstance(types, list) and len(types) == len(layers):
        cfg.layer_types = types[lo:hi]
    if not norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, final
        if isinstance(types, list) and len(types) == len(layers):
            cfg.layer_types = types


def completion_logprobs(model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 0,
                        batch_size: int = 8, bf16: bool = False, lower: LowerStates | None = None) -> list[tuple[float, int]]:
    """For each example: (sum of log-probabilities of its completion tokens, number of tokens).
    Examples are batched by length (little padding); ``bf16`` computes under bf16 autocast. With
    ``lower``, the layers below ``lower.split`` run once for every model (see ``LowerStates``):
    ``model`` must compute the same as the others there."""
    import torch

    from trainer.lora import _decoder_and_head, collate, head_logprobs, labelled_logprobs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = []
    for ex in examples:
        e = encode(tokenizer, ex, max_length)
        rows.append({"input_ids": e.input_ids if e else [pad, pad], "labels": e.labels if e else [-100, -100],
                     "weight": 1.0})
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out: dict[int, tuple[float, int]] = {}
    model.eval()
    parts = _decoder_and_head(model) if lower is not None and lower.split > 0 else None
    if parts is not None and not (hasattr(parts[0], "layers") and hasattr(parts[0], "norm")
                                  and lower is not None and lower.split < len(parts[0].layers)):
        parts = None
    states = lower.states(parts[0], rows, batches, pad, device, bf16) if parts is not None and lower is not None else None
    for idx in batches:
        batch = collate([rows[j] for j in idx], pad)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if parts is None or states is None or lower is None:
                logp, where = labelled_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                                batch["labels"].to(device))
            else:  # the upper layers, from the lower layers' states
                decoder, head, cap = parts
                mid = torch.zeros((len(idx), batch["input_ids"].shape[1], states[idx[0]].shape[-1]), dtype=states[idx[0]].dtype)
                for i, j in enumerate(idx):
                    mid[i, : states[j].shape[0]] = states[j]
                with _layers(decoder, lower.split, len(decoder.layers), norm=True):
                    hidden = decoder(inputs_embeds=mid.to(device=device, dtype=next(decoder.parameters()).dtype),
                                     attention_mask=batch["attention_mask"].to(device), use_cache=False).last_hidden_state
                logp, where = head_logprobs(head, cap, hidden, batch["labels"].to(device))
        where = where.cpu()
        sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, where, logp.double().cpu())
        counts = torch.zeros(len(idx), dtype=torch.long).index_add_(0, where, torch.ones_like(where))
        for j, s, n in zip(idx, sums.tolist(), counts.tolist()):
            out[j] = (float(s), int(n))
    return [out[j] for j in range(len(rows))]


def heldout_loss(model: Any, tokenizer: Any, examples: Sequence[Example], bf16: bool = False,
                 lower: LowerStates | None = None) -> float | None:
    """Mean negative log-likelihood per completion token (perplexity = exp of it)."""
    if not examples:
        return None
    lp = completion_logprobs(model, tokenizer, examples, bf16=bf16, lower=lower)
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


_NEGATION = re.compile(r"(?i)\b(?:not|no|nope|never|cannot|\w+n't|dont|doesnt|didnt|cant|wont|isnt|arent|wasnt)\b")
_NEGATION_STUBS = {"don", "doesn", "didn", "isn", "aren", "wasn", "weren", "couldn", "shouldn", "wouldn", "haven", "hasn"}


def content_words(text: str) -> set[str]:
    from knowledge.lexical import tokenize

    return {w for w in tokenize(text) if len(w) > 2 and w not in _NEGATION_STUBS}


def negated(text: str) -> bool:
    return bool(_NEGATION.search(text.replace("’", "'")))


def states_fact(reply: str, fact_text: str) -> bool:
    """The reply states the fact when it carries at least half of the fact's content words (lightly
    stemmed: "drinking" states "drink"), with the same polarity: "I eat meat" does not state "I
    don't eat meat"."""
    words = content_words(fact_text)
    if not words:
        return False
    if negated(fact_text) != negated(reply):
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


def _not_finite(metrics: dict[str, Any]) -> str | None:
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            return name
    return None


def gate(candidate: dict[str, Any], current: dict[str, Any], loss_tolerance: float, margin_tolerance: float,
         fact_use_tolerance: float = 0.1) -> GateDecision:
    """Accept when held-out loss rose by at most ``loss_tolerance`` (relative) and the rating margin
    fell by at most ``margin_tolerance``. A metric that cannot be measured does not block; one that
    came out NaN or infinite (a diverged adapter) rejects."""
    bad = _not_finite(candidate)
    if bad is not None:
        return GateDecision(False, f"the candidate's {bad.replace('_', ' ')} is {candidate[bad]} (training diverged); "
                                   "try a lower learning_rate")
    c_loss, o_loss = candidate.get("heldout_loss"), current.get("heldout_loss")
    if c_loss is not None and o_loss is not None and c_loss > o_loss * (1 + loss_tolerance):
        return GateDecision(False, f"held-out loss rose from {o_loss:.4f} to {c_loss:.4f} "
                                   f"(more than the {loss_tolerance:.0%} tolerance)")
    c_m, o_m = candidate.get("rating_margin"), current.get("rating_margin")
    if c_m is not None and o_m is not None and c_m < o_m - margin_tolerance:
        return GateDecision(False, f"the liked-vs-disliked margin fell from {o_m:.4f} to {c_m:.4f}")
    c_fu, o_fu = (candidate.get("fact_use") or {}).get("share"), (current.get("fact_use") or {}).get("share")
    if c_fu is not None and o_fu is not None and c_fu < o_fu - fact_use_tolerance:
        return GateDecision(False, f"fact use fell from {o_fu:.0%} to {c_fu:.0%} of the questions about facts")
    parts = []
    if c_loss is not None and o_loss is not None:
        parts.append(f"held-out loss {o_loss:.4f} -> {c_loss:.4f}")
    if c_fu is not None and o_fu is not None:
        parts.append(f"fact use {o_fu:.0%} -> {c_fu:.0%}")
    if c_m is not None and o_m is not None:
        parts.append(f"rating margin {o_m:.4f} -> {c_m:.4f}")
    return GateDecision(True, "; ".join(parts) or "no held-out data to compare on")


# --- the twin's replies: fact use, small talk, voice ---------------------------------------------

EVAL_ASKER = "Sam"  # who asks the evaluation's questions (the drills' asker is someone else)


@dataclass(frozen=True)
class EvalConfig:
    examples: int = 96  # validation samples for the held-out loss (evenly spread over time)
    fact_questions: int = 16  # questions about facts, answered greedily, for fact use
    replies: int = 0  # validation contexts the model answers (reply length, authorship, unasked facts)
    max_new_tokens: int = 32  # a stated fact comes early; chat replies are shorter still
    fact_boost: float = FACT_BOOST  # as the twin serves (settings.fact_boost)
    batch_size: int = 8
    # how replies to validation conversations are generated: the serving settings (sampled as people
    # get them, each conversation seeded by its prompt, so a figure repeats), or None: greedy
    reply_sampling: Any = None
    top_layers: float = 0.5  # the share of layers a new adapter changes (TrainConfig.top_layers): below, all models agree


@dataclass(frozen=True)
class Probe:
    """One prompt the model answers during evaluation, with what a good answer has."""

    prompt: str
    fact: str | tuple[str, ...] | None = None  # the fact the answer should state (any of several; None: nothing asked)
    prompt_facts: tuple[str, ...] = ()  # the facts the prompt carries
    reference: str | None = None  # the owner's real reply to this context
    question: str | None = None  # what was asked, as written (the prompt holds it among the rest)
    own: tuple[str, ...] = ()  # the owner's earlier turns in the prompt (a reply's length follows them: length_bias)


@dataclass
class EvalSet:
    validation: list[Example] = field(default_factory=list)
    facts: list[Probe] = field(default_factory=list)  # questions about facts
    smalltalk: list[Probe] = field(default_factory=list)  # messages that ask no fact
    contexts: list[Probe] = field(default_factory=list)  # validation contexts with the owner's reply

    def fingerprint(self) -> str:
        import hashlib
        import json

        h = hashlib.sha256()
        for ex in self.validation:
            h.update(ex.prompt.encode() + b"\0" + ex.completion.encode() + b"\1")
        for group in (self.facts, self.smalltalk, self.contexts):
            h.update(json.dumps([(p.prompt, p.fact, p.reference) for p in group]).encode())
        return h.hexdigest()[:16]


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (all when there are fewer): deterministic."""
    if n <= 0:
        return []
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _facts_of(p: Probe) -> tuple[str, ...]:
    return (p.fact,) if isinstance(p.fact, str) else tuple(p.fact or ())


def question_probes(render: Callable[[list[str], str], str], retrieve: Any,
                    questions: Sequence[tuple[str, Any]]) -> list[Probe]:
    """Probes for (question, fact text or None), each prompt built as the agent builds it: ``render``
    (facts, question) is the one prompt builder, ``retrieve`` the agent's facts retrieval."""
    got = retrieve([(q, []) for q, _ in questions]) if retrieve is not None and questions else [[] for _ in questions]
    out = []
    for (q, fact), fs in zip(questions, got):
        texts = [t for _, t in fs]
        out.append(Probe(render(texts, q), tuple(fact) if isinstance(fact, list) else fact, tuple(texts), question=q))
    return out


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, int(round(p * (len(v) - 1))))])

    return {"median": q(0.5), "p25": q(0.25), "p75": q(0.75)}


def reply_metrics(answers: dict[str, list[str]], eval_set: EvalSet, probe: Any = None) -> dict[str, Any]:
    """Fact use, small talk and voice figures from the model's answers to each probe group."""
    out: dict[str, Any] = {}
    if eval_set.facts:
        stated = [any(states_fact(a, f) for f in _facts_of(p)) for a, p in zip(answers["facts"], eval_set.facts)]
        reached = [any(f in p.prompt_facts for f in _facts_of(p)) for p in eval_set.facts]
        out["fact_use"] = {"asked": len(stated), "reached_prompt": sum(reached), "stated": sum(stated),
                           "share": round(sum(stated) / len(stated), 4),
                           # each answer, so the owner can read what the twin said (the run's page)
                           "answers": [{"question": p.question, "fact": _facts_of(p)[0] if _facts_of(p) else None,
                                        "answer": a, "stated": s, "in_prompt": r}
                                       for p, a, s, r in zip(eval_set.facts, answers["facts"], stated, reached)]}
    if eval_set.smalltalk:
        recited = [any(states_fact(a, f) for f in p.prompt_facts) for a, p in zip(answers["smalltalk"], eval_set.smalltalk)]
        out["smalltalk"] = {"asked": len(recited), "with_facts_in_prompt": sum(bool(p.prompt_facts) for p in eval_set.smalltalk),
                            "stated_a_fact": sum(recited), "share": round(sum(recited) / len(recited), 4)}
    if eval_set.contexts:
        replies = answers["contexts"]
        refs = [p.reference or "" for p in eval_set.contexts]
        unasked = [any(states_fact(a, f) and not states_fact(r, f) for f in p.prompt_facts)
                   for a, r, p in zip(replies, refs, eval_set.contexts)]
        out["replies"] = {"count": len(replies), "length": _quantiles([len(a) for a in replies]),
                          "owner_length": _quantiles([len(r) for r in refs]),
                          "unasked_fact_share": round(sum(unasked) / len(unasked), 4),
                          "samples": [{"twin": a, "owner": r} for a, r in list(zip(replies, refs))[:5]],
                          "all": list(replies)}
        if probe is not None:
            out["replies"]["authorship"] = round(float(probe.mean_score(replies)), 4)
            out["replies"]["owner_authorship"] = round(float(probe.mean_score(refs)), 4)
    return out


def answer_probes(generate: Callable[[Probe, bool], str], eval_set: EvalSet) -> dict[str, list[str]]:
    """Each probe's answer; ``generate(probe, conversation)`` (conversation: a reply to a real
    validation context, generated at the serving length)."""
    return {name: [generate(p, name == "contexts") for p in getattr(eval_set, name)]
            for name in ("facts", "smalltalk", "contexts")}


def evaluate_model(model: Any, tokenizer: Any, eval_set: EvalSet, liked: Sequence[Example] = (),
                   disliked: Sequence[Example] = (), *, own_name: str = "me", device: str = "cpu",
                   bf16: bool = False, max_new_tokens: int = 32, reply_new_tokens: int = 64,
                   probe: Any = None, fact_boost: float = FACT_BOOST, runtime: Any = None,
                   reply_sampling: Any = None, lower: LowerStates | None = None,
                   reply_chars: float | None = None) -> dict[str, Any]:
    """Every figure for one model: held-out loss and perplexity, the rating margin, and from its
    greedy answers fact use and small talk; the replies to conversations (voice) greedy too, or with
    ``reply_sampling`` (a serving ``GenerationConfig``) sampled as served, seeded by each prompt.
    ``runtime`` generates the answers (a ``ModelRuntime`` serving the same weights, such as
    llama.cpp's); None: transformers on ``model``. ``reply_chars``: the adapter's typical reply
    length, from which a conversation's reply follows the owner's earlier turns, as served
    (``agent.prompt.length_bias``)."""
    import dataclasses
    import zlib

    import torch

    from agent.prompt import length_bias
    from agent.runtime import GenerationConfig, ModelRuntime

    loss = heldout_loss(model, tokenizer, eval_set.validation, bf16=bf16, lower=lower)
    metrics: dict[str, Any] = {"heldout_loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
                               "validation_examples": len(eval_set.validation),
                               "rating_margin": rating_margin(model, tokenizer, liked, disliked)}
    if loss is not None and not math.isfinite(loss):
        metrics["perplexity"] = float("nan")
    if eval_set.facts or eval_set.smalltalk or eval_set.contexts:
        runtime = runtime if runtime is not None else ModelRuntime(model, tokenizer, device)
        short = GenerationConfig(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.1,
                                 fact_boost=fact_boost, split_messages=False)
        full = GenerationConfig(temperature=0, max_new_tokens=reply_new_tokens, repetition_penalty=1.1,
                                fact_boost=fact_boost, split_messages=False)
        if reply_sampling is not None:
            full = dataclasses.replace(reply_sampling, split_messages=False)

        def generate(probe: Probe, conversation: bool) -> str:
            config = short
            if conversation:
                config = full
                bias = length_bias(probe.own, reply_chars, full.length_follow)
                if bias:
                    config = dataclasses.replace(full, stop_bias=bias)
                if full.temperature > 0:
                    torch.manual_seed(zlib.crc32(probe.prompt.encode("utf-8")))
            return runtime.generate(probe.prompt, config, {EVAL_ASKER}, own_name).text

        metrics.update(reply_metrics(answer_probes(generate, eval_set), eval_set, probe))
    return metrics
