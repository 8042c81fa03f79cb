"""Reply latency of the model runtime, with the machine's limits beside it.

In one run: the memory bandwidth (a large tensor copy), the decode bound it implies for the
model's weights (every new token reads all of them once), the measured prefill time and decode
tokens/s, and the latency p50/p95 of a reply to a ~300-token prompt with 40 new tokens, with a
LoRA adapter active (a random r=16 adapter on q/k/v/o unless --adapter is given), through the same
``ModelRuntime.generate`` the agent uses.

    python bench/latency.py [--runs 10] [--dtype auto|float32|bfloat16] [--adapter PATH] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter (default: a random one)")
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
    print(f"decode bound: {bw * 1e9 / weight_bytes:.0f} tokens/s (bandwidth / weight bytes)")

    rt = ModelRuntime(model, tok, "cpu")
    with tempfile.TemporaryDirectory() as d:
        adapter = args.adapter
        if adapter is None:
            adapter = Path(d) / "bench-adapter"
            make_adapter(model, adapter)
        rt.use_adapter(adapter, "bench")
        turns = [Turn(s, x, s == "Alex") for s, x in CHAT]
        prompt = render_prompt(tok, Persona("Alex", "I write short, casual messages."), FACTS, turns).text
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        cfg = GenerationConfig(temperature=0.7, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        rt.generate(prompt, cfg)  # warm-up
        lat, pre, rates = [], [], []
        for _ in range(args.runs):
            g = rt.generate(prompt, cfg)
            lat.append(g.total_ms / 1000)
            pre.append(g.prefill_ms / 1000)
            rates.append((g.new_tokens - 1) / ((g.total_ms - g.prefill_ms) / 1000))
        lat.sort()
        print(f"prompt {n_prompt} tokens, {args.new_tokens} new tokens, adapter active ({rt.adapter_version}, merged):")
        print(f"  prefill p50 {statistics.median(pre) * 1000:.0f} ms, decode {statistics.median(rates):.1f} tokens/s")
        print(f"  reply latency p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s "
              f"(target p50 <= 1.0 s)")
        print(f"  sample reply: {g.text[:120]!r}")


if __name__ == "__main__":
    main()
