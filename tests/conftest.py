"""Shared fixtures: every test gets its own data directory and a clean environment."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("DOPPEL_CORPUS", REPO.parent / "shared" / "corpus"))
PG_URL = os.environ.get("DOPPEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("DOPPEL_") and key not in ("DOPPEL_TEST_POSTGRES_URL", "DOPPEL_CORPUS"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DOPPEL_DATA_DIR", str(tmp_path / "data"))
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
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real SmolLM2 tokenizer from the packaged GGUF (converted once per test session)."""
    from agent.models import load_tokenizer

    return load_tokenizer("", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def embedder():  # type: ignore[no-untyped-def]
    """The real packaged all-MiniLM-L6-v2."""
    from knowledge.embed import SentenceEmbedder

    return SentenceEmbedder()
