"""Authorship probe: how much does a text look like the owner's writing?

A logistic regression (L2, full-batch L-BFGS written here on torch sparse tensors; no
scikit-learn) is fitted on the owner's messages against other people's, on a mix of feature blocks:

- ``char``:  character 1-4-grams, case kept, with start/end-of-message markers (tf-idf, sublinear);
- ``word``:  lowercased word unigrams and bigrams, with start/end markers (tf-idf, sublinear);
- ``style``: length, capitalisation, punctuation, apostrophes, emoji, laughter, elongation, ...;
- ``func``:  frequencies of English function words.

Each block is scaled to about unit norm per message, so no block drowns the others. Classes are
weighted so that both count the same: a score of 0.5 means "could be either".

Short chat lines carry little evidence each, so compare sets of replies with `mean_score` (the
report of `fit` says how well sets of `set_size` held-out lines separate). On the stand-in history
of bench/make_history.py (6,601 lines of the owner, 7,788 of 35 others; median 43 characters) the
default probe tells single held-out lines apart at about 0.65 balanced accuracy (AUC 0.69-0.72),
and the mean score of 20 owner lines beats that of 20 others' lines in 99 % of draws, also when
whole conversations are held out (`owner_groups` / `other_groups`). Most of the signal is in the
``style`` block; ``char`` and ``word`` add vocabulary (catchphrases, another language) but also
topics, which do not carry over to new conversations.

    probe = AuthorshipProbe()
    report = probe.fit(owner_lines, other_lines)      # holds out 20 % of each class
    probe.mean_score(twin_replies)                    # vs probe.mean_score(real_owner_replies)
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

FEATURE_BLOCKS = ("char", "word", "style", "func")
DEFAULT_FEATURES: tuple[str, ...] = ("char", "word", "style")
MAX_CHARS = 2000  # longer texts are cut for the features
Z_CLIP = 5.0

FUNCTION_WORDS = tuple("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should
so some such than that the their theirs them themselves then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your
yours yourself yourselves also oh well yeah yes ok okay like really actually maybe pretty though still
even much many lot kind sort thing things
""".split())
_CONTRACTIONS_BARE = frozenset("""dont cant wont im ive id ill youre youve youll isnt arent wasnt werent
didnt doesnt hasnt havent hadnt couldnt wouldnt shouldnt thats whats theres theyre weve hes shes its
lets""".split())
_I_LOWER = frozenset(("i", "i'm", "im", "i've", "ive", "i'll", "i'd"))
_I_UPPER = frozenset(("I", "I'm", "Im", "I've", "Ive", "I'll", "I'd", "IM"))
_LOL = re.compile(r"\b(lo+l+|lmf?ao+|rofl|omg)\b", re.I)
_HAHA = re.compile(r"\b(a?ha(ha)+h?|he(he)+|xd+)\b", re.I)
_EMOTICON = re.compile(r"(?:^|\s)(?:[:;=xX8]-?[)(\]\[dDpP/\\|oO3*]|<3|\^\^|:'\()(?=\s|$)")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]", re.UNICODE)
_ELONGATED = re.compile(r"([a-zA-Z])\1\1")
_URL = re.compile(r"https?://|www\.", re.I)

STYLE_NAMES = (
    "log_chars", "log_words", "mean_word_len", "upper_ratio", "starts_upper", "starts_lower",
    "no_upper", "caps_word", "lower_i", "upper_i", "ends_period", "ends_excl", "ends_question",
    "ends_ellipsis", "ends_alnum", "n_excl", "n_question", "n_ellipsis", "n_comma", "n_period_inner",
    "apostrophe", "contraction", "bare_contraction", "quote", "dash", "paren", "colon_semicolon", "digit",
    "emoji", "emoticon", "lol", "haha", "elongated", "double_space", "url", "multi_sentence", "one_word",
    "repeat_punct",
)


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return cp >= 0x1F000 or 0x2600 <= cp <= 0x27BF or unicodedata.category(ch) == "So"


