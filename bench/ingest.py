"""Ingest speed: generate an N-message Telegram full-account export, ingest it into a fresh SQLite
database in a child process, and print messages/s end to end, the peak RSS and CPU time of the
ingesting process and of the parser process it starts for a large file.

    python bench/ingest.py [--messages 1000000] [--chats 20] [--keep DIR]
    python bench/ingest.py --single-chat [--messages 200000]   # one two-person chat, indented like
                                                               # Telegram Desktop writes it (bench/dataset.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("ok sure lol yeah maybe tomorrow coffee later call me when you can see you soon "
         "haha what are you doing tonight the train was late again I'm vegetarian remember").split()


def generate(path: Path, n: int, chats: int) -> None:
    rng = random.Random(7)
    per_chat = n // chats
    t0 = 1_600_000_000
    with path.open("w", encoding="utf-8") as fh:
        fh.write('{"about": "bench", "personal_information": {"user_id": 1, "first_name": "Owner"},\n'
                 ' "chats": {"about": "", "list": [\n')
        for c in range(chats):
            fh.write(f'{"," if c else ""}{{"name": "Friend {c}", "type": "personal_chat", "id": {1000 + c}, "messages": [\n')
            t = t0
            for i in range(per_chat):
                t += rng.randint(5, 600)
                owner = rng.random() < 0.5
                text = " ".join(rng.choices(WORDS, k=rng.randint(2, 14)))
                if rng.random() < 0.1:
                    text = [text, {"type": "link", "text": "https://example.com"}]
                msg = {"id": i + 1, "type": "message", "date": "2020-09-13T12:26:40", "date_unixtime": str(t),
                       "from": "Owner" if owner else f"Friend {c}", "from_id": "user1" if owner else f"user{1000 + c}",
                       "text": text, "text_entities": []}
                fh.write(("," if i else "") + json.dumps(msg, ensure_ascii=False) + "\n")
            fh.write("]}\n")
        fh.write("]}}\n")


def generate_single(path: Path, n: int) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dataset", Path(__file__).resolve().parent / "dataset.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.generate(path, n)


def child(export: str, db: str) -> None:
    from datetime import timezone

    from doppel.migrate import upgrade
    from feedback.db import make_engine
    from trainer.ingest.service import IngestOptions, ingest_unit

    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    t, cpu = time.perf_counter(), time.process_time()
    report = ingest_unit(engine, [Path(export)], IngestOptions(me="Owner", local_tz=timezone.utc))
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the parser process, if any
    print(json.dumps({"messages": report.parsed, "new": report.new, "seconds": dt, "rss_mb": rss,
                      "parser_rss_mb": kids.ru_maxrss / 1024, "cpu_s": cpu, "parser_cpu_s": kids.ru_utime + kids.ru_stime}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--chats", type=int, default=20)
    ap.add_argument("--single-chat", action="store_true",
                    help="one two-person chat (bench/dataset.py's export) instead of --chats chats")
    ap.add_argument("--keep", type=Path, help="keep the export and database in this folder")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="doppel-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    export, db = work / "result.json", work / "bench.db"
    if db.exists():
        db.unlink()
    t = time.perf_counter()
    if args.single_chat:
        generate_single(export, args.messages)
    else:
        generate(export, args.messages, args.chats)
    shape = "in one chat" if args.single_chat else f"in {args.chats} chats"
    print(f"generated {args.messages:,} messages {shape} ({export.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s")
    out = subprocess.run([sys.executable, __file__, "--child", str(export), str(db)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"ingested {r['messages']:,} messages ({r['new']:,} new) in {r['seconds']:.1f}s: "
          f"{r['messages'] / r['seconds']:,.0f} messages/s end to end into SQLite; peak RSS {r['rss_mb']:.0f} MB "
          f"(the parser process: {r['parser_rss_mb']:.0f} MB)")
    if r["parser_cpu_s"]:
        print(f"CPU time: ingesting process {r['cpu_s']:.2f} s, parser process {r['parser_cpu_s']:.2f} s (on an idle "
              "2-core machine the wall time is near the larger; while other work shares the cores, near their sum)")
    else:
        print(f"CPU time: {r['cpu_s']:.2f} s (parsed in process: the file is below parallel_min_bytes)")
    print(f"database size {db.stat().st_size / 1e6:.0f} MB")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
