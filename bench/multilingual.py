"""The base models on a non-English (Russian) owner: language following, reply latency, training
speed and held-out perplexity, before and after a short training run.

For each base model (the default SmolLM2-135M and the multilingual preset gemma3-270m), in a fresh
data directory: the bundled Russian sample export (``doppel/samples/ru``, 140 messages, its owner
Маша) and its facts are ingested and built into a training set exactly as ``doppel demo --lang ru``
does; then

- language following: the twin (``AppContext.agent()``: the served backend, llama.cpp where
  installed, with the facts it retrieves) answers ``MESSAGES`` (Russian messages that are not in
  the history), each in a chat of its own; a reply counts as Russian when most of its letters are
  Cyrillic (``is_russian``). An empty reply counts as not Russian;
- reply latency: p50/p95 of those replies (the whole ``Agent.reply``: retrieval, prompt, generation);
- held-out perplexity: exp of the mean negative log-likelihood per token of the owner's real
  replies in the validation split (the most recent 10 % of samples), fp32, transformers;
- training: a LoRA run of ``--steps`` optimizer steps with the default training settings;
  tokens/s as the trainer reports it;

then language following, latency and perplexity again with the trained adapter.

    python bench/multilingual.py [--models ,gemma3-270m] [--steps 40] [--models-dir DIR] [--seed 1]

``--models-dir`` keeps the converted models between runs (default doppel-data/models).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Russian messages to the twin, not in the sample history: questions about its facts, small talk,
# plans, one-word openers, as people write them
MESSAGES = [
    "привет! как дела?", "что делаешь вечером?", "ты где сейчас?", "пойдём завтра гулять?",
    "как зовут твою собаку?", "ты пьёшь кофе?", "где ты работаешь?", "когда у тебя день рождения?",
    "какую книгу читаешь?", "в какой день у тебя волейбол?", "ты ешь мясо?", "где живёт твоя сестра?",
    "какую музыку любишь?", "у тебя есть машина?", "как прошла неделя?", "можешь помочь мне в субботу?",
    "слушай, а ты в отпуск когда?", "что посоветуешь посмотреть?", "спишь?", "ну что, идём в кино?",
    "как там Бублик?", "напомни, в каком городе ты живёшь?", "устала сегодня?", "с днём рождения заранее!",
    "во сколько встречаемся?", "ты видела новости?", "что будешь на ужин?", "пришлёшь рецепт плова?",
    "как погода у вас?", "скучаю! когда увидимся?",
]


def is_russian(text: str) -> bool:
    """Most of the letters are Cyrillic (a reply of emoji or digits alone is not Russian)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return False
    cyrillic = sum(1 for ch in letters if "\u0400" <= ch <= "\u04ff")
    return cyrillic / len(letters) >= 0.5


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def follow(agent, label: str, seed: int, threads: int) -> dict:  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(seed)
    if threads and hasattr(agent.runtime, "n_threads"):
        agent.runtime.n_threads = threads  # read when llama.cpp loads the model (prepare, adapter swap)
    agent.runtime.prepare()
    agent.reply("warm-up", "Дима", "привет", platform="cli")  # the first reply loads what is lazy
    russian, times, cpu, shown, tokens = 0, [], [], [], []
    for i, msg in enumerate(MESSAGES):
        t, c = time.perf_counter(), time.process_time()
        reply = agent.reply(f"bench-{label}-{i}", "Дима", msg, platform="cli")
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
        text = "\n".join(reply.messages)
        tokens.append(len(agent.runtime.tokenizer.encode(text, add_special_tokens=False)))
        russian += is_russian(text)
        if i < 4:
            shown.append(f"    {msg!r} -> {text[:90]!r}")
    print("\n".join(shown))
    return {"russian": russian / len(MESSAGES), "p50": statistics.median(times), "p95": _quantile(times, 0.95),
            "cpu_p50": statistics.median(cpu), "cpu_p95": _quantile(cpu, 0.95), "tokens": statistics.median(tokens)}


