"""A packaged GGUF model's tokenizer saved for ``transformers`` and ``agent.fasttok`` without either
transformers or the GGUF reader: the header's key-value section is read here and a GPT-2 style
byte-level BPE (SmolLM2's) is built with ``tokenizers``. The files are the ones transformers'
own conversion saves (a test holds them equal); that conversion imports torch and parses the whole
file, 5.7 s and 525 MB the first time a data directory builds its training set, where this takes
~0.3 s. A GGUF of another kind (Gemma's SentencePiece vocabulary) returns False, and transformers
converts it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_CONTROL = 3  # token_type of the control tokens: transformers' conversion adds them as special tokens
_HEADER_MAX = 256 << 20  # a key-value section past this is not one this reader takes


class GGUFError(ValueError):
    pass


def read_metadata(path: Path) -> dict[str, Any]:
    """The key-value section of a GGUF file (versions 2 and 3), tensors left unread."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version, _, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version}")
        buf = fh.read(_HEADER_MAX)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise GGUFError(f"{path}: the key-value section ends early")
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("Q")
        if pos + n > len(buf):
            raise GGUFError(f"{path}: a string runs past the key-value section")
        s = buf[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(kind: int) -> Any:
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, n = take("IQ")
            if item == _STRING:
                return [string() for _ in range(n)]
            if item not in _SCALARS:
                raise GGUFError(f"{path}: an array of type {item}")
            return list(take(f"{n}{_SCALARS[item]}"))
        if kind not in _SCALARS:
            raise GGUFError(f"{path}: a value of type {kind}")
        return take(_SCALARS[kind])[0]

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = take("I")
        meta[key] = value(kind)
    return meta


def save_gpt2_tokenizer(gguf: Path, out: Path) -> bool:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``out`` (made
    whole, then moved into place) for a GGUF whose vocabulary is GPT-2 style BPE; False, writing
    nothing, for any other."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    meta = read_metadata(gguf)
    tokens, merges, types = (meta.get(f"tokenizer.ggml.{k}") for k in ("tokens", "merges", "token_type"))
    if meta.get("tokenizer.ggml.model") != "gpt2" or not tokens or not merges or not types or len(types) != len(tokens) \
            or meta.get("tokenizer.ggml.add_space_prefix", False) or meta.get("tokenizer.ggml.add_bos_token", False):
        return False
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges],
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {"backend": "tokenizers", "bos_token": name("bos"), "eos_token": name("eos"),
                              "is_local": True, "local_files_only": False, "model_max_length": int(1e30),
                              "pad_token": name("padding") or name("eos"), "tokenizer_class": "TokenizersBackend",
                              "unk_token": name("unknown")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None},
                                                              indent=2, sort_keys=True) + "\n", encoding="utf-8")
        template = meta.get("tokenizer.chat_template")
        if isinstance(template, str) and template:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        try:
            os.rename(tmp, out)  # an empty or absent folder only: another process's conversion stays
        except OSError:
            if not (out / "tokenizer_config.json").is_file():
                for f in tmp.iterdir():
                    os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
