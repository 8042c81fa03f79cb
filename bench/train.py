"""Training speed: LoRA tokens/s on this machine, and the wall time of a nightly retrain on 200
ratings plus its replay sample, with the default training settings, on the real packaged model.

    python bench/train.py [--ratings 200] [--dataset 400] [--data-dir DIR] [--set KEY=VALUE ...]

A fresh data directory is built in a temporary folder (the converted model is taken from
--data-dir if it is there, to skip the 15 s conversion).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models import cache_dir_for, load_tokenizer  # noqa: E402
from agent.prompt import Persona, Turn, completion_text, render_prompt  # noqa: E402
from agent.runtime import load_model  # noqa: E402
from feedback import store  # noqa: E402
from feedback.db import make_engine, make_session_factory  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.pipeline import TrainingDeps, run_training  # noqa: E402
from trainer.registry import Registry  # noqa: E402

OPENERS = ["hey, what are you up to?", "are you coming tonight?", "did you see the match?", "how was the trip?",
           "can you send me the photos?", "what time is climbing?", "want to grab lunch tomorrow?",
           "have you finished the book?", "how's the cat?", "are you free on sunday?"]
ANSWERS = ["yeah sure, 7 works", "haha no idea, ask Jana", "not yet, maybe tomorrow", "omg yes!! it was great",
           "sorry, can't today", "I'll send them tonight", "sounds good, see you there", "lol same"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=200)
    ap.add_argument("--dataset", type=int, default=400, help="samples in the replayed training set")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "doppel-data")
    ap.add_argument("--set", action="append", default=[], help="a training setting KEY=VALUE")
    args = ap.parse_args()
    rng = random.Random(3)
    cfg = TrainConfig()
    for item in args.set:
        k, _, v = item.partition("=")
        setattr(cfg, k, json.loads(v))

    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        cached = cache_dir_for("", args.data_dir)
        if cached.is_dir():
            shutil.copytree(cached, cache_dir_for("", data))
        tok = load_tokenizer("", data)
        engine = make_engine(f"sqlite:///{data / 'bench.db'}")
        from doppel.migrate import upgrade

        upgrade(engine)
        sessions = make_session_factory(engine)
        persona = Persona("Alex")
        ds = data / "dataset" / "samples.jsonl"
        ds.parent.mkdir(parents=True)
        with ds.open("w") as fh:
            for i in range(args.dataset):
                turns = [Turn("Sam", rng.choice(OPENERS))]
                prompt = render_prompt(tok, persona, [], turns).text
                fh.write(json.dumps({"prompt": prompt, "completion": completion_text(tok, rng.choice(ANSWERS)),
                                     "split": "validation" if i % 10 == 0 else "train"}) + "\n")
        with sessions.begin() as s:
            chat = store.get_chat(s, "bench", "c")
            for i in range(args.ratings):
                turns = [Turn("Sam", rng.choice(OPENERS))]
                prompt = render_prompt(tok, persona, ["I live in Prague."], turns).text
                reply = store.record_reply(s, chat, None, rng.choice(ANSWERS), prompt, [], None, 1.0)
                store.rate(s, reply, f"user{i % 7}", 1 if rng.random() < 0.6 else -1)

        t = time.perf_counter()
        base, _ = load_model("", data, "cpu", "float32")
        print(f"model loaded in {time.perf_counter() - t:.1f} s")
        deps = TrainingDeps(sessions=sessions, registry=Registry(data / "adapters", sessions), tokenizer=tok,
                            load_base=lambda: copy.deepcopy(base), dataset_path=ds, lock_path=data / "train.lock")
        steps_seen: list[float] = []

        def progress(step: int, total: int, loss: float | None) -> None:
            steps_seen.append(time.perf_counter())
            print(f"\r  step {step}/{total} loss {loss if loss is not None else float('nan'):.3f}", end="", flush=True)

        t = time.perf_counter()
        first = run_training(deps, "train", cfg, progress)
        print()
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        result = run_training(deps, "retrain", cfg, progress)
        print()
        wall = time.perf_counter() - t
        m = result.metrics
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"initial train on {first.metrics['examples']} samples: {t_train:.0f} s, "
              f"{first.metrics['tokens_per_s']} tokens/s")
        print(f"nightly retrain: {args.ratings} ratings ({m['liked']} liked, {m['disliked']} disliked) + replay "
              f"-> {m['examples']} examples, {m['steps']} steps, {m['tokens']} tokens")
        print(f"  training {m['seconds']:.0f} s at {m['tokens_per_s']} tokens/s; whole run incl. evaluation "
              f"{wall:.0f} s; peak RSS {rss:.0f} MB; outcome {result.status}")
        print(f"  held-out loss {m['current']['heldout_loss']:.4f} -> {m['candidate']['heldout_loss']:.4f}, "
              f"rating margin ({m['margin_on']}) {m['current']['rating_margin']:.4f} -> {m['candidate']['rating_margin']:.4f}")


if __name__ == "__main__":
    main()
