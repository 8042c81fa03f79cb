"""Shared fixtures: every test gets its own data directory and a clean environment."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the real export samples (tests/corpus, a copy of the project's shared corpus; SOURCES.md says where each is from)
CORPUS = Path(os.environ.get("DOPPEL_CORPUS", REPO / "tests" / "corpus"))
PG_URL = os.environ.get("DOPPEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("DOPPEL_") and key not in ("DOPPEL_TEST_POSTGRES_URL", "DOPPEL_CORPUS"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DOPPEL_DATA_DIR", str(tmp_path / "data"))
    # The facts embedder of the packaged MiniLM: the default (mpnet+use) assembles 440 MB of weights
    # in each new data directory and loads them in each process; tests of the default unset this.
    monkeypatch.setenv("DOPPEL_EMBEDDING_MODEL", "minilm+use")
    monkeypatch.chdir(tmp_path)  # no stray doppel.toml
    return tmp_path


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"sample corpus not found at {CORPUS} (set DOPPEL_CORPUS)")
    return CORPUS


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    from doppel.migrate import upgrade
    from feedback.db import make_engine

    eng = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_url() -> str:
    """A fresh PostgreSQL schema for one test; skipped with a reason when no server answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {str(exc.orig).strip().splitlines()[0]}")
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the packaged model converted once per test session; tests link
    its ``models/`` into their own data directory (see ``shared_models``)."""
    return tmp_path_factory.mktemp("modelcache")


@pytest.fixture(scope="session")
def tokenizer(model_cache: Path):  # type: ignore[no-untyped-def]
    """The real SmolLM2 tokenizer from the packaged GGUF (converted once per test session)."""
    from agent.models import load_tokenizer

    return load_tokenizer("", model_cache)


@pytest.fixture(scope="session")
def real_model(model_cache: Path, tokenizer):  # type: ignore[no-untyped-def]
    """The real packaged SmolLM2-135M-Instruct, fp32 on CPU, loaded once per session."""
    from agent.runtime import load_model

    model, _ = load_model("", model_cache, "cpu", "float32")
    return model


@pytest.fixture
def shared_models(tmp_path: Path, real_model) -> Path:  # type: ignore[no-untyped-def]
    """This test's data directory, with the session's converted model linked in (no 15 s conversion)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    cache = real_model.name_or_path
    (data / "models").mkdir(exist_ok=True)
    (data / "models" / "smollm2-135m-instruct").symlink_to(cache)
    return data


@pytest.fixture(scope="session")
def tiny_model(tokenizer):  # type: ignore[no-untyped-def]
    """A tiny random Llama with the real tokenizer's vocabulary: fast, and garbage, on purpose."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def embedder():  # type: ignore[no-untyped-def]
    """The real packaged all-MiniLM-L6-v2."""
    from knowledge.embed import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture(scope="session")
def use_embedder():  # type: ignore[no-untyped-def]
    """The real packaged Universal Sentence Encoder multilingual v3, in torch."""
    from knowledge.use import USEEmbedder

    return USEEmbedder()
