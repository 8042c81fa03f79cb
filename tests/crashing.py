"""A process for the tests to kill at a known point (``tests/test_faults.py``).

    python -m tests.crashing register DB_URL ADAPTERS_DIR SOURCE_DIR POINT
    python -m tests.crashing train DB_URL ADAPTERS_DIR LOCK DATASET TOKENIZER_DIR MODEL_DIR STEP

It does the real work with the real code, and at POINT (or at training step STEP) prints
``PAUSED <point>`` and sleeps, so the test can SIGKILL it exactly there. The points are set by
wrapping the functions the code calls at them, so the code under test carries no test hooks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def pause(where: str) -> None:
    print(f"PAUSED {where}", flush=True)
    time.sleep(600)
    raise SystemExit("was not killed")


def sessions_for(url: str) -> Any:
    from feedback.db import make_engine, make_session_factory

    return make_session_factory(make_engine(url))


def register(url: str, adapters: str, source: str, point: str) -> None:
    """Register SOURCE as the active adapter, pausing at POINT:
    moved (the folder is in, no row yet), before-pointer (the row is committed, the pointer not
    written), after-pointer (the pointer is written, the database not committed)."""
    from trainer import registry as reg

    write = reg.write_atomic

    def write_atomic(path: Path, data: bytes) -> None:
        if path.name == "ACTIVE" and point == "before-pointer":
            pause(point)
        write(path, data)
        if path.name == "ACTIVE" and point == "after-pointer":
            pause(point)

    reg.write_atomic = write_atomic  # type: ignore[assignment]
    rename = Path.rename

    def moved(self: Path, target: Any) -> Any:
        out = rename(self, target)
        if point == "moved" and Path(target).parent == Path(adapters):
            pause(point)
        return out

    Path.rename = moved  # type: ignore[method-assign]
    reg.Registry(Path(adapters), sessions_for(url)).register(
        Path(source), status="active", reason="held-out loss fell", metrics={}, fingerprint="f", config={})
    print("DONE", flush=True)


def train(url: str, adapters: str, lock: str, dataset: str, tokenizer_dir: str, model_dir: str, step: str) -> None:
    """A training run of the tiny model (as tests/test_trainer.py's), paused at step STEP."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer.config import TrainConfig
    from trainer.pipeline import TrainingDeps, run_training
    from trainer.registry import Registry

    sessions = sessions_for(url)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    deps = TrainingDeps(sessions=sessions, registry=Registry(Path(adapters), sessions), tokenizer=tokenizer,
                        load_base=lambda: LlamaForCausalLM.from_pretrained(model_dir), dataset_path=Path(dataset),
                        lock_path=Path(lock))

    def progress(at: int, total: int, loss: float | None) -> None:
        print(f"step {at}/{total}", flush=True)
        if at >= int(step):
            pause(f"step {at}")

    run_training(deps, "train", TrainConfig(**FAST, max_steps=4), progress=progress)
    print("DONE", flush=True)


FAST = dict(batch_size=2, gradient_accumulation=1, learning_rate=5e-3, save_steps=1, loss_tolerance=0.5)

if __name__ == "__main__":
    {"register": register, "train": train}[sys.argv[1]](*sys.argv[2:])
