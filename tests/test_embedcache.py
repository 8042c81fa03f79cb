"""The dataset builder's cache of query vectors (knowledge/embedcache.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from knowledge.embedcache import FILE_NAME, CachedEmbedder
from knowledge.index import KnowledgeBase
from tests.helpers import FakeEmbedder


def test_vectors_are_the_models_and_each_text_is_embedded_once(tmp_path: Path) -> None:
    inner = FakeEmbedder()
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)
    texts = ["ok", "see you at 7", "ok", "lol"]
    first = cache.encode(texts)
    again = cache.encode(["lol", "new one", "ok"])  # a later batch of the same build
    cache.close(keep=True)
    assert np.array_equal(first, FakeEmbedder().encode(texts))
    assert np.array_equal(again, FakeEmbedder().encode(["lol", "new one", "ok"]))
    assert sorted(inner.encoded) == ["lol", "new one", "ok", "see you at 7"]  # repeats cost nothing
    assert (cache.embedded, cache.hits) == (4, 3)

    # the next build: known texts come from the file, only new ones reach the model
    inner2 = FakeEmbedder()
    cache2 = CachedEmbedder(inner2, tmp_path / FILE_NAME)
    got = cache2.encode(["see you at 7", "brand new", "ok"])
    cache2.close(keep=True)
    assert np.array_equal(got, FakeEmbedder().encode(["see you at 7", "brand new", "ok"]))
    assert inner2.encoded == ["brand new"]
    # the file keeps what the last build used, not everything ever seen
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 3


def test_another_model_or_a_failed_build_leaves_no_mixed_vectors(tmp_path: Path) -> None:
    cache = CachedEmbedder(FakeEmbedder(name="model-a"), tmp_path / FILE_NAME)
    cache.encode(["hello there"])
    cache.close(keep=True)
    before = (tmp_path / FILE_NAME).read_bytes()

    other = FakeEmbedder(name="model-b", dim=32)
    cache = CachedEmbedder(other, tmp_path / FILE_NAME)
    assert cache.encode(["hello there"]).shape == (1, 32) and other.encoded == ["hello there"]
    cache.close(keep=False)  # the build failed: the old cache stays as it was, no temporary file
    assert (tmp_path / FILE_NAME).read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))

    (tmp_path / FILE_NAME).write_bytes(b"not a database")
    inner = FakeEmbedder(name="model-a")
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)  # unreadable: only slower
    assert cache.encode(["hello there"]).shape == (1, 64) and inner.encoded == ["hello there"]
    cache.close(keep=True)


def test_retrieval_through_the_cache_is_retrieval_without_it(tmp_path: Path) -> None:
    facts = tmp_path / "facts.md"
    facts.write_text("## Food\n- I am vegetarian.\n## Home\n- I live in Prague.\n## Pets\n- My cat is Knedlik.\n")
    plain = KnowledgeBase(facts, tmp_path / "facts.npz", FakeEmbedder())
    queries = [("do you eat meat?", ["hi", "what's for dinner"]), ("where do you live", []), ("ok", ["lol"])]
    expected = [[(h.fact.id, h.score) for h in hits] for hits in plain.search_many(queries, min_score=-1)]
    plain.facts()
    inner = FakeEmbedder()
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)
    cached = KnowledgeBase(facts, tmp_path / "facts.npz", cache)
    for _ in range(2):
        got = [[(h.fact.id, h.score) for h in hits] for hits in cached.search_many(queries, min_score=-1)]
        assert got == expected
    assert cache.name == "fake-bow" and cache.hits > 0
    cache.close(keep=True)


@pytest.mark.parametrize("n", [1, 1200])
def test_many_texts_in_one_call(tmp_path: Path, n: int) -> None:
    """More keys than SQLite takes in one statement."""
    texts = [f"message number {i}" for i in range(n)]
    cache = CachedEmbedder(FakeEmbedder(), tmp_path / FILE_NAME)
    cache.encode(texts)
    cache.close(keep=True)
    inner = FakeEmbedder()
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)
    assert np.array_equal(cache.encode(texts), FakeEmbedder().encode(texts)) and inner.encoded == []
    cache.close(keep=True)


def test_a_second_build_at_once_is_told_to_wait_and_the_first_keeps_its_file(tmp_path: Path) -> None:
    from common.errors import BusyError

    first = CachedEmbedder(FakeEmbedder(), tmp_path / FILE_NAME)
    first.encode(["hello there"])
    with pytest.raises(BusyError, match="in use by another build"):
        CachedEmbedder(FakeEmbedder(), tmp_path / FILE_NAME)
    first.close(keep=True)  # the first build's file was not touched by the second
    inner = FakeEmbedder()
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)
    cache.encode(["hello there"])
    cache.close(keep=True)
    assert inner.encoded == []


def test_the_file_keeps_the_texts_marked_as_kept(tmp_path: Path) -> None:
    cache = CachedEmbedder(FakeEmbedder(), tmp_path / FILE_NAME)
    cache.encode(["a reused sample", "a deleted message"])
    cache.close(keep=True)
    cache = CachedEmbedder(FakeEmbedder(), tmp_path / FILE_NAME)
    cache.keep(["a reused sample"])  # its sample came from the sample cache: not embedded, still used
    cache.close(keep=True)
    inner = FakeEmbedder()
    cache = CachedEmbedder(inner, tmp_path / FILE_NAME)
    cache.encode(["a reused sample", "a deleted message"])
    cache.close(keep=False)
    assert inner.encoded == ["a deleted message"]


def test_the_real_models_load_only_when_a_text_is_missing_from_the_cache(tmp_path: Path) -> None:
    """A rebuild whose texts are all cached reads no model weights: the default ensemble's two
    networks are loaded at the first text that has to be embedded, and give the same vectors."""
    from knowledge.embed import make_embedder

    texts = ["I live in Prague", "ты ешь мясо?", "see you at 7 then"]
    first = make_embedder("minilm+use")
    assert first.english._loaded is None and first.multilingual._loaded is None  # type: ignore[attr-defined]
    assert first.dim == 384 + 512 and "prague" in first.vocabulary
    cache = CachedEmbedder(first, tmp_path / FILE_NAME)
    want = cache.encode(texts)
    cache.close(keep=True)
    assert first.english._loaded is not None and first.multilingual._loaded is not None  # type: ignore[attr-defined]

    second = make_embedder("minilm+use")
    again = CachedEmbedder(second, tmp_path / FILE_NAME)
    got = again.encode(texts)
    again.close(keep=True)
    assert again.hits == len(texts) and again.embedded == 0
    assert second.english._loaded is None and second.multilingual._loaded is None  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, want)
    fresh = second.encode(texts)  # now it loads, and embeds as the first did
    assert second.english._loaded is not None and second.multilingual._loaded is not None  # type: ignore[attr-defined]
    np.testing.assert_allclose(fresh, want, atol=1e-5)
    third = make_embedder("minilm+use")
    third.load()  # type: ignore[attr-defined]  # what a serving process does before its first message
    assert third.english._loaded is not None and third.multilingual._loaded is not None  # type: ignore[attr-defined]
