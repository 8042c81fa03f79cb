"""LoRA fine-tuning with transformers' Trainer.

The loss covers only the completion's tokens (labels -100 on the prompt). Examples carry a weight:
a positive one is ordinary likelihood training, a negative one (a 👎 reply) is an unlikelihood loss,
-log(1 - p(token)), which pushes those tokens down without pulling anything else up. trl's
KTOTrainer would need a reference model pass per step (twice the compute on a CPU); the
unlikelihood term needs none, and the replayed dataset keeps the model anchored.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.examples import Example

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float | None], None]  # step, total steps, last loss


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    weight: float


def encode(tokenizer: Any, ex: Example, max_length: int = 0, context_targets: bool = False) -> Encoded | None:
    """Token ids and labels (-100 on the prompt). The prompt is kept whole, as the agent serves it;
    with ``max_length`` > 0 a longer example loses the end of its reply, or is left out (None) when
    the prompt alone does not fit. ``context_targets``: the owner's earlier replies inside the
    prompt (``ex.targets``) are labelled too, so one pass learns several of their replies."""
    c = tokenizer.encode(ex.completion, add_special_tokens=False)
    if not c:
        return None
    if context_targets and ex.targets:
        enc = tokenizer(ex.prompt, add_special_tokens=False, return_offsets_mapping=True)
        p = list(enc["input_ids"])
        spans = sorted(ex.targets)
        p_labels, j = [], 0
        for tid, (a, b) in zip(p, enc["offset_mapping"]):
            while j < len(spans) and spans[j][1] <= a:
                j += 1
            inside = j < len(spans) and spans[j][0] <= a and b <= spans[j][1] and b > a
            p_labels.append(tid if inside else -100)
    else:
        p = tokenizer.encode(ex.prompt, add_special_tokens=False)
        p_labels = [-100] * len(p)
    if max_length > 0 and len(p) + len(c) > max_length:
        if len(p) >= max_length - 4:
            return None
        c = c[: max_length - len(p)]
    return Encoded(p + c, p_labels + c, ex.weight)


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    weights = torch.tensor([b["weight"] for b in batch], dtype=torch.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def weighted_loss(logits: Any, labels: Any, weights: Any, unlikelihood_weight: float, average: str = "token") -> Any:
    """The loss of a batch from its full logits: w * NLL for an example of weight w > 0, |w| *
    unlikelihood for w < 0; ``average`` "token": the mean over every labelled token of the batch
    (each token counts alike, as in the held-out loss), "example": each example's mean over its
    tokens, then the mean over the examples."""
    import torch

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # log(1 - p), computed stably; p close to 1 is clamped so the gradient stays finite
    one_minus = torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6))
    w = weights.unsqueeze(1)
    per_token = torch.where(w > 0, -w * logp, w.abs() * unlikelihood_weight * -one_minus) * mask
    if average == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()


def adapted_layers(n_layers: int, top_layers: float) -> list[int] | None:
    """The layers a new adapter puts LoRA on: the top ``top_layers`` share of ``n_layers`` (None: all)."""
    if 0 < top_layers < 1 and n_layers > 1:
        return list(range(n_layers - max(1, round(n_layers * top_layers)), n_layers))
    return None


def _decoder_and_head(model: Any) -> tuple[Any, Any, float | None] | None:
    """(the decoder stack, the output head, logit soft-capping) of a decoder-only causal LM, so the
    head can run on the labelled positions alone; None for other models (full logits then)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return None
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or not callable(decoder):
        return None
    return decoder, head, getattr(cfg, "final_logit_softcapping", None)


def labelled_logprobs(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, Any]:
    """log p(label) at every labelled position (predicted from the position before it), and the row
    each belongs to. The output head (49k-262k words wide: up to two thirds of a small model's
    compute) runs on those positions only, never on the prompt's."""
    import torch

    target = labels[:, 1:]
    mask = target != -100
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
        return logp, mask.nonzero(as_tuple=True)[0]
    decoder, head, cap = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head_logprobs(head, cap, hidden, labels)


