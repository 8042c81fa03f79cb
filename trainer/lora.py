"""LoRA fine-tuning with transformers' Trainer.

The loss covers only the completion's tokens (labels -100 on the prompt). Examples carry a weight:
a positive one is ordinary likelihood training, a negative one (a 👎 reply) is an unlikelihood loss,
-log(1 - p(token)), which pushes those tokens down without pulling anything else up. trl's
KTOTrainer would need a reference model pass per step (twice the compute on a CPU); the
unlikelihood term needs none, and the replayed dataset keeps the model anchored.
"""

from __future__ import annotations

import logging
import math
import shutil
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


def encode(tokenizer: Any, ex: Example, max_length: int) -> Encoded | None:
    p = tokenizer.encode(ex.prompt, add_special_tokens=False)
    c = tokenizer.encode(ex.completion, add_special_tokens=False)
    if not c:
        return None
    c = c[: max_length - 16]
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p  # the prompt's start goes first
    return Encoded(p + c, [-100] * len(p) + c, ex.weight)


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


def weighted_loss(logits: Any, labels: Any, weights: Any, unlikelihood_weight: float) -> Any:
    """Mean over examples of: w * NLL(completion) for w > 0, |w| * unlikelihood for w < 0."""
    import torch

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n_tok = mask.sum(1).clamp(min=1)
    nll = -(logp * mask).sum(1) / n_tok
    # log(1 - p), computed stably; p close to 1 is clamped so the gradient stays finite
    one_minus = torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6))
    unlikely = -(one_minus * mask).sum(1) / n_tok
    per_example = torch.where(weights > 0, weights * nll, weights.abs() * unlikelihood_weight * unlikely)
    return per_example.mean()


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


def train_lora(model: Any, tokenizer: Any, examples: list[Example], config: TrainConfig, work_dir: Path,
               out_dir: Path, *, start_adapter: Path | None = None, progress: Progress | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Train a LoRA adapter on ``examples`` and write it to ``out_dir``. Checkpoints go to
    ``work_dir``; a run started again with the same ``work_dir`` resumes from the last one.
    ``start_adapter`` continues from an existing adapter (the nightly retrain does)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    encoded = [e for e in (encode(tokenizer, ex, config.max_length) for ex in examples) if e is not None]
    if not encoded:
        from common.errors import InputError

        raise InputError("Nothing to train on.", hint="Build the training set (`doppel dataset build`) or collect ratings first.")
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "weight": e.weight} for e in encoded]
    tokens = sum(len(e.input_ids) for e in encoded)

    if start_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lcfg)
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch = max(1, math.ceil(len(rows) / (config.batch_size * config.gradient_accumulation)))
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(steps_per_epoch * config.epochs))
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation, learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps, warmup_steps=int(config.warmup_ratio * total),
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=2, report_to=[], seed=config.seed, bf16=_use_bf16(config.bf16, device),
        remove_unused_columns=False,
        disable_tqdm=True, use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
    )
    if config.gradient_checkpointing:  # renamed activation checkpointing in transformers 5
        enable = getattr(peft_model, "activation_checkpointing_enable", None) or peft_model.gradient_checkpointing_enable
        enable()
    losses: list[float] = []

    class _Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
            if progress:
                progress(state.global_step, state.max_steps or total, losses[-1] if losses else None)

    unlikelihood_weight = config.unlikelihood_weight

    class _Trainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kw: Any) -> Any:
            weights = inputs.pop("weights")
            labels = inputs.pop("labels")
            out = model(**inputs)
            loss = weighted_loss(out.logits, labels, weights.to(out.logits.device), unlikelihood_weight)
            return (loss, out) if return_outputs else loss

    trainer = _Trainer(model=peft_model, args=args, train_dataset=rows,  # type: ignore[arg-type]
                       data_collator=lambda b: collate(b, pad_id), callbacks=[_Progress()])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # progress goes through ``progress``, not prints
        trainer.remove_callback(cb)
    resume = any(work_dir.glob("checkpoint-*")) if work_dir.exists() else False
    if resume:
        log.info("resuming from the last checkpoint in %s", work_dir)
    import time

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
            "resumed": resume}
