"""A BERT encoder (all-MiniLM-L6-v2 and its kind) in a few lines of torch, and its tokenizer through
``tokenizers`` alone: the same vectors as transformers' ``BertModel`` (a test compares them), without
importing transformers' modelling code, which took 2.4 s of a 9 s ``doppel dataset build`` here
(the embedders load when a rebuild meets a text not in its vector cache).

``load(path)`` returns (tokenizer, a function loading the network) for a folder holding ``config.json`` (``model_type``
bert, absolute positions, GELU), ``model.safetensors`` and ``tokenizer.json``; None for anything
else, which then loads through transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        return None
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act", "gelu") != "gelu":
        return None
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        return None
    try:  # the weights' names as BertModel saves them (the header only is read)
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="np") as f:
            names = {k.removeprefix("bert.") for k in f.keys()}
    except Exception:
        return None
    layers = int(config.get("num_hidden_layers") or 0)
    needed = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight"}
    needed |= {f"encoder.layer.{i}.{part}.weight" for i in range(layers)
               for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                            "output.dense", "output.LayerNorm")}
    if not layers or not needed <= names:
        return None
    return config


def supported(path: Path) -> bool:
    return _config(Path(path)) is not None


class Features(dict):  # type: ignore[type-arg]
    """A batch's tensors (input_ids, attention_mask, token_type_ids), movable as transformers' are."""

    def to(self, device: Any) -> Features:
        return Features({k: v.to(device) for k, v in self.items()})


class BertTokenizer:
    """The folder's ``tokenizer.json`` run by ``tokenizers``, called as a transformers tokenizer is
    for a batch: ``padding=True`` (to the longest), truncation to ``max_length``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        padding = json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("padding") or {}
        self._pad_id = int(padding.get("pad_id", 0))
        self._max: int | None = None

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def _cut_at(self, max_length: int) -> None:
        if self._max != max_length:
            self._tok.enable_truncation(max_length=max_length)
            self._max = max_length

    def ids(self, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
        """Each text's token ids ([CLS] … [SEP]), cut to ``max_length`` as ``__call__`` cuts them."""
        self._cut_at(max_length)
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def __call__(self, texts: Sequence[str], padding: bool = True, truncation: Any = True, max_length: int = 512,
                 return_tensors: str = "pt", pad_to_multiple_of: int | None = None) -> Features:
        """``pad_to_multiple_of``: the batch is padded past its longest text to a multiple of this
        (never past ``max_length``), as transformers' tokenizers do."""
        import torch

        self._cut_at(max_length)
        encoded = self._tok.encode_batch(list(texts))
        width = max((len(e.ids) for e in encoded), default=0)
        if pad_to_multiple_of and width % pad_to_multiple_of:
            width = min(width + pad_to_multiple_of - width % pad_to_multiple_of, max(max_length, width))
        ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, :n] = 1
            types[i, :n] = torch.tensor(e.type_ids, dtype=torch.long)
        return Features(input_ids=ids, attention_mask=mask, token_type_ids=types)


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_READ = 4 << 20  # bytes read at a time


