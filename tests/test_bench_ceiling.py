"""bench/voice_ceiling.py's held-out conversations and partner weights: the figures README reports
rest on them (no held-out turn, nor a neighbour carrying it in its prompt, may be trained on)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from trainer.examples import read_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import voice_ceiling  # noqa: E402


def _samples(path: Path) -> None:
    """Three chats, each with conversations a day apart, four turns a conversation a minute apart;
    each prompt carries the conversation's two replies before its own (its window)."""
    rows, start = [], datetime(2024, 1, 1, 9, tzinfo=timezone.utc)
    for chat in (1, 2, 3):
        for day in range(10):
            earlier: list[str] = []
            for k in range(4):
                at = start + timedelta(days=day, hours=chat, minutes=k)
                reply = f"reply c{chat} d{day} t{k}"
                window = earlier[-2:]
                prompt, targets = "<|im_start|>user\nBo: hi<|im_end|>\n", []
                for r in window:  # each earlier reply learned as its own sample's completion is
                    prompt += "<|im_start|>assistant\n"
                    targets.append([len(prompt), len(prompt) + len(r + "<|im_end|>\n")])
                    prompt += f"{r}<|im_end|>\n<|im_start|>user\nBo: and?<|im_end|>\n"
                turns = [["Bo", "hi", False, False]] + [t for r in window for t in (["Alex", r, True, True], ["Bo", "and?", False, False])]
                rows.append({"at": at.isoformat(), "chat_id": chat, "prompt": prompt + "<|im_start|>assistant\n",
                             "completion": reply + "<|im_end|>\n", "split": "train", "owner": True, "reply": reply,
                             "turns": turns, "targets": targets})
                earlier.append(reply)
    rows.append({"at": (start + timedelta(days=30)).isoformat(), "chat_id": 1, "prompt": "p", "completion": "c",
                 "split": "validation", "owner": True})
    rows.sort(key=lambda r: r["at"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_held_out_conversations_are_whole_and_never_trained_on(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    _samples(path)
    train = [e for e in read_dataset(path, "train") if e.source == "dataset"]
    held, rest = voice_ceiling.hold_out_conversations(path, train, 10)
    assert len(held) == 10
    assert len(rest) == len(train) - voice_ceiling.SESSIONS * 4  # whole conversations of four turns left out
    held_conversations = {e.completion.split(" t")[0] for e in held}
    assert len(held_conversations) >= 8  # spread over the conversations, not the first few
    for e in rest:  # no held-out reply is a sample, nor inside a training prompt
        assert e.completion.split(" t")[0] not in held_conversations
        assert not any(h.completion.split("<|im_end|>")[0] in e.prompt for h in held)


class _Offsets:
    """A tokenizer of one token per character, with offsets."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict[str, Any]:
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_partner_weights_weigh_the_other_people_and_keep_the_owners_labels() -> None:
    prompt = "<|im_start|>user\nBo: hi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    own = prompt.index("yo")
    labels = [ord(c) if own <= i < own + 2 else -100 for i, c in enumerate(prompt)] + [1, 2, 3]
    w = voice_ceiling.partner_weights(_Offsets(), prompt, labels, 0.25)
    assert len(w) == len(labels)
    at = prompt.index("Bo: hi")
    assert w[at: at + 6] == [0.25] * 6  # the other person's turn
    assert w[own: own + 2] == [1.0, 1.0] and w[-3:] == [1.0] * 3  # the owner's earlier reply and the reply
    assert w[:at] == [0.0] * at  # the template's markers


def test_the_covering_samples_hold_every_reply_once(tmp_path: Path) -> None:
    """lora-cover (``history_samples`` covering): the newest sample of a conversation holds its two replies before it; the first
    reply, out of its window, needs its own sample: two samples a conversation, every reply held."""
    path = tmp_path / "samples.jsonl"
    _samples(path)
    train = [e for e in read_dataset(path, "train") if e.source == "dataset"]
    keep = {i for i, e in enumerate(train) if not e.redundant}
    chosen = [train[i] for i in sorted(keep)]
    assert len(chosen) == 2 * 3 * 10
    held = [e.completion.split("<|im_end|>")[0] for e in train]
    for reply in held:
        assert sum(e.completion.startswith(reply + "<") or f"\n{reply}<" in e.prompt for e in chosen) == 1, reply
    _, rest = voice_ceiling.hold_out_conversations(path, train, 10, keep)
    assert len(rest) == 2 * (3 * 10 - voice_ceiling.SESSIONS)
