"""The facts index: dense vectors in FAISS plus BM25, persisted next to the data, following the file.

``FactIndex`` is an immutable snapshot of one version of the facts file. ``KnowledgeBase`` owns the
current snapshot: at each retrieval it checks the file (one ``stat``), and when the file changed it
builds a new snapshot, re-embedding only the facts whose text is new, persists it atomically and
swaps it in. The build holds no lock a query takes: while one runs (a full reindex embeds for
minutes), queries are answered from the snapshot that was serving.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DoppelError
from knowledge.embed import Embedder
from knowledge.facts import DEFAULT_MAX_BYTES, Fact, FactsFile, read_facts_file, write_atomic
from knowledge.lexical import BM25, rare_word_filter

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: the hub references travel with the vectors

# Messages that ask about nothing in particular. A fact close to many of them is a "hub": a general
# sentence ("I work from home on Mondays") that comes out near every question and pushes the fact
# that was asked about down. Its score is lowered by how close it is to these (see ``hub_weight``).
# Not the small talk bench/retrieval.py measures with.
HUB_REFERENCES = (
    "hey", "yo what's up", "long time no see", "how have you been?", "what are you up to?", "got a minute?",
    "thanks a lot", "no worries", "sounds good to me", "I don't know, maybe", "wait what", "ok fine",
    "that's funny", "are you busy?", "talk later", "what about you?", "tell me something about yourself",
    "any news?", "how was your day?", "what's new with you?", "do you have plans?", "I see", "really?",
    "good night", "let's catch up soon",
    "привет", "как дела?", "что делаешь?", "ок, до завтра", "ха-ха, точно", "ты где?", "спасибо!",
    "доброе утро", "что думаешь об этом?", "позвони мне потом", "давай", "ну ладно", "серьёзно?",
    "расскажи о себе", "какие новости?",
)
REFERENCES_ID = hashlib.sha1("\n".join(HUB_REFERENCES).encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class RetrievalConfig:
    top_k: int = 1  # facts put into a prompt: the best alone (held-out fact use 79 -> 88-92 % against 3; README "Measured")
    min_score: float = 0.2  # fused score below which a fact is not used (tuned for minilm+use; MiniLM alone: 0.25)
    # a fact scoring more than this below the best one is left out: a near-miss beside the fact asked about is
    # what a small model states instead of it (tuned on tune_en: facts a prompt 2.27 -> 1.45, none asked for lost)
    margin: float = 0.1
    lexical_weight: float = 0.2  # share of BM25 in the fused score (0 = dense only)
    candidates: int = 32  # taken from each side before fusing
    context_weight: float = 0.5  # weight of the recent context against the newest message
    hub_weight: float = 1.0  # a fact's cosine is lowered by this times how far it is a hub (0 = off)
    hub_k: int = 5  # a fact's hubness: its mean cosine to its hub_k nearest HUB_REFERENCES
    ann_threshold: int = 50_000  # above this many facts, HNSW instead of the exact flat index
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Hit:
    fact: Fact
    score: float
    dense: float
    lexical: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.fact.id, "text": self.fact.text, "topic": self.fact.topic,
                "score": round(self.score, 4), "dense": round(self.dense, 4), "lexical": round(self.lexical, 4)}


NEAR_MISSES = 3  # facts shown after those the prompt gets, where the owner checks a question (console, `facts search`)


def used_in_prompt(ranked: Sequence[Hit], config: RetrievalConfig, top_k: int | None = None,
                   min_score: float | None = None, margin: float | None = None) -> list[bool]:
    """For facts ranked best first with nothing cut (``search`` with ``min_score=-1`` and an infinite
    margin), which of them the same search with the settings (or the arguments) keeps: the first
    ``top_k``, none below ``min_score``, none more than ``margin`` below the best."""
    top_k = config.top_k if top_k is None else top_k
    min_score = config.min_score if min_score is None else min_score
    margin = config.margin if margin is None else margin
    return [i < top_k and h.score >= min_score and h.score >= ranked[0].score - margin for i, h in enumerate(ranked)]


@dataclass
class BuildReport:
    facts: int
    embedded: int  # facts whose vectors were computed now
    reused: int  # facts whose vectors came from the previous index
    kind: str
    seconds: float
    model: str = ""
    warnings: list[str] = field(default_factory=list)
    replaced_model: str = ""  # the embedding model of the index this one replaced, when it was another

    def model_change(self) -> str:
        """A sentence for the owner when the embedding model changed, else ''."""
        if not self.replaced_model:
            return ""
        return (f"The embedding model changed ({self.replaced_model} -> {self.model}): "
                f"all {self.facts} facts were embedded again.")


def _flat(dim: int) -> Any:
    """The exhaustive index that finds the candidates: every vector scanned, stored in float16.

    It only picks candidates (the score is computed again from the float32 vectors, less hubness),
    and half the bytes is half the scan: at 10,000 facts (20,000 vectors of 896 dimensions) a query
    took 4.8 ms in ``IndexFlatIP`` and 1.2 ms here, and its top 64 held every exact top 10 of the
    bench's questions (bench/retrieval.py)."""
    import faiss

    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)


