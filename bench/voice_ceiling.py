"""How far can training lower the held-out perplexity of the owner's replies on a history, whatever
is trained? A probe for issue 13's "-50 %" target: the same training samples and the same
validation turns (the newest, as `doppel dataset build` splits them; no facts, no drills), each
variant trained for the same wall time from the base model with a plain loop, the held-out loss
measured at half-time and at the end, or at --checks times (evaluation time not counted).

    python bench/voice_ceiling.py --data-dir DIR [--variants lora full] [--minutes 8]

DIR is a data directory with a built training set (e.g. the one `bench/quality.py --data-dir DIR`
leaves). Variants:
- lora:  Doppel's defaults (rank 16, alpha 32, attention and MLP of the top half of the layers,
         learning rate 3e-3), the samples' earlier owner turns learned too, as `doppel train` does;
- lora-all: the same on every layer, rank 64;
- full:  every weight of the model (a full fine-tune, AdamW at 5e-5).
- lora-partners: Doppel's defaults, and the other people's turns inside each prompt learned too at a
         quarter of the weight (the chats' register from tokens the forward pass computes anyway).
- lora-cover: Doppel's defaults on the fewest samples whose prompts and replies hold every reply of
         the owner's once (each conversation's newest sample, then the newest one whose reply it
         does not hold, and so on): a pass learns each reply once, where a pass over every sample
         learns it about 3.5 times (as a reply, then as an earlier reply in the samples after it).
- lora-example-mean: Doppel's defaults with the loss each example's mean over its tokens, then the
         mean over the batch's examples (`doppel train`'s default, `loss_average` example); the other
         variants weigh every labelled token of the batch alike, as the held-out loss does.
Not a timed test: it prints its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runtime import load_model  # noqa: E402
from trainer.evaluate import heldout_loss, spread  # noqa: E402
from trainer.examples import read_dataset  # noqa: E402
from trainer.lora import adapted_layers, collate, encode  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"lora": {"rank": 16, "top": 0.5, "lr": 3e-3}, "lora-all": {"rank": 64, "top": 1.0, "lr": 1e-3},
            "full": {"rank": 0, "top": 1.0, "lr": 5e-5},
            "lora-partners": {"rank": 16, "top": 0.5, "lr": 3e-3, "partners": 0.25},
            "lora-example-mean": {"rank": 16, "top": 0.5, "lr": 3e-3, "norm": "example"},
            "lora-cover": {"rank": 16, "top": 0.5, "lr": 3e-3, "cover": True}}
PARTNER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def partner_weights(tok: Any, prompt: str, labels: list[int], weight: float) -> list[float]:
    """A weight per token of an encoded example (its prompt first): ``weight`` on the tokens of the
    other people's turns (ChatML's user messages), 1 on the labelled ones (the owner's earlier
    replies in the prompt, the reply), 0 on the rest of the prompt."""
    spans = [m.span(1) for m in PARTNER_TURN.finditer(prompt)]
    offsets = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = [1.0 if label != -100 else weight if b > a and any(x <= a and b <= y for x, y in spans) else 0.0
           for (a, b), label in zip(offsets, labels)]
    return out + [1.0] * (len(labels) - len(out))


SESSIONS = 12  # training-period conversations held out by --same-period
SESSION_GAP = timedelta(hours=2)  # a longer silence starts another conversation


def _history_rows(samples: Path) -> list[dict[str, Any]]:
    """The training split's history samples as stored (in file order, as ``read_dataset`` reads them)."""
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train" and not r.get("drill")]


def hold_out_conversations(samples: Path, train: list[Any], n: int, keep: set[int] | None = None) -> tuple[list[Any], list[Any]]:
    """``n`` turns spread over ``SESSIONS`` whole conversations spread over the training period, and
    the training samples without any sample of those conversations (so neither the turns nor their
    neighbours, whose prompts carry them, are trained on)."""
    rows = _history_rows(samples)
    if len(rows) != len(train):
        sys.exit("the training set changed while it was read")
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["chat_id"], rows[i]["at"]))
    sessions: list[list[int]] = []
    last: tuple[int, datetime] | None = None
    for i in order:
        at = datetime.fromisoformat(rows[i]["at"])
        if last is None or last[0] != rows[i]["chat_id"] or at - last[1] > SESSION_GAP:
            sessions.append([])
        sessions[-1].append(i)
        last = (rows[i]["chat_id"], at)
    sessions.sort(key=lambda s: rows[s[0]]["at"])
    chosen = [i for s in spread(sessions, SESSIONS) for i in sorted(s, key=lambda i: rows[i]["at"])]
    gone = set(chosen)
    return spread([train[i] for i in chosen], n), [e for i, e in enumerate(train)
                                                  if i not in gone and (keep is None or i in keep)]