def style_vector(text: str) -> list[float]:
    """The ``style`` block of one text, in the order of `STYLE_NAMES`."""
    t = text[:MAX_CHARS]
    s = t.strip()
    words = [w for w in _WORD.findall(s.replace("’", "'")) if w[0].isalnum()]
    letters = [c for c in s if c.isalpha()]
    n_let = max(1, len(letters))
    upper = sum(c.isupper() for c in letters)
    low = [w.lower() for w in words]
    last = s[-1] if s else ""
    first_alpha = next((c for c in s if c.isalpha()), "")
    return [
        math.log1p(len(s)),
        math.log1p(len(words)),
        (sum(len(w) for w in words) / len(words)) if words else 0.0,
        upper / n_let,
        float(first_alpha.isupper()),
        float(first_alpha.islower()),
        float(bool(letters) and upper == 0),
        float(any(len(w) >= 2 and w.isupper() and w.isalpha() and w != "I" for w in words)),
        float(any(w in _I_LOWER for w in words)),
        float(any(w in _I_UPPER for w in words)),
        float(s.endswith(".") and not s.endswith("..")),
        float(last == "!"),
        float(last == "?"),
        float(s.endswith("..") or last == "…"),
        float(last.isalnum()),
        math.log1p(s.count("!")),
        math.log1p(s.count("?")),
        math.log1p(s.count("..") + s.count("…")),
        math.log1p(s.count(",")),
        math.log1p(len(re.findall(r"\.\s+\w", s))),
        float("'" in s or "’" in s),
        float(any("'" in w and w.replace("'", "") in _CONTRACTIONS_BARE for w in low)),
        float(any(w in _CONTRACTIONS_BARE for w in low if w not in ("its", "lets", "id", "ill", "hes", "shes"))),
        float('"' in s or "“" in s),
        float(" - " in s or "—" in s or "–" in s),
        float("(" in s or ")" in s),
        float(";" in s or (":" in s and not _EMOTICON.search(s))),
        float(any(c.isdigit() for c in s)),
        float(any(_is_emoji(c) for c in s)),
        float(bool(_EMOTICON.search(" " + s + " "))),
        float(bool(_LOL.search(s))),
        float(bool(_HAHA.search(s))),
        float(bool(_ELONGATED.search(s))),
        float("  " in t),
        float(bool(_URL.search(s))),
        float(len(re.findall(r"[.!?]+(?:\s|$)", s)) >= 2),
        float(len(words) == 1),
        float(bool(re.search(r"[!?]{2,}", s))),
    ]


def _char_grams(text: str) -> Iterable[str]:
    s = "\x02" + re.sub(r"\s+", " ", text[:MAX_CHARS].strip()) + "\x03"
    for n in (1, 2, 3, 4):
        for i in range(len(s) - n + 1):
            yield "c" + s[i:i + n]


def _word_grams(text: str) -> Iterable[str]:
    toks = ["<s>"] + [w.lower() for w in _WORD.findall(text[:MAX_CHARS])] + ["</s>"]
    for i, w in enumerate(toks):
        if 0 < i < len(toks) - 1:
            yield "w" + w
        if i:
            yield "b" + toks[i - 1] + " " + w


_FUNC_INDEX = {w: i for i, w in enumerate(FUNCTION_WORDS)}


def _func_vector(text: str) -> np.ndarray:
    v = np.zeros(len(FUNCTION_WORDS))
    words = [w.lower() for w in _WORD.findall(text[:MAX_CHARS]) if w[0].isalnum()]
    for w in words:
        j = _FUNC_INDEX.get(w)
        if j is not None:
            v[j] += 1
    return np.sqrt(v / len(words)) if words else v


