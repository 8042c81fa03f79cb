"""Helpers and fakes shared by the tests. Fakes implement the real interfaces."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime import Generation, GenerationConfig


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "doppel", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, input=input)


class FakeEmbedder:
    """A bag-of-words embedder behind the ``knowledge.embed.Embedder`` interface: each word gets a
    fixed random direction, a text is the normalised sum of its words. Words in ``blind_to`` are
    not seen at all (to play an embedding model that misses a name). Counts what it encodes."""

    def __init__(self, dim: int = 64, name: str = "fake-bow", vocabulary: frozenset[str] = frozenset(),
                 blind_to: frozenset[str] = frozenset()) -> None:
        self.dim = dim
        self.name = name
        self.vocabulary = vocabulary
        self.blind_to = blind_to
        self.encoded: list[str] = []

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha1(w.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.encoded.extend(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.casefold()):
                if w not in self.blind_to:
                    out[i] += self._word(w)
            out[i] /= max(float(np.linalg.norm(out[i])), 1e-9)
        if progress:
            progress(len(texts))
        return out


class ScriptedRuntime:
    """The ``ModelRuntime`` interface with replies from a script; records the prompts it saw."""

    def __init__(self, tokenizer: Any, replies: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies or [])
        self.prompts: list[str] = []
        self.configs: list[GenerationConfig] = []
        self.adapter_version: str | None = "v7"
        self.reply_chars: float | None = None  # the adapter's typical reply length (ModelRuntime.reply_chars)
        self.max_length = 2048
        self.waiting = 0
        self.fail: Exception | None = None

    def generate(self, prompt: str, config: GenerationConfig, other_speakers: Any = (), own_name: str = "") -> Generation:
        if self.fail:
            raise self.fail
        self.prompts.append(prompt)
        self.configs.append(config)
        text = self.replies.pop(0) if self.replies else f"reply {len(self.prompts)}"
        return Generation(text, text, 10, 3, 1.0, 2.0, self.adapter_version)


class FakeTraining:
    """Stands in for ``trainer.pipeline.run_training`` behind the console's "retrain now": reports a
    few steps, records a run with a loss curve, and returns a ``RunResult``. ``gate`` holds it
    half-way until set (to look at a run in progress)."""

    def __init__(self, sessions: Any, steps: int = 5) -> None:
        import threading

        self.sessions = sessions
        self.steps = steps
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[str] = []

    def __call__(self, kind: str, on_step: Callable[[int, int, float | None], None], on_phase: Callable[[str], None]) -> Any:
        from feedback.models import TrainingRun, utcnow
        from trainer.pipeline import RunResult

        self.calls.append(kind)
        curve = [[i, round(2.5 / (1 + 0.3 * i), 4)] for i in range(1, self.steps + 1)]
        for i, (step, loss) in enumerate(curve, 1):
            on_step(step, self.steps, loss)
            if i == self.steps // 2:
                self.gate.wait(30)
        on_phase("evaluating the new adapter against the one serving now")
        with self.sessions.begin() as s:
            run = TrainingRun(kind=kind, status="rejected", finished_at=utcnow(), config={},
                              metrics={"loss_curve": curve, "current": {"heldout_loss": 2.0},
                                       "candidate": {"heldout_loss": 2.2}, "steps": self.steps})
            s.add(run)
            s.flush()
            run_id = run.id
        return RunResult(run_id, "rejected", f"Training run {run_id} ({kind}): rejected (held-out loss rose).")


def console_app(tokenizer: Any, sessions: Any, kb: Any, data_dir: Path, *, password: str = "s3cret",
                replies: list[str] | None = None, training: Any = None, min_ratings: int = 3) -> tuple[Any, Any]:
    """The HTTP app as ``doppel serve`` builds it (API + console), on fakes: a scripted model, the
    given facts, a real registry and database. Returns (app, console deps)."""
    from datetime import datetime, timedelta, timezone

    from agent.api import ApiConfig, create_app
    from agent.prompt import Persona
    from agent.service import Agent, AgentConfig
    from console import ConsoleDeps, Retrainer, SystemInfo, create_console
    from trainer.registry import Registry

    agent = Agent(ScriptedRuntime(tokenizer, replies), kb, sessions,  # type: ignore[arg-type]
                  AgentConfig(persona=Persona("Alex", "I write short lowercase messages.")))
    app = create_app(agent, kb, ApiConfig(password))
    nightly = datetime.now(timezone.utc).replace(hour=3, minute=0, second=0, microsecond=0) + timedelta(days=1)
    system = SystemInfo(model="SmolLM2-135M-Instruct (packaged)", backend="llama.cpp (Q8_0 weights)", device="cpu",
                        database=f"sqlite:///{data_dir / 'doppel.db'}", data_dir=str(data_dir), next_nightly=nightly,
                        schedule="03:00 every day (Europe/Prague)", scheduler_here=True)
    deps = ConsoleDeps(secret=password, agent=agent, knowledge=kb, sessions=sessions,
                       registry=Registry(data_dir / "adapters", sessions), system=lambda: system,
                       retrainer=Retrainer(training or FakeTraining(sessions), data_dir / "train.lock"),
                       nightly_min_ratings=min_ratings)
    app.register_blueprint(create_console(deps))
    return app, deps


# --- a real browser (Debian's chromium + chromium-driver) for the console's browser tests and screenshots ---
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def start_browser(width: int = 1280, height: int = 900) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


class Served:
    """A WSGI app on 127.0.0.1, a free port, in a thread (werkzeug's server)."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:  # no line per request
                pass

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


def mean_sampled_length(runtime: Any, calibrated: bool, draws: int = 30, stop_bias: float = 0.0) -> float:
    """Mean new tokens of ``draws`` seeded replies at temperature 0.3 (up to 12 tokens), with the
    stop drawn at the model's odds or tempered, its logit moved by ``stop_bias``: the stop-odds
    tests of both backends."""
    import torch

    from agent.runtime import GenerationConfig

    cfg = GenerationConfig(temperature=0.3, max_new_tokens=12, min_new_tokens=0, repetition_penalty=1.0,
                           calibrated_stop=calibrated, stop_bias=stop_bias)
    got = []
    for seed in range(draws):
        torch.manual_seed(seed)
        got.append(runtime.generate("hi", cfg).new_tokens)
    return sum(got) / len(got)