def run(variant: str, data: Path, minutes: float, n_val: int, seed: int, lr: float = 0.0,
        partner_weight: float = 0.0, same_period: int = 0, n_checks: int = 2) -> dict[str, float]:
    import torch

    spec = dict(VARIANTS[variant], **({"lr": lr} if lr else {}))
    if partner_weight and "partners" in spec:
        spec["partners"] = partner_weight
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model("", data)
    samples = data / "dataset" / "samples.jsonl"
    train = [e for e in read_dataset(samples, "train") if e.source == "dataset"]
    val = spread(read_dataset(samples, "validation"), n_val)
    base = heldout_loss(model, tok, val, bf16=True)
    print(f"{variant} (learning rate {spec['lr']:g}, partners' turns weighted {spec.get('partners', 0):g}): "
          f"{len(val)} validation turns, base held-out loss {base:.4f} (perplexity {math.exp(base):.2f})", flush=True)
    same: list[Any] = []
    # the covering samples (``read_dataset`` marks the others redundant), as ``history_samples`` picks them
    keep = {i for i, e in enumerate(train) if not e.redundant} if spec.get("cover") else None
    if same_period:  # whole training-period conversations the run never sees
        same, train = hold_out_conversations(samples, train, same_period, keep)
        base_same = heldout_loss(model, tok, same, bf16=True)
        print(f"  {len(same)} turns of {SESSIONS} training-period conversations held out ({len(train)} samples left "
              f"to train on); their base loss {base_same:.4f} (perplexity {math.exp(base_same):.2f})", flush=True)
    elif keep is not None:
        train = [e for i, e in enumerate(train) if i in keep]
    if spec["rank"]:
        from peft import LoraConfig, get_peft_model

        layers = adapted_layers(model.config.num_hidden_layers, spec["top"])
        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.05,
                                                 task_type="CAUSAL_LM", target_modules=TARGETS,
                                                 layers_to_transform=layers))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    enc = [(e, ex) for e, ex in ((encode(tok, ex, 0, True), ex) for ex in train) if e is not None]
    partners = spec.get("partners", 0.0)
    weights = []
    for e, ex in enc:
        w = partner_weights(tok, ex.prompt, e.labels, partners) if partners else [1.0] * len(e.input_ids)
        if partners:  # the prompt's tokens are labelled where they weigh
            e.labels = [t if l == -100 and x > 0 else l for t, l, x in zip(e.input_ids, e.labels, w)]
        weights.append(w)
    enc = [(e, w) for (e, _), w in zip(enc, weights)]
    print(f"  {len(enc)} training samples", flush=True)
    rng.shuffle(enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    budget = minutes * 60
    checks = [budget * (k + 1) / n_checks for k in range(n_checks)]
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
            recent = losses[-20:]
            print(f"  {spent / 60:.1f} min, {step} steps ({i} samples): held-out loss {loss:.4f}, perplexity "
                  f"{math.exp(loss):.2f} ({1 - math.exp(loss - base):.1%} below the base model's); training loss "
                  f"(last 20 steps) {sum(recent) / max(len(recent), 1):.3f}", flush=True)
            out[f"{spent / 60:.0f}min"] = loss
            if same:
                loss_same = heldout_loss(model, tok, same, bf16=True)
                print(f"    training-period turns held out: loss {loss_same:.4f}, perplexity {math.exp(loss_same):.2f} "
                      f"({1 - math.exp(loss_same - base_same):.1%} below the base model's)", flush=True)
            model.train()
            checks.pop(0)
            continue
        for g in opt.param_groups:
            g["lr"] = spec["lr"] * min(1.0, (step + 1) / 10) * (1 - 0.9 * min(1.0, spent / budget))
        total = 0.0
        for _ in range(2):  # batch 4, 2 accumulated: Doppel's defaults
            chunk = [enc[(i + k) % len(enc)] for k in range(4)]
            i += 4
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels, "weight": e.weight} for e, _ in chunk], pad)
            tw = torch.zeros(batch["labels"].shape)
            for r, (_, w) in enumerate(chunk):
                tw[r, :len(w)] = torch.tensor(w)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels, tw = logits[:, :-1].float(), batch["labels"][:, 1:], tw[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                    ignore_index=-100, reduction="none")
            tw = tw * (labels != -100)
            if spec.get("norm") == "example":  # each row's mean, then the rows' mean
                per_row = (nll.view(tw.shape) * tw).sum(1) / tw.sum(1).clamp(min=1e-6)
                loss = per_row.mean() / 2
            else:  # every labelled token of the batch alike
                loss = (nll.view(tw.shape) * tw).sum() / tw.sum().clamp(min=1e-6) / 2
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
    ap.add_argument("--same-period", type=int, default=0,
                    help="also hold out this many turns of whole training-period conversations and measure them")
    ap.add_argument("--partner-weight", type=float, default=0.0, help="lora-partners: the weight of the other people's tokens (0: 0.25)")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate for every variant (0: each its own)")
    ap.add_argument("--checks", type=int, default=2, help="held-out measurements, evenly spread over the training time")
    args = ap.parse_args()
    if not (args.data_dir / "dataset" / "samples.jsonl").is_file():
        sys.exit(f"{args.data_dir} has no training set: run `doppel dataset build` there first.")
    rows = {v: run(v, args.data_dir, args.minutes, args.validation, args.seed, args.lr, args.partner_weight, args.same_period,
                 max(1, args.checks)) for v in args.variants}
    print("\n| variant | " + " | ".join(k for k in next(iter(rows.values())) if k != "base") + " |")
    for v, r in rows.items():
        cells = [f"{math.exp(x):.2f} ({1 - math.exp(x - r['base']):.0%})" for k, x in r.items() if k != "base"]
        print(f"| {v} (base {math.exp(r['base']):.2f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
