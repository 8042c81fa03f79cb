"""The base model's tokenizer for work that only renders and counts (``doppel dataset build``):
its ``tokenizer.json`` run by ``tokenizers`` and its chat template rendered by jinja2 the way
transformers renders it, without importing transformers (and torch under it): 3 s of a 6 s
rebuild here. A test holds it to transformers' tokenizer: the same prompts, token ids and
decoded text, and a training set byte for byte the same.

It offers what ``agent.prompt`` uses: ``encode``, ``decode``, ``apply_chat_template`` (text only),
``len``, ``name_or_path``, ``chat_template``. Anything that trains or generates loads transformers'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def load(folder: Path) -> ChatTokenizer | None:
    """The light tokenizer of a saved tokenizer folder, or None where it cannot stand in for
    transformers' (no tokenizer.json, a template that is not one plain string, tokens it does not
    know how to handle)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not (folder / "tokenizer.json").is_file():
        return None
    template = _template(folder, config)
    if template is None or re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return None
    if config.get("clean_up_tokenization_spaces") or config.get("split_special_tokens"):
        return None
    specials: dict[str, str] = {}
    for name in _SPECIAL:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[name] = value
    try:
        return ChatTokenizer(folder, template, specials)
    except Exception:  # a tokenizer.json this version of tokenizers cannot read: transformers' then
        return None


class ChatTokenizer:
    def __init__(self, folder: Path, template: str, specials: dict[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.name_or_path = str(folder)
        self.chat_template = template
        self._specials = specials
        for name, value in specials.items():
            setattr(self, name, value)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled = env.from_string(template)

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        if tokenize:
            raise NotImplementedError("the light tokenizer renders text only")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        messages = [dict(m) for m in conversation]
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **{**self._specials, **kwargs})