class _Vectorizer:
    """Fits the vocabulary, idf and scaling of the chosen blocks; turns texts into a sparse matrix."""

    def __init__(self, features: Sequence[str], min_df: int = 2, max_features: int = 60000) -> None:
        self.features = tuple(features)
        self.min_df = min_df
        self.max_features = max_features
        self.vocab: dict[str, dict[str, int]] = {}
        self.idf: dict[str, np.ndarray] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.std: dict[str, np.ndarray] = {}
        self.offsets: dict[str, int] = {}
        self.dim = 0

    @staticmethod
    def _grams(block: str, text: str) -> Iterable[str]:
        return _char_grams(text) if block == "char" else _word_grams(text)

    def _dense(self, block: str, texts: Sequence[str]) -> np.ndarray:
        if block == "style":
            return np.array([style_vector(t) for t in texts], dtype=np.float64).reshape(len(texts), len(STYLE_NAMES))
        return np.array([_func_vector(t) for t in texts], dtype=np.float64).reshape(len(texts), len(FUNCTION_WORDS))

    def fit(self, texts: Sequence[str]) -> _Vectorizer:
        offset = 0
        for block in self.features:
            self.offsets[block] = offset
            if block in ("char", "word"):
                df: Counter = Counter()
                for t in texts:
                    df.update(set(self._grams(block, t)))
                kept = [g for g, c in df.most_common(self.max_features) if c >= self.min_df]
                kept.sort()
                self.vocab[block] = {g: i for i, g in enumerate(kept)}
                n = len(texts)
                self.idf[block] = np.array([math.log((1 + n) / (1 + df[g])) + 1.0 for g in kept])
                offset += len(kept)
            elif block in ("style", "func"):
                x = self._dense(block, texts)
                self.mean[block] = x.mean(0)
                std = x.std(0)
                self.std[block] = np.where(std > 1e-9, std, np.inf)  # constant in training: unused
                offset += x.shape[1]
            else:
                raise ValueError(f"unknown feature block {block!r}; choose from {FEATURE_BLOCKS}")
        self.dim = offset
        return self

    def names(self) -> list[str]:
        out = [""] * self.dim
        for block in self.features:
            off = self.offsets[block]
            if block in self.vocab:
                for g, i in self.vocab[block].items():
                    out[off + i] = f"{block}:{g[1:]!r}" if block == "char" else f"{block}:{g[1:]}"
            else:
                for i, name in enumerate(STYLE_NAMES if block == "style" else FUNCTION_WORDS):
                    out[off + i] = f"{block}:{name}"
        return out

    def transform(self, texts: Sequence[str]) -> torch.Tensor:
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        n = len(texts)
        for block in self.features:
            off = self.offsets[block]
            if block in self.vocab:
                vocab, idf = self.vocab[block], self.idf[block]
                for r, t in enumerate(texts):
                    counts = Counter(j for g in self._grams(block, t) if (j := vocab.get(g)) is not None)
                    if not counts:
                        continue
                    idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
                    v = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * idf[idx]
                    v /= np.linalg.norm(v)
                    rows.append(np.full(len(idx), r, dtype=np.int64))
                    cols.append(idx + off)
                    vals.append(v)
            else:
                x = (self._dense(block, texts) - self.mean[block]) / self.std[block]
                # a rare habit (a URL, a dash) must not outweigh everything else: z-scores cut at 5
                x = np.clip(x, -Z_CLIP, Z_CLIP) / math.sqrt(x.shape[1])  # about unit norm per row
                r, c = np.nonzero(x)
                rows.append(r.astype(np.int64))
                cols.append(c.astype(np.int64) + off)
                vals.append(x[r, c])
        if rows:
            index = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
            values = torch.from_numpy(np.concatenate(vals))
        else:
            index, values = torch.zeros((2, 0), dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
        return _csr(torch.sparse_coo_tensor(index, values, (n, self.dim), check_invariants=False))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile. The probe's sparse products and L-BFGS vector steps are
    small: on a busy 2-core machine two threads made them 2-100x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _csr(coo: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


def _fit_logistic(x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float,
                  max_iter: int, history: int = 10, tol: float = 1e-9) -> torch.Tensor:
    """Weighted L2 logistic regression by L-BFGS (two-loop recursion, backtracking line search);
    returns [w..., b]. ``x`` is rows x features and ``xt`` its transpose, both sparse CSR."""
    d = x.shape[1]
    wn = weight / weight.sum()

    def loss_grad(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        w = theta[:d]
        z = (x @ w.unsqueeze(1)).squeeze(1) + theta[d]
        loss = float((wn * (torch.nn.functional.softplus(z) - y * z)).sum() + 0.5 * l2 * (w @ w))
        r = wn * (torch.sigmoid(z) - y)
        grad = torch.empty_like(theta)
        grad[:d] = (xt @ r.unsqueeze(1)).squeeze(1) + l2 * w
        grad[d] = r.sum()
        return loss, grad

    theta = torch.zeros(d + 1, dtype=torch.float64)
    loss, grad = loss_grad(theta)
    mem: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s)
    for _ in range(max_iter):
        if float(grad.abs().max()) < 1e-7:
            break
        q = grad.clone()
        alphas = []
        for s_k, y_k, rho in reversed(mem):
            a = rho * float(s_k @ q)
            q -= a * y_k
            alphas.append(a)
        if mem:
            s_k, y_k, _ = mem[-1]
            q *= float(s_k @ y_k) / float(y_k @ y_k)
        else:
            q /= max(1.0, float(grad.norm()))
        for (s_k, y_k, rho), a in zip(mem, reversed(alphas)):
            q += (a - rho * float(y_k @ q)) * s_k
        direction = -q
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            mem.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0
        while True:
            new = theta + step * direction
            new_loss, new_grad = loss_grad(new)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s_k, y_k = new - theta, new_grad - grad
        sy = float(s_k @ y_k)
        if sy > 1e-12:
            mem.append((s_k, y_k, 1.0 / sy))
            del mem[:-history]
        done = loss - new_loss <= tol * max(1.0, abs(loss))
        theta, loss, grad = new, new_loss, new_grad
        if done:
            break
    return theta


def roc_auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(p) == 0 or len(n) == 0:
        return float("nan")
    allv = np.concatenate([p, n])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))


