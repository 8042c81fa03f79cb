"""The authorship probe: separates writers who differ in a known way, and finds nothing in noise."""

from __future__ import annotations

import math
import random

import pytest

from trainer.voice import STYLE_NAMES, AuthorshipProbe, length_stats, roc_auc, set_separation, style_vector

WORDS = ("coffee train later maybe tomorrow weekend movie call work home dinner music game friend "
         "city weather idea plan book song walk park shop office night morning week party").split()


def terse(rng: random.Random) -> str:
    """lowercase, no punctuation, short: "ok maybe tomorrow lol"."""
    words = rng.choices(WORDS + ["ok", "ya", "lol", "im", "dont"], k=rng.randint(2, 5))
    return " ".join(words)


def formal(rng: random.Random) -> str:
    """Capitalised, punctuated, long: "Well, I think the train is late again, so we will see."."""
    words = rng.choices(WORDS + ["the", "and", "I", "we", "it's", "that", "really", "would"], k=rng.randint(10, 20))
    words[0] = words[0].capitalize()
    words.insert(rng.randint(3, 8), words.pop(rng.randint(3, 8)) + ",")
    return " ".join(words) + rng.choice([".", "!", "?", "."])


@pytest.fixture(scope="module")
def writers() -> tuple[list[str], list[str]]:
    rng = random.Random(1)
    return [terse(rng) for _ in range(200)], [formal(rng) for _ in range(200)]


@pytest.mark.parametrize("features", [("char",), ("word",), ("style",), ("char", "word", "style")])
def test_probe_separates_writers_who_differ(writers, features) -> None:
    owner, other = writers
    probe = AuthorshipProbe(features)
    report = probe.fit(owner, other, seed=0)
    assert (report.n_test_owner, report.n_test_other) == (40, 40)
    assert (report.n_train_owner, report.n_train_other) == (160, 160)
    assert report.balanced_accuracy > 0.95 and report.accuracy > 0.95
    assert report.auc > 0.97
    assert report.set_accuracy > 0.99
    rng = random.Random(99)
    new_owner, new_other = [terse(rng) for _ in range(20)], [formal(rng) for _ in range(20)]
    assert probe.mean_score(new_owner) > 0.7
    assert probe.mean_score(new_other) < 0.3
    scores = probe.score(["ok lol see you tomorrow",
                          "Well, I would really like to see that movie with the others tonight."])
    assert scores[0] > 0.5 > scores[1]
    assert all(0.0 <= s <= 1.0 for s in probe.score(new_owner + new_other))


def test_probe_on_shuffled_labels_is_at_chance() -> None:
    rng = random.Random(2)
    texts = [terse(rng) for _ in range(400)] + [formal(rng) for _ in range(400)]
    rng.shuffle(texts)  # the two "writers" are now the same mix of both
    report = AuthorshipProbe(max_iter=100).fit(texts[:400], texts[400:], seed=0, holdout=0.5)
    assert report.n_test_owner == report.n_test_other == 200
    assert abs(report.balanced_accuracy - 0.5) < 0.1
    assert abs(report.auc - 0.5) < 0.1


def test_fit_is_deterministic_and_groups_stay_together(writers) -> None:
    owner, other = writers
    a = AuthorshipProbe(("style",)).fit(owner, other, seed=3)
    b = AuthorshipProbe(("style",)).fit(owner, other, seed=3)
    assert (a.accuracy, a.auc, a.set_accuracy) == (b.accuracy, b.auc, b.set_accuracy)
    groups = [i // 20 for i in range(200)]  # ten conversations of 20 lines each
    r = AuthorshipProbe(("style",)).fit(owner, other, seed=0, owner_groups=groups, other_groups=groups)
    assert r.n_test_owner % 20 == 0 and r.n_test_other % 20 == 0
    assert 20 <= r.n_test_owner <= 60 and r.n_train_owner + r.n_test_owner == 200
    # one conversation each (a small history): the texts are split, never a class left untrained
    one = AuthorshipProbe(("style",)).fit(owner, other, seed=0, owner_groups=[0] * 200, other_groups=[1] * 200)
    assert one.n_train_owner == 160 and one.n_test_owner == 40
    # three big conversations: at most two go to the hold-out
    few = AuthorshipProbe(("style",)).fit(owner, other, seed=0, owner_groups=[i // 100 for i in range(200)] + [],
                                          holdout=0.9, other_groups=[i % 3 for i in range(200)])
    assert few.n_train_owner > 0 and few.n_train_other > 0


def test_probe_usage_errors(writers) -> None:
    with pytest.raises(RuntimeError):
        AuthorshipProbe().score(["hi"])
    with pytest.raises(ValueError):
        AuthorshipProbe(("char", "emoji-magic"))
    with pytest.raises(ValueError):
        AuthorshipProbe().fit([], ["Hello there."])
    probe = AuthorshipProbe(("style",))
    report = probe.fit(*writers, holdout=0)
    assert report.n_test_owner == 0 and math.isnan(report.auc)
    assert probe.score([]) == [] and math.isnan(probe.mean_score([]))
    top = probe.top_features(3)
    assert len(top["owner"]) == 3 and all(name.startswith("style:") for name, _ in top["owner"] + top["other"])


def test_style_vector_reads_the_habits() -> None:
    v = dict(zip(STYLE_NAMES, style_vector("im sure lol, i dont know...")))
    assert v["starts_lower"] == 1 and v["no_upper"] == 1 and v["lower_i"] == 1 and v["bare_contraction"] == 1
    assert v["lol"] == 1 and v["haha"] == 0 and v["ends_ellipsis"] == 1 and v["apostrophe"] == 0
    w = dict(zip(STYLE_NAMES, style_vector("I don't know, haha! 😂")))
    assert w["starts_upper"] == 1 and w["upper_i"] == 1 and w["contraction"] == 1 and w["bare_contraction"] == 0
    assert w["haha"] == 1 and w["emoji"] == 1 and w["apostrophe"] == 1
    assert len(style_vector("")) == len(STYLE_NAMES)


def test_length_stats_and_auc() -> None:
    s = length_stats(["a" * n for n in (10, 20, 30, 40, 50)])
    assert s == {"n": 5, "mean": 30.0, "median": 30.0, "p25": 20.0, "p75": 40.0}
    assert length_stats([])["n"] == 0
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5
    assert set_separation([1.0] * 30, [0.0] * 30, k=20) == 1.0
    assert math.isnan(set_separation([1.0] * 5, [0.0] * 30, k=20))