def head_logprobs(head: Any, cap: float | None, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """``labelled_logprobs`` from the decoder's last hidden states: the output head on the
    labelled positions only."""
    import torch

    target = labels[:, 1:]
    mask = target != -100
    logits = head(hidden[:, :-1][mask])
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
    return logp, mask.nonzero(as_tuple=True)[0]


def labelled_loss(logp: Any, rows: Any, weights: Any, unlikelihood_weight: float, average: str = "token",
                  tokens: float = 0.0) -> Any:
    """``weighted_loss`` from the labelled positions' log-probabilities (see ``labelled_logprobs``).
    ``tokens`` (with ``average`` "token"): divide by this many tokens instead of the batch's own
    count; a training run passes the mean count of a batch over its whole training set, so that a
    token weighs the same whichever batch it falls in (batches grouped by length hold from a few
    tokens to a thousand)."""
    import torch

    one_minus = torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6))
    w = weights[rows]
    per_token = torch.where(w > 0, -w * logp, w.abs() * unlikelihood_weight * -one_minus)
    if average == "token":
        return per_token.sum() / (tokens if tokens > 0 else max(int(logp.shape[0]), 1))
    n = weights.shape[0]
    n_tok = torch.zeros(n, device=logp.device).index_add_(0, rows, torch.ones_like(logp)).clamp(min=1)
    return (torch.zeros(n, device=logp.device, dtype=per_token.dtype).index_add_(0, rows, per_token) / n_tok).mean()


def _use_bf16(setting: str, device: str) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    from agent.runtime import cpu_has_native_bf16

    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


DRILL_SHARE = 0.25  # at most this share of a cut-down run is fact drills


