"""Helpers and fakes shared by the tests. Fakes implement the real interfaces."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
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
        self.adapter_version: str | None = "v7"
        self.max_length = 2048
        self.waiting = 0
        self.fail: Exception | None = None

    def generate(self, prompt: str, config: GenerationConfig, other_speakers: Any = (), own_name: str = "") -> Generation:
        if self.fail:
            raise self.fail
        self.prompts.append(prompt)
        text = self.replies.pop(0) if self.replies else f"reply {len(self.prompts)}"
        return Generation(text, text, 10, 3, 1.0, 2.0, self.adapter_version)
