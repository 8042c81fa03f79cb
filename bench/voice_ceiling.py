"""How far can training lower the held-out perplexity of the owner's replies on a history, whatever
is trained? A probe for issue 13's "-50 %" target: the same training samples and the same
validation turns (the newest, as `doppel dataset build` splits them; no facts, no drills), each
variant trained for the same wall time from the base model with a plain loop, the held-out loss
measured at half-time and at the end (evaluation time not counted).

    python bench/voice_ceiling.py --data-dir DIR [--variants lora full] [--minutes 8]

DIR is a data directory with a built training set (e.g. the one `bench/quality.py --data-dir DIR`
leaves). Variants:
- lora:  Doppel's defaults (rank 16, alpha 32, attention and MLP of the top half of the layers,
         learning rate 3e-3), the samples' earlier owner turns learned too, as `doppel train` does;
- lora-all: the same on every layer, rank 64;
- full:  every weight of the model (a full fine-tune, AdamW at 5e-5).
Not a timed test: it prints its figures.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runtime import load_model  # noqa: E402
from trainer.evaluate import heldout_loss, spread  # noqa: E402
from trainer.examples import read_dataset  # noqa: E402
from trainer.lora import adapted_layers, collate, encode  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"lora": {"rank": 16, "top": 0.5, "lr": 3e-3}, "lora-all": {"rank": 64, "top": 1.0, "lr": 1e-3},
            "full": {"rank": 0, "top": 1.0, "lr": 5e-5}}


def run(variant: str, data: Path, minutes: float, n_val: int, seed: int, lr: float = 0.0) -> dict[str, float]:
    import torch

    spec = dict(VARIANTS[variant], **({"lr": lr} if lr else {}))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model("", data)
    samples = data / "dataset" / "samples.jsonl"
    train = [e for e in read_dataset(samples, "train") if e.source == "dataset"]
    val = spread(read_dataset(samples, "validation"), n_val)
    base = heldout_loss(model, tok, val, bf16=True)
    print(f"{variant} (learning rate {spec['lr']:g}): {len(train)} training samples, {len(val)} validation; base held-out loss {base:.4f} "
          f"(perplexity {math.exp(base):.2f})", flush=True)
    if spec["rank"]:
        from peft import LoraConfig, get_peft_model

        layers = adapted_layers(model.config.num_hidden_layers, spec["top"])
        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.05,
                                                 task_type="CAUSAL_LM", target_modules=TARGETS,
                                                 layers_to_transform=layers))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    enc = [e for e in (encode(tok, ex, 0, True) for ex in train) if e is not None]
    rng.shuffle(enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    budget = minutes * 60
    checks = [budget / 2, budget]
    out = {"base": base}
    model.train()
    step = i = 0
    losses: list[float] = []
    spent = 0.0  # training seconds (evaluation not counted)
    while checks:
        t = time.perf_counter()
        if spent >= checks[0]:
            model.eval()
            loss = heldout_loss(model, tok, val, bf16=True)
            model.train()
            recent = losses[-20:]
            print(f"  {spent / 60:.1f} min, {step} steps ({i} samples): held-out loss {loss:.4f}, perplexity "
                  f"{math.exp(loss):.2f} ({1 - math.exp(loss - base):.1%} below the base model's); training loss "
                  f"(last 20 steps) {sum(recent) / max(len(recent), 1):.3f}", flush=True)
            out[f"{spent / 60:.0f}min"] = loss
            checks.pop(0)
            continue
        for g in opt.param_groups:
            g["lr"] = spec["lr"] * min(1.0, (step + 1) / 10) * (1 - 0.9 * min(1.0, spent / budget))
        total = 0.0
        for _ in range(2):  # batch 4, 2 accumulated: Doppel's defaults
            chunk = [enc[(i + k) % len(enc)] for k in range(4)]
            i += 4
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels, "weight": e.weight} for e in chunk], pad)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100) / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        losses.append(total)
        spent += time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="a data directory with a built training set")
    ap.add_argument("--variants", nargs="+", default=["lora", "full"], choices=sorted(VARIANTS))
    ap.add_argument("--minutes", type=float, default=8.0, help="training wall time of each variant")
    ap.add_argument("--validation", type=int, default=64, help="validation samples (spread over time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate for every variant (0: each its own)")
    args = ap.parse_args()
    if not (args.data_dir / "dataset" / "samples.jsonl").is_file():
        sys.exit(f"{args.data_dir} has no training set: run `doppel dataset build` there first.")
    rows = {v: run(v, args.data_dir, args.minutes, args.validation, args.seed, args.lr) for v in args.variants}
    print("\n| variant | " + " | ".join(k for k in next(iter(rows.values())) if k != "base") + " |")
    for v, r in rows.items():
        cells = [f"{math.exp(x):.2f} ({1 - math.exp(x - r['base']):.0%})" for k, x in r.items() if k != "base"]
        print(f"| {v} (base {math.exp(r['base']):.2f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