def _select(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows for a run the time budget cuts down: every rating and correction (few, and the
    reason for a nightly run), fact drills up to a quarter of ``n``, the rest a random share of the
    history. (Keeping every drill, as before, made a short run on a slow or busy machine almost all
    drills: measured, 129 of 129 examples, fact use 2/16 -> 14/16 and held-out loss 3.76 -> 4.86.)"""
    rng = random.Random(seed)
    keep = [r for r in rows if r["source"] not in ("dataset", "drill")]
    drills = [r for r in rows if r["source"] == "drill"]
    rest = [r for r in rows if r["source"] == "dataset"]
    rng.shuffle(drills)
    rng.shuffle(rest)
    drills = drills[: max(0, min(len(drills), int(n * DRILL_SHARE), n - len(keep)))]
    chosen = keep + drills + rest[: max(0, n - len(keep) - len(drills))]
    if len(chosen) < n:  # too little history: fill up with the drills left out
        taken = {id(r) for r in chosen}
        chosen += [r for r in rows if r["source"] == "drill" and id(r) not in taken][: n - len(chosen)]
    return chosen


def _with_facts(rows: list[dict[str, Any]], with_facts: Callable[[list[Example]], list[Example]], tokenizer: Any,
                config: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chosen rows with their examples' facts: a row whose prompt the facts changed is encoded
    again. Also returns how many got facts and the time it took."""
    t = time.perf_counter()
    done = with_facts([r["example"] for r in rows])
    out, changed = [], 0
    for r, ex in zip(rows, done):
        if ex.prompt != r["example"].prompt or ex.targets != r["example"].targets:
            e = encode(tokenizer, ex, config.max_length, config.context_targets)
            changed += 1
            if e is None:
                continue
            r = {**r, "input_ids": e.input_ids, "labels": e.labels, "example": ex}
        out.append(r)
    took = time.perf_counter() - t
    log.info("facts retrieved for the %d examples of this run (%d prompts carry facts) in %.1f s", len(rows), changed, took)
    return out, {"examples_given_facts": changed, "facts_retrieval_s": round(took, 1)}


def _plan(model: Any, rows: list[dict[str, Any]], config: TrainConfig, work_dir: Path, pad_id: int, bf16: bool,
          device: str) -> dict[str, Any]:
    """How many examples fit the time budget: a few timed steps on typical examples, then the
    examples that fit ``max_minutes``. Kept in ``work_dir`` so that a resumed run trains on the same."""
    available = len(rows)
    if config.max_minutes <= 0 or config.max_steps > 0:
        return {"available": available, "examples": available}
    saved = work_dir / "plan.json"
    if saved.is_file():
        plan = json.loads(saved.read_text())
        if plan.get("available") == available:
            return dict(plan)
    import torch

    per_step = config.batch_size * config.gradient_accumulation
    lengths = sorted(len(r["input_ids"]) for r in rows)
    median = lengths[len(lengths) // 2]
    typical = sorted(rows, key=lambda r: abs(len(r["input_ids"]) - median))[: config.batch_size]
    batch = collate(typical, pad_id)
    dev = torch.device(device)
    model.train()
    times = []
    for _ in range(3):  # the first is warm-up
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logp, where = labelled_logprobs(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                            batch["labels"].to(dev))
            loss = labelled_loss(logp, where, batch["weights"].to(dev), 1.0)
        loss.backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    seconds_per_example = min(times[1:]) / len(typical)
    mean_len = sum(lengths) / len(lengths)
    seconds_per_example *= mean_len / max(median, 1)  # the budget is spent on the mean, not the median
    # the steady state ran at 0.77 of the timed steps' speed on one machine (bf16) and at 1.23 on
    # another (fp32): the plan fills the budget, and the learning rate decays with the time spent
    # as well as the steps taken (``budget_lr``), so a run slower than planned still ends decayed
    fit = int(config.max_minutes * 60 / seconds_per_example)
    wanted = math.ceil(available * config.epochs)
    examples = min(available, max(per_step, fit)) if fit < wanted else available
    plan = {"available": available, "examples": examples,
            "tokens_per_s": round(median * len(typical) / min(times[1:]), 1)}
    work_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(plan))
    if examples < available:
        log.info("time budget %.0f min: training on %d of %d examples (%.0f tokens/s measured)",
                 config.max_minutes, examples, available, plan["tokens_per_s"])
    return plan


def budget_lr(warmup: int, total: int, spent: Callable[[], float]) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warm-up over ``warmup`` steps, then a linear
    decay to 0 by whichever ends first, the ``total`` steps or the time budget (``spent()``: the
    share of it gone). With the time at 0 it is transformers' "linear" schedule. A run the budget
    ends before its last step ends with its learning rate decayed, as a run that fits does (with
    the steps alone it stopped mid-schedule: the last steps' updates at the full rate)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, 1.0 - max((step - warmup) / max(1, total - warmup), spent()))

    return factor


def _learned(labels: Sequence[int]) -> int:
    """How many tokens of an encoded example are learned (a label predicts the next position)."""
    return sum(1 for x in labels[1:] if x != -100)


def _token_weights(rows: list[dict[str, Any]], config: TrainConfig) -> float:
    """For ``loss_average`` "token": the mean number of learned tokens a batch holds over the run's
    training set (every batch's loss is divided by it), and the weights that make each fact drill,
    rating and correction weigh what an average example of the run does, as they did when every
    example weighed alike (a drill's answer is a few tokens; a history sample with its earlier
    replies learned a hundred or more). The history's own samples weigh by their tokens."""
    learned = [_learned(r["labels"]) for r in rows]
    mean = sum(learned) / max(len(rows), 1)
    for r, n in zip(rows, learned):
        if r["source"] != "dataset" and n > 0:
            r["weight"] = r["weight"] * mean / n
    return mean * config.batch_size


def train_lora(model: Any, tokenizer: Any, examples: list[Example], config: TrainConfig, work_dir: Path,
               out_dir: Path, *, start_adapter: Path | None = None, progress: Progress | None = None,
               device: str = "cpu", with_facts: Callable[[list[Example]], list[Example]] | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on ``examples`` and write it to ``out_dir``. Checkpoints go to
    ``work_dir``; a run started again with the same ``work_dir`` resumes from the last one.
    ``start_adapter`` continues from an existing adapter (the nightly retrain does). ``with_facts``
    (``trainer.examples.with_facts`` bound to the agent's retrieval) gives the examples the run
    trains on their facts, once the time budget has chosen them."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    encoded = [(e, ex) for e, ex in ((encode(tokenizer, ex, config.max_length, config.context_targets), ex)
                                     for ex in examples)
               if e is not None]
    if not encoded:
        from common.errors import InputError

        raise InputError("Nothing to train on.", hint="Build the training set (`doppel dataset build`) or collect ratings first.")
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "weight": e.weight, "source": ex.source, "example": ex}
            for e, ex in encoded]

    if start_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        layers = adapted_layers(int(getattr(model.config, "num_hidden_layers", 0) or 0), config.top_layers)
        lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), task_type="CAUSAL_LM", layers_to_transform=layers)
        peft_model = get_peft_model(model, lcfg)
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bf16 = _use_bf16(config.bf16, device)
    plan = _plan(peft_model, rows, config, work_dir, pad_id, bf16, device)
    if plan["examples"] < len(rows):
        rows = _select(rows, plan["examples"], config.seed)
    facts_note: dict[str, Any] = {}
    if with_facts is not None:
        rows, facts_note = _with_facts(rows, with_facts, tokenizer, config)
    norm = _token_weights(rows, config) if config.loss_average == "token" else 0.0
    rows = [{k: v for k, v in r.items() if k not in ("source", "example")} for r in rows]
    tokens = sum(len(r["input_ids"]) for r in rows)
    steps_per_epoch = max(1, math.ceil(len(rows) / (config.batch_size * config.gradient_accumulation)))
    epochs = config.epochs if plan["examples"] >= plan["available"] else 1.0
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(steps_per_epoch * epochs))
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation, learning_rate=config.learning_rate,
        num_train_epochs=epochs, max_steps=total, warmup_steps=int(config.warmup_ratio * total),
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=2, report_to=[], seed=config.seed, bf16=bf16,
        remove_unused_columns=False, train_sampling_strategy="group_by_length",
        disable_tqdm=True, use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
    )
    if config.gradient_checkpointing:  # renamed activation checkpointing in transformers 5
        enable = getattr(peft_model, "activation_checkpointing_enable", None) or peft_model.gradient_checkpointing_enable
        enable()
    losses: list[float] = []
    step_losses: list[tuple[int, float]] = []

    deadline = [0.0, 0.0]  # when the budget ends, and its length (from the loop's start)
    stopped_early = [False]
    timed = config.max_minutes > 0 and config.max_steps <= 0  # the plan's budget: the learning rate decays with it
    last_lr: list[float] = []

    def spent() -> float:
        return 1.0 - (deadline[0] - time.monotonic()) / deadline[1] if timed and deadline[1] else 0.0

    class _Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            budget = config.max_minutes * 60 if config.max_minutes > 0 else float("inf")
            deadline[:] = [time.monotonic() + budget, budget]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.monotonic() > deadline[0] and state.global_step < state.max_steps:
                if timed:
                    log.info("the time budget (max_minutes=%s) ended the run at step %d of %d, its learning rate "
                             "decayed with the time; saving the adapter", config.max_minutes, state.global_step,
                             state.max_steps)
                else:
                    log.warning("the time budget (max_minutes=%s) is spent at step %d of %d; saving the adapter as it is",
                                config.max_minutes, state.global_step, state.max_steps)
                stopped_early[0] = True
                control.should_training_stop = True
                control.should_save = False

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "learning_rate" in logs:
                last_lr[:] = [float(logs["learning_rate"])]
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                step_losses.append((int(state.global_step), float(logs["loss"])))
            if progress:
                progress(state.global_step, state.max_steps or total, losses[-1] if losses else None)

    unlikelihood_weight = config.unlikelihood_weight
    max_tokens = config.max_batch_tokens
    average = config.loss_average

    class _Trainer(Trainer):
        _share = 1.0  # the part of the batch this forward pass computes (see ``training_step``)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None and timed:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    budget_lr(self.args.get_warmup_steps(num_training_steps), num_training_steps, spent))
                self._created_lr_scheduler = True
            return super().create_scheduler(num_training_steps, optimizer)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            weights = inputs.pop("weights")
            logp, rows = labelled_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs.pop("labels"))
            loss = labelled_loss(logp, rows, weights.to(logp.device), unlikelihood_weight, average, norm) * self._share
            return (loss, None) if return_outputs else loss

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            """A batch over ``max_batch_tokens`` runs as several forward and backward passes of a
            few rows each: the same gradient as the whole batch, the activation memory of a part.
            Each part's loss is its tokens' sum over the run's constant (``loss_average`` token),
            or its rows' mean weighted by its share of the rows (example). The value returned, which
            the log and the loss curve show, is the batch's mean per learned token (weighted)."""
            n, width = inputs["input_ids"].shape
            # the weighted count of learned tokens the returned (logged) loss is a mean over
            shown = float((inputs["weights"].abs() * (inputs["labels"][:, 1:] != -100).sum(dim=1)).sum()) if norm else 0.0
            if max_tokens <= 0 or n < 2 or n * width <= max_tokens:
                total = super().training_step(model, inputs, num_items_in_batch)
            else:
                per_part = max(1, max_tokens // width)
                total = None
                try:
                    for i in range(0, n, per_part):
                        part = {k: v[i:i + per_part] for k, v in inputs.items()}
                        keep = int(part["attention_mask"].sum(dim=1).max())  # padding is on the right
                        part = {k: v[:, :keep] if v.dim() == 2 else v for k, v in part.items()}
                        self._share = 1.0 if average == "token" else part["input_ids"].shape[0] / n
                        loss = super().training_step(model, part, num_items_in_batch)
                        total = loss if total is None else total + loss
                finally:
                    self._share = 1.0
            return total * norm / max(shown, 1e-9) if norm else total

    trainer = _Trainer(model=peft_model, args=args, train_dataset=rows,  # type: ignore[arg-type]
                       data_collator=lambda b: collate(b, pad_id), callbacks=[_Progress()])
    # ``compute_loss`` returns a mean over the micro-batch; without this the Trainer takes it for a
    # sum over the accumulated tokens and does not divide by the accumulation steps: the gradient
    # and the logged loss came out ``gradient_accumulation`` times too large
    trainer.model_accepts_loss_kwargs = False
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # progress goes through ``progress``, not prints
        trainer.remove_callback(cb)
    resume = any(work_dir.glob("checkpoint-*")) if work_dir.exists() else False
    if resume:
        log.info("resuming from the last checkpoint in %s", work_dir)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - t0
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    peft_model.unload()  # hand the base model back without the LoRA layers
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"examples": len(rows), "tokens": tokens, "steps": int(result.global_step),
            "train_loss": float(result.training_loss), "last_loss": losses[-1] if losses else None,
            "seconds": round(seconds, 2),
            # tokens that went through the model: steps x examples per step x mean example length
            "tokens_per_s": round(result.global_step * config.batch_size * config.gradient_accumulation
                                  * tokens / len(rows) / max(seconds, 1e-9), 1),
            "resumed": resume, "available_examples": plan["available"], "planned_examples": plan["examples"],
            "calibrated_tokens_per_s": plan.get("tokens_per_s"), "stopped_by_time_budget": stopped_early[0],
            "last_learning_rate": last_lr[0] if last_lr else None,
            "loss_curve": step_losses, **facts_note}