def _make_faiss(vectors: np.ndarray, config: RetrievalConfig) -> tuple[Any, str]:
    import faiss

    dim = vectors.shape[1]
    if len(vectors) > config.ann_threshold:
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        kind = "hnsw"
    else:
        index = _flat(dim)
        kind = "flat"
    if len(vectors):
        index.add(vectors)
    return index, kind


class FactIndex:
    """One version of the facts, embedded and indexed. Never changes once built."""

    def __init__(self, facts: list[Fact], vectors: np.ndarray, faiss_index: Any, kind: str,
                 model: str, file_sha256: str, config: RetrievalConfig,
                 vocabulary: frozenset[str] = frozenset(), references: np.ndarray | None = None,
                 terms_of: dict[str, list[str]] | None = None) -> None:
        self.facts = facts
        self.vectors = vectors
        self.faiss = faiss_index
        self.kind = kind
        self.model = model
        self.file_sha256 = file_sha256
        self.config = config
        self.bm25 = BM25([f.embedding_text for f in facts], keep=rare_word_filter(vocabulary), terms_of=terms_of)
        if kind == "hnsw":
            faiss_index.hnsw.efSearch = config.hnsw_ef_search
        self.references = references
        self.hub = self._hubness(vectors, references, config)

    @staticmethod
    def _hubness(vectors: np.ndarray, references: np.ndarray | None, config: RetrievalConfig) -> np.ndarray:
        """``hub_weight`` times each row's mean cosine to its ``hub_k`` nearest references, less the
        mean of that over the rows: what ``search`` takes off each row's cosine (the typical fact
        keeps its score, a hub loses, a very specific fact gains)."""
        if references is None or not len(references) or config.hub_weight <= 0 or not len(vectors):
            return np.zeros(len(vectors), dtype=np.float32)
        k = max(1, min(config.hub_k, len(references)))
        hub = np.empty(len(vectors), dtype=np.float32)
        for i in range(0, len(vectors), 50_000):  # bounded memory for a very large facts file
            sims = vectors[i:i + 50_000] @ references.T
            hub[i:i + 50_000] = np.partition(sims, len(references) - k, axis=1)[:, -k:].mean(axis=1)
        return (config.hub_weight * (hub - hub.mean())).astype(np.float32)

    def __len__(self) -> int:
        return len(self.facts)

    @staticmethod
    def views(facts: Sequence[Fact]) -> list[str]:
        """The texts embedded for the facts: each fact as written (with its topic), then each as
        addressed to the twin. Row ``r`` of the vectors belongs to fact ``r % len(facts)``."""
        return [f.embedding_text for f in facts] + [f.addressed_text for f in facts]

    @classmethod
    def build(cls, parsed: FactsFile, embedder: Embedder, config: RetrievalConfig,
              previous: FactIndex | None = None, progress: Callable[[int], None] | None = None) -> tuple[FactIndex, BuildReport]:
        """Embed what is new (the previous index is the cache, keyed by the embedded text) and index it.
        ``progress`` is called with the number of facts done (both views of a fact count as one)."""
        t0 = time.perf_counter()
        cache: dict[str, np.ndarray] = {}
        if previous is not None and previous.model == embedder.name:
            cache = dict(zip(cls.views(previous.facts), previous.vectors))
        texts = cls.views(parsed.facts)
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        new_facts = sum(1 for f in parsed.facts if f.embedding_text not in cache or f.addressed_text not in cache)
        if progress and len(parsed.facts) > new_facts:
            progress(len(parsed.facts) - new_facts)
        if todo:
            counted = [0]

            def step(n: int) -> None:  # report facts, not texts
                before = counted[0] // 2
                counted[0] += n
                if progress:
                    progress(min(counted[0] // 2, new_facts) - min(before, new_facts))

            fresh = embedder.encode(todo, progress=step)
            cache.update(zip(todo, fresh))
        vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            vectors[i] = cache[text]
        index, kind = _make_faiss(vectors, config)
        if previous is not None and previous.model == embedder.name and previous.references is not None:
            references = previous.references
        else:
            references = embedder.encode(list(HUB_REFERENCES)) if config.hub_weight > 0 else None
        same_model = previous is not None and previous.model == embedder.name  # and so the same vocabulary
        built = cls(parsed.facts, vectors, index, kind, embedder.name, parsed.sha256, config, embedder.vocabulary,
                    references, previous.bm25.terms_of if same_model and previous is not None else None)
        report = BuildReport(len(parsed.facts), new_facts, len(parsed.facts) - new_facts, kind,
                             time.perf_counter() - t0, embedder.name, list(parsed.warnings),
                             previous.model if previous is not None and previous.model != embedder.name else "")
        return built, report

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the index, its id map and the file hash as one file, atomically."""
        import faiss

        meta = {"version": FORMAT_VERSION, "model": self.model, "kind": self.kind, "file_sha256": self.file_sha256,
                "references": REFERENCES_ID if self.references is not None else "",
                "facts": [[f.id, f.text, f.topic, f.line] for f in self.facts]}
        buf = io.BytesIO()
        refs = self.references if self.references is not None else np.zeros((0, self.vectors.shape[1]), np.float32)
        # an exact (flat) index is the vectors themselves: it is rebuilt at load (milliseconds) instead of
        # written twice (with 896-dimensional vectors, 10,000 facts are 72 MB a copy)
        raw = faiss.serialize_index(self.faiss) if self.kind != "flat" else np.zeros(0, np.uint8)
        np.savez(buf, vectors=self.vectors, faiss=raw, references=refs,
                 meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, config: RetrievalConfig, vocabulary: frozenset[str] = frozenset()) -> FactIndex | None:
        """The persisted index, or None when there is none or it cannot be used (then it is rebuilt)."""
        import faiss

        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                if meta.get("version") != FORMAT_VERSION:
                    log.warning("the facts index %s was written by another version of Doppel (embedding model %s): "
                                "every fact is embedded again", path, meta.get("model", "?"))
                    return None
                vectors = np.array(z["vectors"], dtype=np.float32)
                raw = np.array(z["faiss"])
                references = np.array(z["references"], dtype=np.float32)
            facts = [Fact(fid, text, topic, line) for fid, text, topic, line in meta["facts"]]
            if meta["kind"] == "flat":
                index = _flat(vectors.shape[1])
                index.add(vectors)
            else:
                index = faiss.deserialize_index(raw)
            if index.ntotal != 2 * len(facts) or len(vectors) != 2 * len(facts):
                raise ValueError("id map and index disagree")
        except Exception as exc:  # a damaged index is rebuilt from the facts file, never fatal
            log.warning("ignoring the unreadable facts index %s (%s); it will be rebuilt", path, exc)
            return None
        if meta.get("references") != REFERENCES_ID or not len(references):
            references = None  # other references (or none): the next build embeds them anew
        return cls(facts, vectors, index, meta["kind"], meta["model"], meta["file_sha256"], config, vocabulary,
                   references)

    # -- retrieval --------------------------------------------------------------------------------

    def search(self, query_vector: np.ndarray, query_text: str, top_k: int | None = None,
               min_score: float | None = None, margin: float | None = None) -> list[Hit]:
        """The facts for a query, best first: at most ``top_k``, none below ``min_score``, none more
        than ``margin`` below the best (each None: the config's)."""
        if not self.facts:
            return []
        cfg = self.config
        top_k = cfg.top_k if top_k is None else top_k
        min_score = cfg.min_score if min_score is None else min_score
        margin = cfg.margin if margin is None else margin
        q = np.asarray(query_vector, dtype=np.float32).reshape(1, -1)
        n = len(self.facts)
        n_cand = min(max(cfg.candidates, top_k), n)
        _, rows = self.faiss.search(q, min(2 * n_cand, 2 * n))
        lexical: dict[int, float] = {}
        if cfg.lexical_weight > 0:
            lex_ids, lex_scores = self.bm25.score(query_text)
            order = np.argsort(-lex_scores)[:n_cand]
            lexical = {int(lex_ids[i]): float(lex_scores[i]) for i in order}
        candidates = sorted({int(r) % n for r in rows[0] if r >= 0} | lexical.keys())
        if not candidates:
            return []
        cand = np.asarray(candidates)
        # exact cosine for every candidate from either side, less its hubness; the better of the two views
        dense = np.maximum(self.vectors[cand] @ q[0] - self.hub[cand], self.vectors[cand + n] @ q[0] - self.hub[cand + n])
        w = cfg.lexical_weight
        hits = []
        for row, d in zip(candidates, dense):
            lex = lexical.get(row, 0.0)
            score = (1 - w) * float(d) + w * lex
            if score >= min_score:
                hits.append(Hit(self.facts[row], score, float(d), lex))
        hits.sort(key=lambda h: -h.score)
        return [h for h in hits[:top_k] if h.score >= hits[0].score - margin]


_TURN_CHARS = 500  # of a context turn, the end is embedded


def _recent(context: Sequence[str]) -> list[str]:
    """The recent turns as they are embedded: each on its own (a turn is context for the next
    samples and the query of its own, so the dataset build embeds every turn once), its last 500
    characters, empty ones left out."""
    return [c[-_TURN_CHARS:] for c in context if c.strip()]


def _context_vector(vectors: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """The recent turns' vectors as one: their mean weighted by length, the way a mean-pooling model
    sees the turns written one after the other (what was embedded before, at twice the cost)."""
    v = sum(len(t) * np.asarray(x, dtype=np.float32) for t, x in zip(texts, vectors))
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _combine(v_new: np.ndarray, v_ctx: np.ndarray, context_weight: float) -> np.ndarray:
    v = v_new + context_weight * v_ctx
    return (v / max(float(np.linalg.norm(v)), 1e-9)).astype(np.float32)


def query_vector(embedder: Embedder, text: str, context: Sequence[str], context_weight: float) -> np.ndarray:
    """The newest message, nudged toward the recent context ("what about on Sundays?" after a
    message about hiking). One encoder call for all of them."""
    recent = _recent(context) if context_weight > 0 else []
    if not recent:
        return embedder.encode([text])[0]
    vectors = embedder.encode([text, *recent])
    return _combine(vectors[0], _context_vector(vectors[1:], recent), context_weight)


class KnowledgeBase:
    """The facts the running twin knows, kept in step with the file the owner edits."""

    def __init__(self, facts_path: Path, index_path: Path, embedder: Embedder,
                 config: RetrievalConfig = RetrievalConfig()) -> None:
        self.facts_path = Path(facts_path)
        self.index_path = Path(index_path)
        self.embedder = embedder
        self.config = config
        self._index: FactIndex | None = None
        self._signature: tuple[int, int, int] | None = None
        self._lock = threading.Lock()  # guards the swap of the snapshot; held for microseconds
        self._build_lock = threading.Lock()  # one build at a time; a query never waits for it
        self.last_report: BuildReport | None = None
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.facts_path)
        except FileNotFoundError:
            return (0, -1, 0)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _swap(self, index: FactIndex | None, signature: tuple[int, int, int]) -> None:
        with self._lock:
            if index is not None:
                self._index = index
            self._signature = signature

    def refresh(self, force: bool = False, progress: Callable[[int], None] | None = None,
                reuse: bool = True, wait: bool = True) -> BuildReport | None:
        """Bring the index in step with the file. Returns what was done, or None if nothing was needed.
        ``force`` rebuilds even when the file did not change; ``reuse=False`` also re-embeds every fact.
        The new index is built beside the one serving and swapped in when whole: queries meanwhile
        use the old one. ``wait=False`` returns None at once when another build is under way.
        Raises ``DoppelError`` when the file cannot be read; the previous index then keeps serving."""
        if not self._build_lock.acquire(blocking=wait):
            return None
        try:
            return self._rebuild(force, progress, reuse)
        finally:
            self._build_lock.release()

    def _rebuild(self, force: bool, progress: Callable[[int], None] | None, reuse: bool) -> BuildReport | None:
        signature = self._stat()
        with self._lock:
            serving, known = self._index, self._signature
        if not force and serving is not None and signature == known:
            return None
        try:
            parsed = read_facts_file(self.facts_path, self.config.max_bytes)
        except DoppelError as exc:
            self._swap(None, signature)  # do not retry on every query; retry when the file changes
            self.last_error = exc.message
            raise
        self.last_error = None
        previous = serving if serving is not None else FactIndex.load(self.index_path, self.config, self.embedder.vocabulary)
        if not force and previous is not None and previous.file_sha256 == parsed.sha256 \
                and previous.model == self.embedder.name:
            self._swap(previous, signature)
            return None
        # the slow part (embedding) holds no lock a query takes: replies keep the serving snapshot
        index, report = FactIndex.build(parsed, self.embedder, self.config, previous if reuse else None, progress)
        for w in report.warnings:
            log.warning("facts: %s", w)
        try:
            index.save(self.index_path)
        except OSError as exc:  # serving from memory still works; say so and go on
            log.warning("could not save the facts index to %s: %s", self.index_path, exc)
        self._swap(index, signature)
        self.last_report = report
        if report.replaced_model:
            log.warning("facts index: %s", report.model_change())
        log.info("facts index: %d facts (%d embedded, %d reused) in %.2f s", report.facts,
                 report.embedded, report.reused, report.seconds)
        return report

    def current(self) -> FactIndex:
        """The index for the file as it is now. While another thread rebuilds it, the snapshot that
        was serving answers. A file that became unreadable leaves the last good index serving (the
        error is logged and kept in ``last_error``)."""
        with self._lock:
            index, known = self._index, self._signature
        if index is not None and self._stat() == known:
            return index
        try:
            self.refresh(wait=index is None)
        except DoppelError as exc:
            if self._index is None:
                raise
            log.warning("facts file unreadable, still using the previous version: %s", exc.message)
        with self._lock:
            assert self._index is not None
            return self._index

    def add(self, text: str, topic: str = "") -> tuple[Fact, bool]:
        """Append a fact to the file (see ``knowledge.facts.add_fact``) and index it now."""
        from knowledge.facts import add_fact

        fact, new = add_fact(self.facts_path, text, topic, self.config.max_bytes)
        if new:
            self.refresh()
        return fact, new

    def facts(self) -> list[Fact]:
        return list(self.current().facts)

    def preview(self, text: str, query: str, top_k: int | None = None, min_score: float | None = None,
                margin: float | None = None) -> list[Hit]:
        """What ``search`` would return were the facts file ``text`` (a draft the owner has not
        saved): only the draft's new or changed facts are embedded; the index serving is untouched."""
        from knowledge.facts import parse_facts

        if not query.strip():
            return []
        draft, _ = FactIndex.build(parse_facts(text), self.embedder, self.config, previous=self.current())
        if not draft.facts:
            return []
        return draft.search(query_vector(self.embedder, query, (), self.config.context_weight), query, top_k, min_score,
                            margin)

    def search(self, query: str, context: Sequence[str] = (), top_k: int | None = None,
               min_score: float | None = None, margin: float | None = None) -> list[Hit]:
        index = self.current()
        if not index.facts or not query.strip():
            return []
        vec = query_vector(self.embedder, query, context, self.config.context_weight)
        return index.search(vec, query, top_k, min_score, margin)

    def query_texts(self, queries: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """The distinct texts ``search_many`` embeds for ``queries``, in first-seen order."""
        use_ctx = self.config.context_weight > 0
        texts: dict[str, None] = {}
        for q, context in queries:
            if q.strip():
                texts.setdefault(q)
                for t in _recent(context) if use_ctx else ():
                    texts.setdefault(t)
        return list(texts)

    def search_many(self, queries: Sequence[tuple[str, Sequence[str]]], top_k: int | None = None,
                    min_score: float | None = None) -> list[list[Hit]]:
        """``search`` for many (query, context) pairs, with one encoder pass over their distinct
        texts (the dataset builder asks what the agent would have retrieved for every sample)."""
        index = self.current()
        if not index.facts:
            return [[] for _ in queries]
        use_ctx = self.config.context_weight > 0
        order = sorted(self.query_texts(queries), key=len)  # similar lengths batch with little padding
        vectors = self.embedder.encode(order) if order else np.zeros((0, 1), np.float32)
        row = {t: vectors[i] for i, t in enumerate(order)}
        out = []
        for q, context in queries:
            if not q.strip():
                out.append([])
                continue
            recent = _recent(context) if use_ctx else []
            vec = row[q]
            if recent:
                vec = _combine(vec, _context_vector([row[t] for t in recent], recent), self.config.context_weight)
            out.append(index.search(vec, q, top_k, min_score))
        return out
