"""The training configuration: one typed object, every field with its help text, saved next to the
adapter it produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# the settings that take one of a few words, and the words
CHOICES = {"loss_average": ("token", "example"), "history_samples": ("covering", "all")}


@dataclass
class TrainConfig:
    rank: int = _f(16, "LoRA rank r: the size of the low-rank update; more learns more and costs more.")
    alpha: int = _f(32, "LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = _f(0.05, "Dropout on the LoRA input during training.")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Linear layers that get a LoRA update (attention and MLP).")
    top_layers: float = _f(0.5, "Share of the model's layers, from the top, that get LoRA (1.0: all). Backpropagation stops below the lowest one: 0.5 trains 1.6x the tokens per second here.")
    learning_rate: float = _f(3e-3, "Peak learning rate (AdamW, linear decay after warm-up).")
    warmup_ratio: float = _f(0.05, "Share of the steps spent warming the learning rate up.")
    epochs: float = _f(1.0, "Passes over the training set.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: as many as the epochs take).")
    max_length: int = _f(0, "Longest example in tokens (0: as built; prompts are never cut, the prompt builder's limits apply).")
    batch_size: int = _f(4, "Examples per forward pass.")
    gradient_accumulation: int = _f(2, "Forward passes per optimizer step (effective batch = batch_size x this).")
    loss_average: str = _f("example", "How the loss weighs what it learns: example (each example's mean over its tokens, then the mean over the batch: a short reply weighs as much as a long one) or token (every learned token of the history counts alike, as the held-out loss counts them, whichever batch it falls in; a fact drill, rating or correction weighs what an average example does). Measured: 8 minutes of LoRA, held-out perplexity -24.5 % with token against -21.7 % with example; a default 25-minute run with token -13 % (one run; -16 % with example), where every reply is learned about 3.5 times a pass through the earlier replies of the samples after it, and the held-out loss rises again after 8-12 minutes either way.")
    max_batch_tokens: int = _f(1024, "Most tokens (rows x padded length) one forward pass takes: a longer batch runs in parts with the same gradient, so the few longest examples do not set the memory peak (0: no cap). Measured here: 7.3 GB -> 3.1 GB at the longest batch, the same speed.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~10 % slower.")
    bf16: str = _f("auto", "bf16 autocast: auto (where the hardware computes bf16 natively), on, off.")
    seed: int = _f(17, "Random seed (shuffling, LoRA init, dropout).")
    save_steps: int = _f(50, "Write a checkpoint every this many steps; a crashed run resumes from the last.")
    context_targets: bool = _f(True, "Also learn your earlier replies inside each sample's prompt (your own turns in its context), so one pass over a prompt learns several of your replies; the sample's own reply is always learned.")
    history_samples: str = _f("covering", "Which of the history's samples a first training learns from: covering (the fewest, newest first in each chat, whose prompts hold each of your replies once, as the reply or an earlier reply that context_targets learns; 808 of 3,047 on the stand-in history, 27 % of the tokens) or all (every sample: each reply is learned about 3.5 times a pass, and the held-out loss rises again after the first repetitions). With context_targets off, all are used. Measured: held-out perplexity -22.8 % in 6 minutes with covering, -19.2 % with all at 6 minutes and -20.4 % at their best (12 minutes); `doppel train` on the stand-in history, fp32: -20 % in one 18-minute pass with covering, where all would take about 70 minutes.")
    max_minutes: float = _f(25.0, "Time budget of the training loop (0: none). The run times a few steps first and trains on as many examples as fit (every rating and correction, fact drills up to a quarter, the rest your history); its learning rate decays by the end of the steps or of the budget, whichever comes first, so a machine slower than its timing still ends the run decayed.")
    # replay of ratings
    replay_ratio: float = _f(2.0, "Original-dataset examples mixed in per rating example, so the voice stays.")
    unlikelihood_weight: float = _f(1.0, "Weight of the loss that pushes a disliked reply's tokens down.")
    balance_classes: bool = _f(True, "Weight liked and disliked examples so neither class drowns the other.")
    # the gate
    loss_tolerance: float = _f(0.02, "A new adapter may raise held-out loss by at most this share (0.02 = 2 %).")
    margin_tolerance: float = _f(0.0, "How far the liked-vs-disliked log-prob margin may fall (nats per token).")
    fact_use_tolerance: float = _f(0.1, "How far the share of questions about facts answered with the fact may fall (0.1 = 10 points).")
    eval_examples: int = _f(96, "Validation samples the gate computes held-out loss on (evenly spread over time; 0: all).")
    eval_fact_questions: int = _f(16, "Questions about facts the gate asks each model (0: fact use is not checked).")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}
