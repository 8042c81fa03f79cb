"""Vectors of texts embedded before, on disk: the dataset builder asks the facts index about every
training sample (its newest incoming turn and the two before it, each turn a text of its own), and
most of those texts did not change since the last build. A facts edit, a new setting or a new
facts file re-renders every sample (the sample cache is keyed by all of them), but the texts'
vectors stay what they were: with this cache that rebuild searches again without embedding again.
Texts repeated across the history ("ok", "lol", "see you") are embedded once per build, not once
per batch.

Each build updates the file in one transaction: it adds the vectors it embedded, marks every text
it used (a sample reused from the last build marks its texts without reading their vectors) and, at
its end, deletes the vectors of texts it did not use (unless it continued the last build, copying
lines whose texts it never looked up: ``keep_all``), so the file never grows past one history's
texts and texts no longer in the history (deleted or forgotten) leave it, overwritten (SQLite's
``secure_delete``). A build that fails rolls back, and the file stays what it was. Keys are hashes
of the texts; the vectors are exact (float32), so a sample retrieves what it would retrieve without
the cache. The vectors are derived from private messages: ``doppel forget`` deletes the file
(trainer/forget.py).

Before, each build wrote a fresh file with only the vectors it looked up; a rebuild that reused
its samples looked up none of theirs, so after one rebuild the next facts edit embedded the whole
history again (65,000 texts, about 4 minutes here, for 200,000 messages).
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
    model's name, so indexes built through it are the inner model's. ``keep(texts)`` marks texts as
    used without embedding them. Call ``close(keep)`` at the end: ``keep=True`` commits what this
    run added and drops what it did not use, ``keep=False`` leaves the file as it was."""

    def __init__(self, inner: Any, path: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.vocabulary = getattr(inner, "vocabulary", frozenset())
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_suffix(self.path.suffix + ".tmp").unlink(missing_ok=True)  # an older version's
        self.hits = 0
        self.embedded = 0
        self._prune = True
        try:
            self.db = self._open()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            from common.errors import BusyError

            raise BusyError(f"The embedding cache {self.path} is in use by another build.",
                            hint="Wait for the other `doppel dataset build` (or `doppel train`) on this data "
                                 "directory to finish, then run this one again.") from None
        except sqlite3.DatabaseError as exc:  # an unreadable cache is only a slower build
            log.warning("the embedding cache %s could not be read (%s); embedding afresh", self.path, exc)
            self.path.unlink(missing_ok=True)
            Path(f"{self.path}-journal").unlink(missing_ok=True)
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=2.0)
        try:
            db.execute("PRAGMA secure_delete=ON")  # a dropped vector is overwritten, not left in a free page
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")
            model = f"{self.name}|{self.dim}"
            row = db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
            if row is None or row[0] != model:
                if row is not None:
                    log.info("the embedding cache %s holds another model's vectors; embedding afresh", self.path)
                db.execute("DELETE FROM vectors")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model,))
            db.execute("CREATE TEMP TABLE used (key BLOB PRIMARY KEY)")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _lookup(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            rows = self.db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for k, blob in rows:
                found[k] = np.frombuffer(blob, dtype=np.float32)
        return found

    def _use(self, keys: Sequence[bytes]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO temp.used VALUES (?)", ((k,) for k in keys))

    def keep(self, texts: Sequence[str]) -> None:
        """Mark ``texts`` as used by this build (their vectors stay in the file) without reading them."""
        self._use(list(dict.fromkeys(self.key(t) for t in texts)))

    def keep_all(self) -> None:
        """Keep every vector in the file at ``close``, used or not (a build that copied lines of the
        last one did not look their texts up)."""
        self._prune = False

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [self.key(t) for t in texts]
        distinct = list(dict.fromkeys(keys))
        have = self._lookup(distinct)
        missing = [k for k in distinct if k not in have]
        if missing:
            text_of = dict(zip(keys, texts))
            vectors = np.asarray(self.inner.encode([text_of[k] for k in missing], batch_size=batch_size), dtype=np.float32)
            for k, v in zip(missing, vectors):
                have[k] = v
            self.db.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)", ((k, have[k].tobytes()) for k in missing))
        self._use(distinct)
        self.hits += len(texts) - len(missing)
        self.embedded += len(missing)
        if progress:
            progress(len(texts))
        return np.vstack([have[k] for k in keys])

    def close(self, keep: bool) -> None:
        try:
            if keep:
                if self._prune:
                    self.db.execute("DELETE FROM vectors WHERE key NOT IN (SELECT key FROM temp.used)")
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
        finally:
            self.db.close()

    def __getattr__(self, name: str) -> Any:  # anything else the inner model offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