def read_safetensors(path: Path, dtype: Any = None) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, floating ones cast to ``dtype`` as they are read.

    Read in 4 MB pieces into the tensors they become: safetensors' own loader maps the file, and the
    mapped fp32 pages count as the process's memory while the bf16 copies are made (MiniLM's load
    peaked 130 MB over torch, 87 MB of it the mapped file). The format: an 8-byte little-endian header
    length, a JSON header (each tensor's dtype, shape and byte range after the header), the data."""
    import json
    import math
    import struct
    import sys

    import torch

    if sys.byteorder != "little":  # the format is little-endian; safetensors' own loader converts
        from safetensors.torch import load_file

        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                for k, v in load_file(str(path)).items()}
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 << 20:
            raise ValueError(f"{path} has a header of {size} bytes: not a safetensors file")
        header = json.loads(fh.read(size))
        start = 8 + size
        out: dict[str, Any] = {}
        buf = torch.empty(_READ, dtype=torch.uint8)  # one piece, reused: pieces allocated anew stayed in the heap
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                    or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list):
                raise ValueError(f"{path}: the header's entry for {name} is malformed")
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not take")
            src = getattr(torch, _DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            item = torch.empty((), dtype=src).element_size()
            if any(n < 0 for n in shape) or math.prod(shape) * item != end - begin or begin < 0:
                raise ValueError(f"{path}: tensor {name} does not fill its byte range")  # checked before allocating
            want = dtype if dtype is not None and src.is_floating_point else src
            tensor = torch.empty(shape, dtype=want)
            flat = tensor.view(-1)
            fh.seek(start + begin)
            if want == src:  # no cast: straight into the tensor
                if fh.readinto(memoryview(flat.view(torch.uint8).numpy())) != end - begin:
                    raise ValueError(f"{path} ends inside tensor {name}")
            else:
                step = max(_READ // item, 1)
                for lo in range(0, flat.numel(), step):
                    n = min(step, flat.numel() - lo)
                    if fh.readinto(memoryview(buf[:n * item].numpy())) != n * item:
                        raise ValueError(f"{path} ends inside tensor {name}")
                    flat[lo:lo + n] = buf[:n * item].view(src)
            out[name] = tensor
    return out


def _module(config: dict[str, Any], path: Path, dtype: Any = None) -> Any:
    """The network; ``dtype``: each tensor is cast as it is read (``read_safetensors``)."""
    import torch

    weights = read_safetensors(path / "model.safetensors", dtype)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
    heads = int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    n_layers = int(config["num_hidden_layers"])
    F = torch.nn.functional

    class Bert(torch.nn.Module):
        """BertModel's forward in inference (no dropout), as transformers runs it, on the tokens of a
        batch laid end to end: the linear layers (most of the work) see no padding, only the
        attention does, per text. The query, key and value projections are one matrix product."""

        def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
            super().__init__()
            for name, value in tensors.items():
                if name.startswith(prefix) and not name.endswith("position_ids") and ".pooler." not in f".{name}":
                    name = name[len(prefix):]
                    if ".attention.self." not in name:
                        self.register_buffer(name.replace(".", "__"), value.contiguous())
            for i in range(n_layers):
                p = f"{prefix}encoder.layer.{i}.attention.self."
                for part in ("weight", "bias"):
                    fused = torch.cat([tensors[p + f"{m}.{part}"] for m in ("query", "key", "value")])
                    self.register_buffer(f"encoder__layer__{i}__qkv__{part}", fused)
            self.config = SimpleNamespace(**config)

        def w(self, name: str) -> torch.Tensor:
            return getattr(self, name.replace(".", "__"))  # type: ignore[no-any-return]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> SimpleNamespace:
            """BertModel's interface for right-padded batches (each row's tokens first, then its
            padding, as a tokenizer pads): padded ids in, padded states out (zeros where the mask is 0)."""
            batch, length = input_ids.shape
            keep = attention_mask.bool()
            lens = keep.sum(dim=1)
            types = token_type_ids[keep] if token_type_ids is not None else None
            x = self.states(input_ids[keep], lens, types)
            out = x.new_zeros(batch, length, x.shape[-1])
            out[keep] = x
            return SimpleNamespace(last_hidden_state=out)

        def states(self, flat: torch.Tensor, lens: torch.Tensor, types: torch.Tensor | None = None,
                   rows: int = 0, width: int = 0, texts: int = 0) -> torch.Tensor:
            """The last hidden states of texts given end to end: ``flat`` their token ids, ``lens``
            their lengths (no padding between texts). The linear layers run on ``rows`` rows (at
            least the tokens; zero rows fill the rest, dropped), the attention on ``texts`` texts (at
            least the real ones; the rest are empty) padded to ``width`` tokens (at least the longest):
            on the CPU oneDNN keeps a kernel for every shape it meets, so a caller that rounds these
            sees few shapes recur (see knowledge.embed)."""
            w = self.w
            n_tok, n_text = int(flat.shape[0]), int(lens.shape[0])
            width = max(width, int(lens.max()) if n_text else 0)
            alone = n_text == 1 and texts <= 1  # one text (a query): its rows are its layout, nothing to move
            if alone:
                width = rows = max(width, rows)
            extra = max(rows - n_tok, 0)
            layout = max(texts, n_text)
            starts = torch.cumsum(lens, 0) - lens
            seg = torch.repeat_interleave(torch.arange(n_text, device=flat.device), lens)
            pos = torch.arange(n_tok, device=flat.device) - starts[seg]
            types = torch.zeros_like(flat) if types is None else types
            x = (w("embeddings.word_embeddings.weight")[flat] + w("embeddings.token_type_embeddings.weight")[types]
                 + w("embeddings.position_embeddings.weight")[pos])
            x = F.layer_norm(x, (x.shape[-1],), w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
            if extra:
                x = torch.cat([x, x.new_zeros(extra, x.shape[-1])])
            dtype, hidden = x.dtype, x.shape[-1]
            d = hidden // heads
            slot = seg * width + pos  # each token's place in the padded (text, position) layout
            real = torch.zeros(layout * width, dtype=torch.bool, device=flat.device)
            real[slot] = True
            # the attention in float32 whatever the weights' dtype, and not to oneDNN, which keeps a kernel for
            # each new bf16 shape (a 50,000-message dataset build peaked 40 MB lower, as fast). Fused
            # (scaled_dot_product_attention, as transformers runs BERT): the scores of a batch's texts are
            # never all held at once, where the softmax of them and its input were, with the heap grown to
            # every batch's widths in turn: a first build of the stand-in history (14,389 real chat
            # messages) peaked at 523-526 MB instead of 614-640, as fast; fp32 vectors within 5e-7 of before
            mask = torch.zeros(layout * width, device=flat.device).masked_fill_(~real, torch.finfo(torch.float32).min)
            mask = mask.view(layout, 1, 1, width)
            scale = 1.0 / math.sqrt(d)
            for i in range(n_layers):
                p = f"encoder.layer.{i}."
                qkv = F.linear(x, w(p + "qkv.weight"), w(p + "qkv.bias"))  # every row: one shape a batch size
                if alone:
                    padded = qkv
                else:
                    padded = qkv.new_zeros(layout * width, 3 * hidden)
                    padded[slot] = qkv[:n_tok]
                q, k, v = padded.view(layout, width, 3, heads, d).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale).to(dtype)
                a = a.transpose(1, 2).reshape(layout * width, hidden)
                if not alone:
                    a = a[slot]
                    if extra:
                        a = torch.cat([a, a.new_zeros(extra, hidden)])
                a = F.linear(a, w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias"))
                x = F.layer_norm(a + x, (hidden,), w(p + "attention.output.LayerNorm.weight"),
                                 w(p + "attention.output.LayerNorm.bias"), eps)
                h = F.gelu(F.linear(x, w(p + "intermediate.dense.weight"), w(p + "intermediate.dense.bias")))
                h = F.linear(h, w(p + "output.dense.weight"), w(p + "output.dense.bias"))
                x = F.layer_norm(h + x, (hidden,), w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias"), eps)
            return x[:n_tok]

    # the weights go in as an argument: a class body that read them from this scope would keep them
    # alive beside the module's copies once it is cast to bf16 (90 MB of MiniLM's fp32 weights)
    return Bert(weights).eval()


def load(path: Path) -> tuple[BertTokenizer, Any] | None:
    """(its tokenizer, a function that loads its network, in the dtype it is given) for a BERT folder;
    None for another model."""
    path = Path(path)
    config = _config(path)
    if config is None:
        return None
    return BertTokenizer(path), lambda dtype=None: _module(config, path, dtype)
