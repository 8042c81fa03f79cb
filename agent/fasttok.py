"""The base model's tokenizer for work that only renders and counts (``doppel dataset build``):
its ``tokenizer.json`` run by ``tokenizers`` and its chat template rendered by jinja2 the way
transformers renders it, without importing transformers (and torch under it): 3 s of a 6 s
rebuild here. A test holds it to transformers' tokenizer: the same prompts, token ids and
decoded text, and a training set byte for byte the same.

It offers what ``agent.prompt`` uses: ``encode``, ``decode``, ``apply_chat_template`` (text only),
``len``, ``name_or_path``, ``chat_template``, and ``count`` (``len(encode(...))``, faster). Anything
that trains or generates loads transformers'.
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


_COUNT_CHARS = 4_000_000  # characters of pieces whose token counts are kept (``ChatTokenizer.count``)


def _added_token_splitter(tok: Any) -> re.Pattern[str] | None:
    """A pattern matching the added tokens that ``tokenizers`` cuts a text at before anything else
    (those not ``normalized``: the template's markers), as it finds them (leftmost, longest); or None
    where a piece's tokens could depend on its neighbours: such a token strips the spaces beside it
    or matches whole words only, or the pre-tokenizer marks only the text's first word (Metaspace
    with ``prepend_scheme`` "first": every piece alone would be a first). Normalized added tokens
    are found inside each piece after its normalization, as encoding the piece alone finds them."""
    try:
        added = list(tok.get_added_tokens_decoder().values())
        # the pre-tokenizer alone: the whole tokenizer as JSON is ~30 MB of objects for one field
        pre = json.loads(tok.pre_tokenizer.__getstate__()) if tok.pre_tokenizer is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
    stack = [pre]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                return None
            stack.extend(node.get("pretokenizers") or [])
    first = [t for t in added if not t.normalized]
    for t in first:
        if t.lstrip or t.rstrip or t.single_word or not t.content:
            return None
    if not first:
        return re.compile(r"(?!x)x")  # matches nothing: the text is one piece
    contents = sorted({t.content for t in first}, key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in contents))


class ChatTokenizer:
    def __init__(self, folder: Path, template: str, specials: dict[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._counts: dict[str, int] = {}
        self._kept = 0  # characters in ``_counts``
        self._pieces = _added_token_splitter(self._tok)
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
        self._frame_cache: dict[str, tuple[str, str]] | None = None  # see ``_frames``; {}: none

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def count(self, text: str) -> int:
        """``len(encode(text, add_special_tokens=False))``, from the counts of the pieces between the
        added tokens (the template's markers). ``tokenizers`` cuts the text at its added tokens
        before anything else and encodes each piece alone, so the sum is exact; a prompt repeats
        most of the last one's messages, and each is encoded once (a 200,000-message dataset build
        encodes its prompts' text about once instead of ~8 times). Where the pieces are not
        independent (see ``_added_token_splitter``) it encodes the whole text."""
        if self._pieces is None:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        n = at = 0
        for m in self._pieces.finditer(text):
            n += 1 + self._piece(text[at:m.start()])
            at = m.end()
        return n + self._piece(text[at:])

    def _piece(self, piece: str) -> int:
        if not piece:
            return 0
        n = self._counts.get(piece)
        if n is None:
            n = len(self._tok.encode(piece, add_special_tokens=False).ids)
            if len(piece) <= _COUNT_CHARS // 8:
                self._kept += len(piece)
                if self._kept > _COUNT_CHARS:  # bounded memory: a long history's pieces do not pile up
                    self._counts.clear()
                    self._kept = len(piece)
                self._counts[piece] = n
        return n

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        if tokenize:
            raise NotImplementedError("the light tokenizer renders text only")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        frames = self._frames() if not kwargs else None
        if frames is not None and conversation[0].get("role") == "system" \
                and all(m.get("role") in ("user", "assistant") for m in conversation[1:]) \
                and all(isinstance(m.get("content"), str) and len(m) == 2 for m in conversation):
            out = [frames[m["role"]][0] + m["content"] + frames[m["role"]][1] for m in conversation]
            if add_generation_prompt:
                out.append(frames["generation"][0])
            return "".join(out)
        return self._jinja(conversation, add_generation_prompt, **kwargs)

    def _jinja(self, conversation: list[dict[str, str]], add_generation_prompt: bool, **kwargs: Any) -> str:
        messages = [dict(m) for m in conversation]
        return str(self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **{**self._specials, **kwargs}))

    def _frames(self) -> dict[str, tuple[str, str]] | None:
        """Where the template renders each message as its own text (a frame around its content, the
        same wherever it stands: ChatML and most chat templates), those frames and the generation
        prompt, found by rendering sentinels and held to the template's own rendering of probe
        chats; None for any other template, which is always rendered (a dataset build renders tens
        of thousands of prompts, and the sandboxed template was a sixth of it)."""
        if self._frame_cache is not None:
            return self._frame_cache or None
        self._frame_cache = {}
        try:
            frames: dict[str, tuple[str, str]] = {}
            chat: list[dict[str, str]] = []
            for role, mark in (("system", "\ue000"), ("user", "\ue001"), ("assistant", "\ue002")):
                before = self._jinja(chat, False) if chat else ""
                chat = chat + [{"role": role, "content": mark}]
                text = self._jinja(chat, False)
                if not text.startswith(before) or text.count(mark) != 1:
                    return None
                head, _, tail = text[len(before):].partition(mark)
                frames[role] = (head, tail)
            plain, asking = self._jinja(chat[:2], False), self._jinja(chat[:2], True)
            if not asking.startswith(plain):
                return None
            frames["generation"] = (asking[len(plain):], "")
            probes = [["system", "user"], ["system", "user", "assistant", "user"], ["system", "assistant", "user"],
                      ["system", "user", "assistant"], ["system", "user", "assistant", "user", "assistant", "user"]]
            texts = [" lead and trail ", "two\nlines\n", "{{ not a tag }} {% raw %}", "Ünïcødé ✓ 😂", "x",
                     "Sam: do you eat meat?\n\nFacts about you:\n- I am vegetarian.", "  ", "end\n\n"]
            for i, roles in enumerate(probes):
                conv = [{"role": r, "content": texts[(i + j) % len(texts)]} for j, r in enumerate(roles)]
                for gen in (False, True):
                    joined = "".join(frames[m["role"]][0] + m["content"] + frames[m["role"]][1] for m in conv)
                    if self._jinja(conv, gen) != joined + (frames["generation"][0] if gen else ""):
                        return None
        except Exception:  # a template that refuses a probe: it is rendered every time
            return None
        self._frame_cache = frames
        return frames
