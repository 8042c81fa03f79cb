"""Reply latency of the model runtime, with the machine's limits beside it.

In one run: the memory bandwidth (a large tensor copy), the decode bound it implies for the
model's weights (every new token reads all of them once), the measured prefill time and decode
tokens/s, and the latency p50/p95 of a reply to a ~300-token prompt with 40 new tokens, with a
LoRA adapter active (a random r=16 adapter on q/k/v/o unless --adapter is given), through the same
``generate`` the agent uses, for each backend: transformers and llama.cpp (Q8_0).

Then the quality of the faster path against transformers fp32, teacher-forced on held-out replies
(the samples of a built training set, or the bench chat): how often both pick the same
next token, and the mean negative log-likelihood of the person's real replies under each.

    python bench/latency.py [--runs 10] [--backend both|transformers|llama_cpp] [--adapter PATH]
                            [--dataset doppel-data/dataset/samples.jsonl] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agent.prompt import Persona, Turn, render_prompt  # noqa: E402
from agent.runtime import GenerationConfig, ModelRuntime, load_model, resolve_dtype  # noqa: E402

CHAT = [
    ("Bob", "hey, are you around this weekend? we were thinking of going to the mountains"),
    ("Alex", "maybe! depends on the weather, I promised Jana we'd clean the flat"),
    ("Bob", "the forecast says sunny on Saturday and rain on Sunday"),
    ("Alex", "ok then Saturday could work. what time are you leaving?"),
    ("Bob", "early, like 7. Petra is driving, she has space for two more people in the car"),
    ("Alex", "7 is brutal but fine. should I bring anything?"),
    ("Bob", "some snacks maybe, and a rain jacket just in case. also are you still vegetarian? we're grilling"),
]
FACTS = ["I am vegetarian; I don't eat meat.", "I go hiking in Bohemian Switzerland on sunny Sundays.",
         "I share a flat with my partner Jana."]


def bandwidth_gbs() -> float:
    a = torch.empty(256 * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9  # read + write


def make_adapter(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, p in peft_model.named_parameters():  # a small, realistic perturbation
        if "lora_B" in name:
            p.data.mul_(0.01)
    peft_model.save_pretrained(str(path))


def measure(rt, prompt: str, cfg: GenerationConfig, runs: int) -> tuple[list[float], list[float], list[float], str]:  # type: ignore[no-untyped-def]
    rt.generate(prompt, cfg)  # warm-up
    lat, pre, rates = [], [], []
    g = None
    for _ in range(runs):
        g = rt.generate(prompt, cfg)
        lat.append(g.total_ms / 1000)
        pre.append(g.prefill_ms / 1000)
        rates.append((g.new_tokens - 1) / ((g.total_ms - g.prefill_ms) / 1000))
    assert g is not None
    return sorted(lat), pre, rates, g.text


def measure_next(rt, before: str, prompt: str, cfg: GenerationConfig, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Prefill of a chat's next message right after the one before it (other facts retrieved for
    each): what the prefix cache saves in a real chat."""
    pre = []
    for _ in range(runs + 1):
        rt.generate(before, cfg)
        pre.append(rt.generate(prompt, cfg).prefill_ms / 1000)
    return pre[1:]


def report(name: str, lat: list[float], pre: list[float], rates: list[float], text: str) -> None:
    print(f"  {name}: prefill p50 {statistics.median(pre) * 1000:.0f} ms, decode {statistics.median(rates):.1f} tokens/s, "
          f"reply latency p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s "
          f"(target p50 <= 1.0 s)")
    print(f"    sample reply: {text[:100]!r}")


def quality_examples(tok, path: Path | None, limit: int) -> list[tuple[list[int], int]]:  # type: ignore[no-untyped-def]
    """(token ids, where the reply starts) for held-out replies."""
    from agent.prompt import completion_text
    from trainer.examples import read_dataset

    pairs: list[tuple[str, str]] = []
    if path is not None and path.is_file():
        pairs = [(e.prompt, e.completion) for e in read_dataset(path)[:limit]]
    if not pairs:
        turns = [Turn(s, x, s == "Alex") for s, x in CHAT[:-2]]
        prompt = render_prompt(tok, Persona("Alex", "I write short, casual messages."), FACTS, turns).text
        pairs = [(prompt, completion_text(tok, CHAT[-2][1]))]
    out = []
    for prompt, completion in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        out.append((p + c, len(p)))
    return out


