"""BM25 over the facts, with an inverted index so a query touches only the facts sharing its words
(scoring every document per query term would cost ~1 ms per term for 10,000 facts)."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)

# Words too common to say anything about which fact is meant (English; the dense side covers the rest).
STOPWORDS = frozenset("""
a about am an and any are as at be been being but by can could did do does doing for from had has
have having he her here hers him his how i i'm if in into is it its just me my myself no nor not of
on once or our ours out over own s same she should so some such t than that the their theirs them
then there these they this those to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves ever really tell whats
""".split())


def _fold(word: str) -> str:
    # "Knedlík" and "Knedlik" are the same word to a person typing on a phone
    return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))


def _stem(word: str) -> str:
    # a light suffix strip: "climbing"/"climbs"/"climb", "cats"/"cat"
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def tokenize(text: str, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Folded, lightly stemmed content words; ``keep`` (on the folded word) can narrow them further."""
    words = (_fold(w) for w in _WORD.findall(text))
    return [_stem(w) for w in words if w not in STOPWORDS and len(w) > 1 and (keep is None or keep(w))]


def rare_word_filter(common: frozenset[str]) -> Callable[[str], bool] | None:
    """Keep only words the embedding model does not know as whole words (names like "Knedlík",
    "Piranesi", model numbers) and words with digits: that is where embeddings miss and exact
    matching helps. Common words are left to the dense side, where a shared "live" or "place"
    would only pull the wrong fact up. Without a vocabulary every word counts."""
    if not common:
        return None
    return lambda w: w not in common or any(c.isdigit() for c in w)


class BM25:
    """Okapi BM25. ``score(query)`` returns (doc indices, scores in 0..1): the raw score divided by
    what a fact of average length holding each known query term once would score, clipped at 1, so
    the number says how much of the query's information a fact matches."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75,
                 keep: Callable[[str], bool] | None = None, terms_of: dict[str, list[str]] | None = None) -> None:
        """``terms_of``: the documents' terms from an earlier build with the same ``keep`` (tokenizing
        10,000 facts is most of a rebuild's time after a one-fact edit); what is new is added to it."""
        self.k1, self.b = k1, b
        self.keep = keep
        self.n = len(docs)
        postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        lengths = np.zeros(max(self.n, 1), dtype=np.float32)
        known = terms_of if terms_of is not None else {}
        self.terms_of: dict[str, list[str]] = {}
        for i, doc in enumerate(docs):
            terms = known.get(doc)
            if terms is None:
                terms = tokenize(doc, keep)
            self.terms_of[doc] = terms
            lengths[i] = len(terms)
            for term, tf in Counter(terms).items():
                postings[term].append((i, tf))
        avg = float(lengths[: self.n].mean()) if self.n else 1.0
        norm = k1 * (1 - b + b * lengths / max(avg, 1e-6))
        self._postings: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for term, plist in postings.items():
            ids = np.fromiter((d for d, _ in plist), dtype=np.int64, count=len(plist))
            tf = np.fromiter((t for _, t in plist), dtype=np.float32, count=len(plist))
            idf = math.log(1 + (self.n - len(plist) + 0.5) / (len(plist) + 0.5))
            self._postings[term] = (ids, (idf * tf * (k1 + 1) / (tf + norm[ids])).astype(np.float32), idf)

    def score(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        terms = [t for t in dict.fromkeys(tokenize(query, self.keep)) if t in self._postings]
        if not terms:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        ids = np.concatenate([self._postings[t][0] for t in terms])
        contrib = np.concatenate([self._postings[t][1] for t in terms])
        bound = sum(self._postings[t][2] for t in terms)
        uniq, inv = np.unique(ids, return_inverse=True)
        scores = np.zeros(len(uniq), dtype=np.float32)
        np.add.at(scores, inv, contrib)
        return uniq, np.minimum(scores / max(bound, 1e-6), 1.0)
