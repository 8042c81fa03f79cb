"""Forgetting a person in the training set on disk: the samples that quote them leave the built
JSONL files and their sample caches (``feedback.privacy.forget_everywhere`` calls this through the
``FileScrubber`` the composition root hands it).

A sample is theirs when it comes from a chat they wrote in and either they are its speaker (a
``train_speakers`` sample) or its prompt carries one of their turns. Such samples are dropped, not
redacted: a prompt with a hole in it would teach the model a conversation that never happened.
An adapter trained on them is not changed here; only training again leaves them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.privacy import FileScrubber, Trace

# the facts-query vectors an older `dataset build` cached beside the training set (by text hash):
# derived from people's messages, so a forget deletes it whole where one is left
EMBEDDINGS = "embeddings.sqlite"


@dataclass
class PreparedDataset:
    """Scrubbed copies written beside the originals; ``commit`` puts them in place."""

    counts: dict[str, int] = field(default_factory=lambda: {"samples": 0, "cached_samples": 0})
    moves: list[tuple[Path, Path]] = field(default_factory=list)  # (copy, original)
    drops: list[Path] = field(default_factory=list)  # caches deleted whole (the texts' vectors)

    def commit(self) -> None:
        for path in self.drops:  # first: a crash half-way leaves no derived copy of what is forgotten
            path.unlink(missing_ok=True)
        self.drops.clear()
        for tmp, target in self.moves:
            os.replace(tmp, target)
        self.moves.clear()

    def abort(self) -> None:
        for tmp, _ in self.moves:
            tmp.unlink(missing_ok=True)
        self.moves.clear()


def _theirs(record: dict[str, Any], trace: Trace) -> bool:
    chat_id = record.get("chat_id")
    if not isinstance(chat_id, int) or chat_id not in trace.quoted:
        return False
    # the query a run retrieves the sample's facts for may hold turns its prompt dropped for room
    query = record.get("query") if isinstance(record.get("query"), list) else []
    said = [str(record.get("prompt", ""))] + [str(q) for q in query[:1]] + [str(t) for t in (query[1:2] or [[]])[0]]
    return (trace.speaks(chat_id, str(record.get("speaker", "")))
            or any(trace.quotes(chat_id, text) for text in said))


def _scrub_jsonl(path: Path, trace: Trace, prepared: PreparedDataset) -> None:
    tmp = path.with_name(path.name + ".forget.tmp")
    removed = 0
    splits = {"train": 0, "validation": 0}
    h = hashlib.sha256()
    with path.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
        for line in src:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:  # not ours to judge: keep it as it is
                record = {}
            if _theirs(record, trace):
                removed += 1
                continue
            splits[str(record.get("split", "train"))] = splits.get(str(record.get("split", "train")), 0) + 1
            h.update(text.encode())
            dst.write(text + "\n")
    if not removed:
        tmp.unlink()
        return
    prepared.counts["samples"] += removed
    prepared.moves.append((tmp, path))
    meta = path.with_suffix(".meta.json")
    if meta.is_file():
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        h.update(json.dumps(data.get("config", {}), sort_keys=True, default=list).encode())
        data.update(fingerprint=h.hexdigest()[:16], train=splits.get("train", 0),
                    validation=splits.get("validation", 0),
                    forgotten_samples=int(data.get("forgotten_samples", 0)) + removed)
        meta_tmp = meta.with_name(meta.name + ".forget.tmp")
        meta_tmp.write_text(json.dumps(data, indent=2, default=list), encoding="utf-8")
        prepared.moves.append((meta_tmp, meta))


def _scrub_cache(path: Path, trace: Trace, prepared: PreparedDataset) -> None:
    tmp = path.with_name(path.name + ".forget.tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(path)  # read-write: a rollback journal a killed build left is played back first
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
        doomed = []
        for key, line in dst.execute("SELECT key, line FROM samples"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _theirs(record, trace):
                doomed.append((key,))
        if doomed:
            dst.executemany("DELETE FROM samples WHERE key = ?", doomed)
            dst.commit()
            dst.execute("VACUUM")  # the deleted lines must not linger in free pages
    finally:
        src.close()
        dst.close()
    if not doomed:
        tmp.unlink()
        return
    prepared.counts["cached_samples"] += len(doomed)
    prepared.moves.append((tmp, path))


def dataset_scrubber(dataset_dir: Path) -> FileScrubber:
    """What scrubs the training sets built under ``dataset_dir`` (``doppel dataset build`` writes
    ``samples.jsonl``, its ``.meta.json``, its ``.cache.sqlite``, its ``.state.npz`` and the texts' vector
    cache there)."""

    def prepare(trace: Trace) -> PreparedDataset:
        prepared = PreparedDataset()
        if not trace.quoted or not dataset_dir.is_dir():
            return prepared
        try:
            for path in sorted(dataset_dir.glob("*.jsonl")):
                _scrub_jsonl(path, trace, prepared)
            for path in sorted(dataset_dir.glob("*.cache.sqlite")):
                _scrub_cache(path, trace, prepared)
            # vectors of their texts, keyed by hashes: not worth sorting out, the next build embeds again
            # (and a crashed build's rollback journal, which holds old pages of the file: left behind, it would
            # be played back into the next cache of that name)
            # what lets the next build continue this one holds the last turns of each chat: gone, the next
            # build reads every chat again (through the sample cache, scrubbed above)
            prepared.drops += sorted(dataset_dir.glob("*.state.npz")) + sorted(dataset_dir.glob("*.state.npz.tmp.npz"))
            # the sample cache's journal (read back above; left beside the scrubbed copy, it would be played into it)
            prepared.drops += sorted(dataset_dir.glob("*.cache.sqlite-journal"))
            prepared.drops += [p for p in (dataset_dir / EMBEDDINGS, dataset_dir / (EMBEDDINGS + ".tmp"),
                                           dataset_dir / (EMBEDDINGS + "-journal")) if p.exists()]
        except BaseException:
            prepared.abort()
            raise
        return prepared

    return prepare