def set_separation(pos: Sequence[float], neg: Sequence[float], k: int = 20, draws: int = 2000,
                   seed: int = 0) -> float:
    """Share of draws where the mean score of k random ``pos`` texts beats that of k ``neg`` texts
    (each set drawn without replacement); nan when a side has fewer than k."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(p) < k or len(n) < k:
        return float("nan")
    rng = np.random.default_rng(seed)
    pm = np.array([p[rng.choice(len(p), k, replace=False)].mean() for _ in range(draws)])
    nm = np.array([n[rng.choice(len(n), k, replace=False)].mean() for _ in range(draws)])
    return float(np.mean((pm > nm) + 0.5 * (pm == nm)))


@dataclass(frozen=True)
class ProbeReport:
    """How well the fitted probe tells held-out owner texts from others' (nan without a hold-out)."""
    features: tuple[str, ...]
    n_train_owner: int
    n_train_other: int
    n_test_owner: int
    n_test_other: int
    accuracy: float  # at P(owner) > 0.5
    balanced_accuracy: float  # mean of the two classes' recalls
    auc: float
    set_size: int
    set_accuracy: float  # P(mean score of set_size owner texts > that of set_size others)
    fit_seconds: float


def length_stats(texts: Iterable[str]) -> dict[str, float]:
    """Characters per text: n, mean, median, p25, p75 (zeros for no text)."""
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    if lengths.size == 0:
        return {"n": 0, "mean": 0.0, "median": 0.0, "p25": 0.0, "p75": 0.0}
    p25, med, p75 = np.percentile(lengths, [25, 50, 75])
    return {"n": int(lengths.size), "mean": float(lengths.mean()), "median": float(med),
            "p25": float(p25), "p75": float(p75)}


