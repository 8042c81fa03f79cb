"""Vectors of texts embedded before, on disk: the dataset builder asks the facts index about every
training sample (its newest incoming turn and the two before it, each turn a text of its own), and
most of those texts did not change since the last build. A facts edit, a new setting or a new
facts file re-renders every sample (the sample cache is keyed by all of them), but the texts'
vectors stay what they were: with this cache that rebuild searches again without embedding again.
Texts repeated across the history ("ok", "lol", "see you") are embedded once per build, not once
per batch.

Each build writes a fresh cache holding the vectors it used, beside the old one, and replaces it
when the build ends well: the file never grows past one history's texts, and texts no longer in
the history (deleted or forgotten) leave it at the next build. Keys are hashes of the texts; the
vectors are exact (float32), so a sample retrieves what it would retrieve without the cache. The
vectors are derived from private messages: ``doppel forget`` deletes the file (trainer/forget.py).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FILE_NAME = "embeddings.sqlite"
_CHUNK = 500  # SQLite takes at most 999 parameters a statement


class CachedEmbedder:
    """An ``Embedder`` that looks each text up in ``path`` before asking ``inner``. It has the inner
    model's name, so indexes built through it are the inner model's. Call ``close(keep)`` at the end:
    ``keep=True`` replaces the old cache with what this run used."""

    def __init__(self, inner: Any, path: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.vocabulary = getattr(inner, "vocabulary", frozenset())
        self.path = Path(path)
        self.tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.unlink(missing_ok=True)
        self.hits = 0
        self.embedded = 0
        self.old: sqlite3.Connection | None = None
        if self.path.is_file():
            try:
                old = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
                row = old.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
                if row is not None and row[0] == f"{self.name}|{self.dim}":
                    self.old = old
                else:
                    old.close()
                    log.info("the embedding cache %s holds another model's vectors; embedding afresh", self.path)
            except sqlite3.Error as exc:  # an unreadable cache is only a slower build
                log.warning("the embedding cache %s could not be read (%s); embedding afresh", self.path, exc)
        self.new = sqlite3.connect(self.tmp, check_same_thread=False)
        self.new.execute("PRAGMA journal_mode=OFF")
        self.new.execute("PRAGMA synchronous=OFF")
        self.new.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.new.execute("INSERT INTO meta VALUES ('model', ?)", (f"{self.name}|{self.dim}",))
        self.new.execute("CREATE TABLE vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _lookup(self, db: sqlite3.Connection | None, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        if db is None:
            return found
        try:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                rows = db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                for k, blob in rows:
                    found[k] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.Error as exc:
            log.warning("the embedding cache %s could not be read (%s)", self.path, exc)
        return found

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [self.key(t) for t in texts]
        distinct = list(dict.fromkeys(keys))
        have = self._lookup(self.new, distinct)  # used earlier in this run
        carried = self._lookup(self.old, [k for k in distinct if k not in have])
        have.update(carried)
        missing = [k for k in distinct if k not in have]
        if missing:
            text_of = dict(zip(keys, texts))
            vectors = np.asarray(self.inner.encode([text_of[k] for k in missing], batch_size=batch_size), dtype=np.float32)
            for k, v in zip(missing, vectors):
                have[k] = v
        fresh = [(k, have[k].tobytes()) for k in (*carried, *missing)]
        if fresh:
            self.new.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)", fresh)
        self.hits += len(texts) - len(missing)
        self.embedded += len(missing)
        if progress:
            progress(len(texts))
        return np.vstack([have[k] for k in keys])

    def close(self, keep: bool) -> None:
        if self.old is not None:
            self.old.close()
        self.new.commit()
        self.new.close()
        if keep:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __getattr__(self, name: str) -> Any:  # anything else the inner model offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
