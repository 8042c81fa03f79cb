"""From export to training set: generate a Telegram single-chat export (two speakers, the owner
writing about half), then run the real command line on it in a fresh data directory and print the
wall time, the peak RSS and the throughput of each step:

    doppel db upgrade
    doppel ingest chat.json --me Owner            (N messages)
    doppel dataset build
    doppel ingest chat_more.json --me Owner       (1,000 later messages of the same chat)
    doppel dataset build                          (the rebuild)

    python bench/dataset.py [--messages 200000] [--append 1000] [--seed 17] [--no-build] [--keep DIR]
    python bench/dataset.py --messages 1000000    # the big run

After the build, the facts of 2,000 training samples chosen at random are retrieved as a training
run retrieves them for the examples its time budget chose (``--run-samples``; the build itself
retrieves only the fact drills' facts, see trainer/dataset.py).

Each step is a child process of the CLI (``doppel`` next to this Python), with DOPPEL_DATA_DIR set
to the temporary data directory and no other DOPPEL_* variable; bench/data/facts.md is put in the
data directory (--no-facts: none), so the build drills them as it would for a real twin.

Peak RSS: taken from the kernel when the child is reaped (``wait4``), the largest single process
of the step. Linux carries a parent's high-water mark into the child it starts, so this process
keeps itself small (the export is written as it is generated). A step that starts helper
processes (the ingest parses a large file in one) also shows the sum of every process's own peak
(VmHWM), sampled from /proc every 20 ms.

The ingest step's time includes the summary the CLI prints after it (a count of the training
samples). Samples are counted from the JSONL the build writes (<data_dir>/dataset/samples.jsonl,
else the newest .jsonl under the data directory, else a "N samples" figure in what it printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

CHAT_ID = 4_242_424_242
OWNER, OWNER_ID = "Owner", "user1001"
FRIEND, FRIEND_ID = "Anna Novak", "user2002"
START = 1_546_300_800  # 2019-01-01 00:00 UTC

OPENERS = ["hey", "hi!", "morning", "you around?", "hey, what are you up to?", "are you coming tonight?",
           "did you see the match?", "how was the trip?", "can you send me the photos?", "what time is climbing?",
           "want to grab lunch tomorrow?", "have you finished the book?", "how's the cat?", "are you free on sunday?",
           "guess what happened today", "ugh, mondays", "quick question", "so about the weekend"]
REPLIES = ["yeah sure", "ok", "ok!", "lol", "haha", "hahaha yes", "no way", "omg", "sounds good", "sure, 7 works",
           "sorry, can't today", "maybe tomorrow?", "I'll send them tonight", "see you there", "lol same",
           "not yet", "yes!!", "nope", "wait what", "I'm on the train, call you later", "give me 10 min",
           "the train was late again", "I'm vegetarian, remember? no steak for me", "let me check",
           "ahh I forgot", "thanks!", "thank you 🙏", "😂", "❤️", "👍", "good night", "night!", "true",
           "that's what I said", "where are you?", "almost there", "running late, sorry", "ok cool",
           "did you eat?", "not really hungry", "tomorrow then", "deal", "I can't believe it", "so tired today",
           "how did it go?", "it went fine I think", "let's see", "who else is coming?", "just us I think",
           "bring the charger pls", "got it", "on my way", "what do you think?", "fine by me"]
WORDS = ("ok sure lol yeah maybe tomorrow coffee later call me when you can see you soon haha what are you doing "
         "tonight the train was late again work was long I think we should go to the cinema or stay home and cook "
         "pasta did you finish the report my mum says hi the weather is awful it rains all day").split()
LINKS = ["https://example.com/article", "https://maps.example.org/place/42", "https://video.example.net/watch?v=abc"]
EMOJI = ["😂", "👍", "❤️", "🙈", "😅", "🎉"]


def _text(rng: random.Random, opener: bool) -> str:
    r = rng.random()
    if opener:
        return rng.choice(OPENERS)
    if r < 0.6:
        return rng.choice(REPLIES)
    words = rng.choices(WORDS, k=rng.randint(3, 18))
    text = " ".join(words)
    if rng.random() < 0.2:
        text += rng.choice(("?", "!", " " + rng.choice(EMOJI), "..."))
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def messages(n: int, seed: int) -> Iterator[dict]:
    """``n`` messages of one two-person chat, in time order, as Telegram Desktop writes them (one at
    a time: this process stays small, and a child's peak RSS is not blurred by it, see run_step)."""
    rng = random.Random(seed)
    t = START
    owner = rng.random() < 0.5
    left = 0  # messages left in the current conversation
    for i in range(1, n + 1):
        opener = left == 0
        if opener:
            t += int(rng.uniform(1, 20) * 3600)  # a pause of hours between conversations
            left = max(2, int(rng.expovariate(1 / 25)))
            owner = rng.random() < 0.5
        else:
            if rng.random() < 0.65:  # the other one answers; else the same speaker writes again
                owner = not owner
            t += max(2, int(rng.lognormvariate(3.3, 1.2)))  # seconds to minutes
        left -= 1
        ts = t
        m: dict = {"id": i, "type": "message", "date": _iso(ts), "date_unixtime": str(ts),
                   "from": OWNER if owner else FRIEND, "from_id": OWNER_ID if owner else FRIEND_ID}
        r = rng.random()
        if r < 0.01:  # a photo, a sticker
            m.update({"photo": f"photos/photo_{i}@{_iso(ts)}.jpg", "width": 1280, "height": 960,
                      "text": "", "text_entities": []})
        elif r < 0.02:
            emoji = rng.choice(EMOJI)
            m.update({"file": "stickers/sticker.webp", "thumbnail": "stickers/sticker.webp_thumb.jpg",
                      "media_type": "sticker", "sticker_emoji": emoji, "width": 512, "height": 512,
                      "text": "", "text_entities": []})
        elif r < 0.05:  # a link inside the text
            before, link = _text(rng, False) + " ", rng.choice(LINKS)
            m["text"] = [before, {"type": "link", "text": link}]
            m["text_entities"] = [{"type": "plain", "text": before}, {"type": "link", "text": link}]
        else:
            text = _text(rng, opener)
            m["text"] = text
            m["text_entities"] = [{"type": "plain", "text": text}]
        if not opener and i > 1 and rng.random() < 0.05:
            m["reply_to_message_id"] = i - rng.randint(1, min(i - 1, 8))
        if rng.random() < 0.03:
            ets = ts + rng.randint(5, 300)
            m["edited"], m["edited_unixtime"] = _iso(ets), str(ets)
        yield m


def write_export(path: Path, msgs: Iterable[dict]) -> None:
    """A single-chat result.json, indented like Telegram Desktop writes it."""
    head = {"name": FRIEND, "type": "personal_chat", "id": CHAT_ID}
    with path.open("w", encoding="utf-8") as fh:
        fh.write("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n" for k, v in head.items()))
        fh.write(' "messages": [\n')
        for i, m in enumerate(msgs):
            body = json.dumps(m, ensure_ascii=False, indent=1).replace("\n", "\n  ")
            fh.write(("  " if i == 0 else ",\n  ") + body)
        fh.write("\n ]\n}\n")