def reply_sizes(tok, examples) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(tokens, characters) of the owner's replies in ``examples``, end-of-turn marker included in
    the tokens, not in the characters. Perplexity per token does not compare across tokenizers
    (SmolLM2 cuts Cyrillic into many more, easier, pieces than Gemma), nats per character do."""
    from agent.prompt import _completion_frame

    before, after = _completion_frame(tok) or ("", "")
    tokens = sum(len(tok.encode(ex.completion, add_special_tokens=False)) for ex in examples)
    chars = sum(len(ex.completion) - len(before) - len(after) for ex in examples)
    return tokens, chars


def perplexity(model, tok, examples) -> float:  # type: ignore[no-untyped-def]
    from trainer.evaluate import heldout_loss

    loss = heldout_loss(model, tok, examples)
    return math.exp(loss) if loss is not None else float("nan")


def run_one(spec: str, steps: int, models_dir: Path, seed: int, threads: int, validation_fraction: float,
            counts_only: bool = False) -> dict:
    import shutil
    from importlib.resources import files

    from agent.runtime import load_model
    from doppel.commands import _dataset_path, build_dataset
    from doppel.context import AppContext
    from doppel.migrate import upgrade
    from trainer.config import TrainConfig
    from trainer.examples import read_dataset
    from trainer.ingest.service import IngestOptions, ingest_paths
    from trainer.lora import train_lora

    name = spec or "smollm2-135m (default)"
    out: dict = {"model": name}
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        models_dir.mkdir(parents=True, exist_ok=True)
        (data / "models").symlink_to(models_dir.resolve())
        os.environ.update(DOPPEL_DATA_DIR=str(data), DOPPEL_BASE_MODEL=spec, DOPPEL_PERSONA_NAME="Маша",
                          DOPPEL_VALIDATION_FRACTION=str(validation_fraction))
        c = AppContext.load()
        upgrade(c.raw_engine)
        samples = files("doppel") / "samples" / "ru"
        ingest_paths(c.engine, [Path(str(samples / "telegram_export.json"))], IngestOptions(me="Маша"))
        shutil.copyfile(str(samples / "facts.md"), c.settings.resolved_facts_path)
        c.knowledge.refresh()
        result = build_dataset(c, _dataset_path(c))
        train, validation = read_dataset(result.path, "train"), read_dataset(result.path, "validation")
        from agent.models import load_tokenizer

        # what a training run does with them: their facts, and the fact drills of the facts file
        light = load_tokenizer(spec, data, light=True)
        give, _ = c.example_facts(light)
        drills = c.fact_drills(light)(train)
        train, validation = give(train) + drills, give(validation)
        out["samples"] = f"{len(train)} train ({len(drills)} drills) / {len(validation)} validation"

        out["tokens"], out["chars"] = reply_sizes(load_tokenizer(spec, data), validation)
        print(f"[{name}] validation replies: {out['tokens']} tokens, {out['chars']} characters")
        if counts_only:
            return out
        print(f"[{name}] {out['samples']}; backend: {'llama.cpp' if c.use_llama_cpp() else 'transformers'}")
        out["backend"] = "llama.cpp" if c.use_llama_cpp() else "transformers"

        agent = c.agent()
        before = follow(agent, "before", seed, threads)
        out["before"] = before
        print(f"[{name}] before training: Russian {before['russian']:.0%}, reply p50 {before['p50']:.0f} ms, "
              f"p95 {before['p95']:.0f} ms; CPU time p50 {before['cpu_p50']:.0f} ms, p95 {before['cpu_p95']:.0f} ms; "
              f"median reply {before['tokens']:.0f} tokens")

        t = time.perf_counter()
        model, tok = load_model(spec, data, "cpu", "float32")
        out["ppl_before"] = perplexity(model, tok, validation)
        print(f"[{name}] held-out perplexity before: {out['ppl_before']:.2f} ({time.perf_counter() - t:.0f} s)")
        cfg = TrainConfig(max_steps=steps, max_minutes=0, save_steps=10_000)
        adapter = data / "adapters" / "bench"
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        c0 = time.process_time()
        m = train_lora(model, tok, train, cfg, data / "work", adapter)
        m["cpu_tokens_per_s"] = round(m["tokens_per_s"] * m["seconds"] / max(time.process_time() - c0, 1e-9), 1)
        torch.set_num_threads(1)
        out["train"] = {k: m[k] for k in ("examples", "steps", "tokens_per_s", "cpu_tokens_per_s", "seconds", "train_loss")}
        print(f"[{name}] training: {m['steps']} steps on {m['examples']} examples in {m['seconds']:.0f} s, "
              f"{m['tokens_per_s']} tokens/s ({m['cpu_tokens_per_s']} per CPU-second), loss {m['train_loss']:.3f}")
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, str(adapter))
        out["ppl_after"] = perplexity(tuned, tok, validation)
        per_char = out["tokens"] / out["chars"]
        print(f"[{name}] held-out perplexity after: {out['ppl_after']:.2f}; nats per character "
              f"{math.log(out['ppl_before']) * per_char:.3f} -> {math.log(out['ppl_after']) * per_char:.3f}")
        del tuned, model

        agent.runtime.adapter_source = None  # serve this adapter, not the (empty) registry's active one
        agent.runtime.use_adapter(adapter, "bench")
        after = follow(agent, "after", seed, threads)
        out["after"] = after
        print(f"[{name}] after training: Russian {after['russian']:.0%}, reply p50 {after['p50']:.0f} ms, "
              f"p95 {after['p95']:.0f} ms; CPU time p50 {after['cpu_p50']:.0f} ms, p95 {after['cpu_p95']:.0f} ms; "
              f"median reply {after['tokens']:.0f} tokens")
        if hasattr(agent.runtime, "close"):
            agent.runtime.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-270m,", help="comma-separated base models ('' = the default)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of the training run")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "doppel-data" / "models")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--counts-only", action="store_true", help="only the validation replies' token and character counts")
    ap.add_argument("--validation", type=float, default=0.2, help="share of the samples held out (the newest)")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: one per core, as served). On a "
                    "machine shared with other jobs, 1 avoids llama.cpp's threads spinning while waiting for each other")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # replies: llama.cpp does the work; torch only samples
    rows = [run_one(spec, args.steps, args.models_dir, args.seed, args.threads, args.validation, args.counts_only)
            for spec in args.models.split(",")]
    if args.counts_only:
        return
    print(f"\n{len(MESSAGES)} Russian messages; training {args.steps} steps (batch 4 x 2)")
    print("| base model | backend | Russian replies before → after | reply p50 wall before / after | "
          "reply p50 CPU time before / after | held-out perplexity before → after | training tokens/s (per CPU-s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['model']} | {r['backend']} | {b['russian']:.0%} → {a['russian']:.0%} | "
              f"{b['p50']:.0f} / {a['p50']:.0f} ms | {b['cpu_p50']:.0f} / {a['cpu_p50']:.0f} ms | "
              f"{r['ppl_before']:.1f} → {r['ppl_after']:.1f} | "
              f"{r['train']['tokens_per_s']} ({r['train']['cpu_tokens_per_s']}) |")


if __name__ == "__main__":
    main()