def nll_and_top1(logits, ids: list[int], start: int) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    """Mean NLL of ids[start:] given what precedes, and the top-1 predictions at those positions."""
    lg = torch.as_tensor(logits, dtype=torch.float32)[start - 1: len(ids) - 1]
    target = torch.tensor(ids[start:])
    nll = torch.nn.functional.cross_entropy(lg, target).item()
    return nll, lg.argmax(-1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--backend", default="both", choices=["both", "transformers", "llama_cpp"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="transformers' dtype")
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter (default: a random one)")
    ap.add_argument("--dataset", type=Path, default=ROOT / "doppel-data" / "dataset" / "samples.jsonl",
                    help="real replies for the quality check (a training set doppel dataset build wrote)")
    ap.add_argument("--quality-examples", type=int, default=30)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "doppel-data", help="where the converted model is cached")
    args = ap.parse_args()

    bw = bandwidth_gbs()
    t = time.perf_counter()
    model, tok = load_model("", args.data_dir, "cpu", args.dtype)
    load_s = time.perf_counter() - t
    dtype = resolve_dtype(args.dtype, "cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"machine: {torch.get_num_threads()} threads, memory bandwidth {bw:.1f} GB/s (copy)")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {dtype}, "
          f"{weight_bytes / 1e6:.0f} MB of weights, loaded in {load_s:.1f} s")
    print(f"decode bound: {bw * 1e9 / weight_bytes:.0f} tokens/s at {dtype} (bandwidth / weight bytes)")

    turns = [Turn(s, x, s == "Alex") for s, x in CHAT]
    prompt = render_prompt(tok, Persona("Alex", "I write short, casual messages."), FACTS, turns).text
    before = render_prompt(tok, Persona("Alex", "I write short, casual messages."), FACTS[1:2], turns[:-2]).text
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    cfg = GenerationConfig(temperature=0.7, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    examples = quality_examples(tok, args.dataset, args.quality_examples)
    with tempfile.TemporaryDirectory() as d:
        adapter = args.adapter
        if adapter is None:
            adapter = Path(d) / "bench-adapter"
            make_adapter(model, adapter)
        print(f"prompt {n_prompt} tokens, {args.new_tokens} new tokens, adapter active (merged):")
        reference = None
        rt = ModelRuntime(model, tok, "cpu")
        rt.use_adapter(adapter, "bench")
        if args.backend in ("both", "transformers"):
            report(f"transformers {str(dtype).split('.')[-1]}", *measure(rt, prompt, cfg, args.runs))
        if args.backend in ("both", "llama_cpp") and dtype != torch.float32:
            # the reference for quality, and what llama.cpp's weights are exported from, is fp32
            rt = ModelRuntime(load_model("", args.data_dir, "cpu", "float32")[0], tok, "cpu")
            rt.use_adapter(adapter, "bench")
        if args.backend in ("both", "llama_cpp"):
            with torch.inference_mode():
                reference = [nll_and_top1(rt.model(torch.tensor([ids])).logits[0], ids, start) for ids, start in examples]
        rt.use_adapter(None)
        if args.backend in ("both", "llama_cpp"):
            from agent.llamacpp import LlamaCppRuntime
            from agent.models import packaged_gguf

            gguf_dir = Path(d) / "gguf"  # a fresh export, timed
            t = time.perf_counter()
            lrt = LlamaCppRuntime(rt.base, tok, packaged_gguf(), gguf_dir, prefix_cache=False)
            lrt.use_adapter(adapter, "bench")
            export_s = time.perf_counter() - t
            size = lrt.gguf_path.stat().st_size / 1e6 if lrt.gguf_path else 0
            print(f"  llama.cpp: base and adapter exported to Q8_0 GGUF and loaded in {export_s:.1f} s "
                  f"({size:.0f} MB; decode bound {bw * 1e3 / size:.0f} tokens/s)")
            report("llama.cpp q8_0", *measure(lrt, prompt, cfg, args.runs))
            lrt.prefix_cache = True
            lat, pre, rates, text = measure(lrt, prompt, cfg, args.runs)
            print(f"    the same prompt again with the prefix cache: "
                  f"p50 {statistics.median(lat):.2f} s, prefill {statistics.median(pre) * 1000:.0f} ms")
            pre = measure_next(lrt, before, prompt, cfg, args.runs)
            shared = len(os.path.commonprefix([tok(before, add_special_tokens=False)["input_ids"],
                                               tok(prompt, add_special_tokens=False)["input_ids"]]))
            print(f"    the chat's next message (two turns later, other facts; {shared} of {n_prompt} tokens "
                  f"shared with the prompt before): prefill p50 {statistics.median(pre) * 1000:.0f} ms")
            assert reference is not None
            agree = total = 0
            nll_ref, nll_q = [], []
            for (ids, start), (ref_nll, ref_top) in zip(examples, reference):
                q_nll, q_top = nll_and_top1(lrt.logits_for(ids), ids, start)
                agree += sum(a == b for a, b in zip(ref_top, q_top))
                total += len(ref_top)
                nll_ref.append(ref_nll)
                nll_q.append(q_nll)
            print(f"  quality on {len(examples)} real replies ({total} tokens), teacher-forced: "
                  f"top-1 agreement with transformers fp32 {agree / total:.1%}, "
                  f"reply NLL {statistics.mean(nll_ref):.3f} (fp32) vs {statistics.mean(nll_q):.3f} (q8_0)")
            lrt.close()


if __name__ == "__main__":
    main()