def generate(path: Path, n: int, seed: int = 17, append: int = 0, more: Path | None = None) -> None:
    """Write ``n`` messages to ``path`` and, if asked, the ``append`` messages after them to ``more``."""
    msgs = messages(n + append, seed)
    write_export(path, itertools.islice(msgs, n))
    if more is not None:
        write_export(more, msgs)  # the rest: the same chat, later


# -- running a step -------------------------------------------------------------------------------

def _doppel() -> list[str]:
    exe = Path(sys.executable).parent / "doppel"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "doppel"]


def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                kids.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return kids


@dataclass
class Step:
    name: str
    seconds: float
    peak_mb: float  # the largest single process
    tree_mb: float  # every process's own peak, summed
    processes: int
    output: str
    count: int | None = None
    unit: str = ""


# what a training run does with its examples before it trains: the facts of the ones its time budget
# chose (about 2,000 on the default budget here), through the composition root as `doppel train` does
RUN_FACTS = """
import random, sys, time
from doppel.context import AppContext
from trainer.examples import read_dataset
from agent.models import load_tokenizer
c = AppContext.load()
path = c.settings.data_dir / "dataset" / "samples.jsonl"
rows = [e for e in read_dataset(path, "train") if e.source == "dataset"]
chosen = random.Random(0).sample(rows, min(int(sys.argv[1]), len(rows)))
give, _ = c.example_facts(load_tokenizer(c.settings.base_model, c.settings.data_dir, light=True))
t = time.perf_counter()
done = give(chosen)
print(f"{len(done)} samples, {sum(a.prompt != b.prompt for a, b in zip(done, chosen))} given facts, "
      f"{time.perf_counter() - t:.2f} s in with_facts")
"""