def _split(n: int, groups: Sequence[object] | None, holdout: float, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices; with groups, whole groups go to one side."""
    if holdout <= 0:
        return np.arange(n), np.arange(0)
    if groups is not None and len(groups) != n:
        raise ValueError("groups must have one entry per text")
    if groups is None or len(set(groups)) < 3:  # too few groups to hold some out: split the texts
        perm = rng.permutation(n)
        n_test = round(n * holdout)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    keys = sorted(set(groups), key=repr)
    order = rng.permutation(len(keys))
    test_keys: set = set()
    size = Counter(groups)
    taken = 0
    for j in order:
        if taken >= n * holdout or len(test_keys) >= len(keys) - 1:  # at least one group trains
            break
        test_keys.add(keys[j])
        taken += size[keys[j]]
    test = np.array([i for i, g in enumerate(groups) if g in test_keys], dtype=np.int64)
    train = np.array([i for i, g in enumerate(groups) if g not in test_keys], dtype=np.int64)
    return train, test


class AuthorshipProbe:
    """Scores how much a text looks like the owner's writing: P(owner) from a logistic regression."""

    def __init__(self, features: Sequence[str] = DEFAULT_FEATURES, l2: float = 3e-3, max_iter: int = 300,
                 min_df: int = 2, max_features: int = 60000) -> None:
        unknown = set(features) - set(FEATURE_BLOCKS)
        if unknown or not features:
            raise ValueError(f"features must be some of {FEATURE_BLOCKS}, got {tuple(features)}")
        self.features = tuple(features)
        self.l2 = l2
        self.max_iter = max_iter
        self.min_df = min_df
        self.max_features = max_features
        self._vec: _Vectorizer | None = None
        self._theta: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self._theta is not None

    def fit(self, owner_texts: Sequence[str], other_texts: Sequence[str], seed: int = 0,
            holdout: float = 0.2, owner_groups: Sequence[object] | None = None,
            other_groups: Sequence[object] | None = None, set_size: int = 20) -> ProbeReport:
        """Fit on all but ``holdout`` of each class and report on that share (the probe keeps the
        model fitted on the rest; ``holdout=0`` fits on everything and reports nan). Groups (e.g. a
        conversation id per text) keep a whole group on one side of the split, so that the held-out
        score is not helped by topics and moods seen in training: prefer them where you have them."""
        if not owner_texts or not other_texts:
            raise ValueError("both the owner's and others' texts are needed")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        o_tr, o_te = _split(len(owner_texts), owner_groups, holdout, rng)
        x_tr, x_te = _split(len(other_texts), other_groups, holdout, rng)
        if not len(o_tr) or not len(x_tr):
            raise ValueError("the hold-out leaves a class without training texts: lower holdout or use more groups")
        train = [owner_texts[i] for i in o_tr] + [other_texts[i] for i in x_tr]
        y = torch.cat([torch.ones(len(o_tr)), torch.zeros(len(x_tr))]).double()
        # each class weighs the same in the loss, however many texts it has
        weight = torch.cat([torch.full((len(o_tr),), 0.5 / max(1, len(o_tr))),
                            torch.full((len(x_tr),), 0.5 / max(1, len(x_tr)))]).double()
        self._vec = _Vectorizer(self.features, self.min_df, self.max_features).fit(train)
        x = self._vec.transform(train)
        xt = _csr(x.to_sparse_coo().t())
        with _one_thread():
            self._theta = _fit_logistic(x, xt, y, weight, self.l2, self.max_iter)
        nan = float("nan")
        acc = bacc = auc = set_acc = nan
        if len(o_te) and len(x_te):
            po = self.score([owner_texts[i] for i in o_te])
            pn = self.score([other_texts[i] for i in x_te])
            rec_o = float(np.mean(np.asarray(po) > 0.5))
            rec_n = float(np.mean(np.asarray(pn) <= 0.5))
            acc = (rec_o * len(po) + rec_n * len(pn)) / (len(po) + len(pn))
            bacc = (rec_o + rec_n) / 2
            auc = roc_auc(po, pn)
            set_acc = set_separation(po, pn, k=set_size, seed=seed)
        return ProbeReport(self.features, len(o_tr), len(x_tr), len(o_te), len(x_te), acc, bacc, auc,
                           set_size, set_acc, time.perf_counter() - t0)

    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        if self._vec is None or self._theta is None:
            raise RuntimeError("fit the probe first")
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        x = self._vec.transform(list(texts))
        d = self._vec.dim
        with _one_thread():
            return (x @ self._theta[:d].unsqueeze(1)).squeeze(1) + self._theta[d]

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(owner) for each text."""
        return torch.sigmoid(self._logits(texts)).tolist()

    def mean_score(self, texts: Sequence[str]) -> float:
        """The mean P(owner) over a set of texts (nan for none): how owner-like the set reads."""
        s = self.score(texts)
        return float(np.mean(s)) if s else float("nan")

    def top_features(self, n: int = 20) -> dict[str, list[tuple[str, float]]]:
        """The n features pointing most to the owner and the n pointing most to others."""
        if self._vec is None or self._theta is None:
            raise RuntimeError("fit the probe first")
        names = self._vec.names()
        w = self._theta[: self._vec.dim].numpy()
        order = np.argsort(w)
        return {"owner": [(names[i], float(w[i])) for i in order[::-1][:n]],
                "other": [(names[i], float(w[i])) for i in order[:n]]}