def run_step(name: str, args: list[str], env: dict[str, str], cwd: Path, verbose: bool) -> Step:
    """Run one CLI command (or, where ``args`` starts with "-c", this Python with that code); its wall
    time and peak RSS (from wait4 and /proc polling)."""
    log = cwd / "step.log"
    peaks: dict[int, int] = {}
    command = [sys.executable, *args] if args[:1] == ["-c"] else _doppel() + args
    with log.open("w+b") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                todo = [proc.pid]
                while todo:
                    pid = todo.pop()
                    hwm = _hwm_kb(pid)
                    if hwm is not None:
                        peaks[pid] = max(peaks.get(pid, 0), hwm)
                    todo.extend(_children(pid))
                done.wait(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    log.unlink()
    if verbose or proc.returncode != 0:
        print(f"--- {' '.join(['doppel', *args])} (exit {proc.returncode})\n{text.rstrip()}\n---", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {name!r} failed with exit code {proc.returncode}")
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    tree = max(peak, sum(peaks.values()) / 1024)
    return Step(name, seconds, peak, tree, max(1, len(peaks)), text)


def samples_written(data_dir: Path, printed: str) -> int | None:
    """Lines of the JSONL the build wrote; else what it said ("Wrote A training and B validation
    samples", or "N samples")."""
    path = data_dir / "dataset" / "samples.jsonl"
    if not path.is_file():
        found = sorted(data_dir.rglob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        path = found[-1] if found else path
    if path.is_file():
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    text = re.sub(r"\s+", " ", printed)
    split = re.search(r"(\d[\d,]*) training and (\d[\d,]*) validation samples", text)
    if split:
        return sum(int(x.replace(",", "")) for x in split.groups())
    total = re.search(r"(\d[\d,]*) samples", text)
    return int(total.group(1).replace(",", "")) if total else None


def table(steps: list[Step]) -> str:
    rows = [("step", "wall s", "peak RSS MB", "all procs MB", "items", "rate")]
    for s in steps:
        rate = f"{s.count / s.seconds:,.0f} {s.unit}/s" if s.count is not None and s.unit else ""
        items = f"{s.count:,} {s.unit}" if s.count is not None and s.unit else ""
        procs = f"{s.tree_mb:.0f} ({s.processes} procs)" if s.processes > 1 else ""
        rows.append((s.name, f"{s.seconds:.2f}", f"{s.peak_mb:.0f}", procs, items, rate))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000, help="messages in the first export (default 200,000)")
    ap.add_argument("--append", type=int, default=1_000, help="later messages in the second export (default 1,000; 0: none)")
    ap.add_argument("--seed", type=int, default=17, help="random seed of the generated chat (default 17)")
    ap.add_argument("--no-build", action="store_true", help="ingest only: skip `doppel dataset build`")
    ap.add_argument("--no-facts", action="store_true", help="do not put bench/data/facts.md in the data directory")
    ap.add_argument("--run-samples", type=int, default=2_000,
                    help="time giving this many training samples their facts, as a training run does (default 2,000; 0: skip)")
    ap.add_argument("--keep", type=Path, help="use and keep this folder (exports, data directory)")
    ap.add_argument("--verbose", action="store_true", help="print what each command printed")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="doppel-bench-dataset-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir()
    facts = Path(__file__).resolve().parent / "data" / "facts.md"
    if not args.no_facts and facts.is_file():
        shutil.copy(facts, data / "facts.md")
    export, more = work / "chat.json", work / "chat_more.json"
    t = time.perf_counter()
    generate(export, args.messages, args.seed, args.append, more if args.append else None)
    print(f"generated a single-chat Telegram export: {args.messages:,} messages, "
          f"{export.stat().st_size / 1e6:.0f} MB (+ {args.append:,} later messages) in {time.perf_counter() - t:.1f} s")

    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPPEL_")}
    env["DOPPEL_DATA_DIR"] = str(data)
    steps: list[Step] = []

    def step(name: str, cli: list[str], count: int | None = None, unit: str = "") -> Step:
        s = run_step(name, cli, env, work, args.verbose)
        s.count, s.unit = count, unit
        steps.append(s)
        print(f"  {name}: {s.seconds:.2f} s", flush=True)
        return s

    step("CLI start (doppel --help)", ["--help"])
    step("db upgrade", ["db", "upgrade"])
    step(f"ingest {args.messages:,}", ["ingest", str(export), "--me", OWNER], args.messages, "msg")
    built = 0
    if not args.no_build:
        s = step("dataset build", ["dataset", "build"], unit="samples")
        s.count = built = samples_written(data, s.output) or 0
        if not args.no_facts and args.run_samples:
            s = step(f"facts for a run's {args.run_samples:,}", ["-c", RUN_FACTS, str(args.run_samples)],
                     args.run_samples, "samples")
            print("  " + s.output.strip().splitlines()[-1] if s.output.strip() else "", flush=True)
    if args.append:
        step(f"ingest +{args.append:,}", ["ingest", str(more), "--me", OWNER], args.append, "msg")
        if not args.no_build:
            s = step("dataset rebuild", ["dataset", "build"], unit="samples")
            s.count = samples_written(data, s.output)
            if s.count is not None:
                print(f"  the rebuild has {s.count - built:+,} samples")
    print()
    print(table(steps))
    print("\npeak RSS: the largest process of the step; all procs: every process's own peak summed "
          "(the ingest parses a large file in a helper process). The ingest's time includes the CLI's summary.")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
