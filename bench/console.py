"""Response times of the owner's console at 10,000 messages and 1,000 ratings.

Seeds a temporary SQLite database (the schema by the migrations): 10,000 messages in 24 chats on
Telegram, Discord, HTTP, the terminal and the playground (4,000 exchanges with the twin, whose
replies are stored with their prompts, plus two ingested chats), 1,000 ratings and 100 corrections
on those replies, 30 training runs with 200-step loss curves and 10 adapters; the facts are
bench/data/facts.md. Then it signs in and asks each page ``--requests`` times through Flask's test
client, warm (after a few requests), and prints p50/p95 per page with the number of SQL statements
each request ran (one per list, never one per row).

    python bench/console.py [--requests 20] [--fake-embedder] [--threads N]

The "who would ask what" box embeds the message, so its time is the embedding model's: ~10 ms on
an idle machine, but torch on two threads waits ~400 ms per query when another process keeps one
core busy (measured here during a training run); ``--threads 1`` shows the figure on one thread.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import event, insert  # noqa: E402

from doppel.migrate import upgrade  # noqa: E402
from feedback.db import make_engine, make_session_factory  # noqa: E402
from feedback.models import Adapter, Chat, Correction, Message, Rating, Reply, TrainingRun, utcnow  # noqa: E402

MESSAGES = 10_000
RATINGS = 1_000
WORDS = ("sure", "maybe", "tomorrow", "the", "cat", "pizza", "later", "ok", "train", "weekend", "hiking", "prague",
         "work", "coffee", "at", "seven", "sounds", "good", "no", "idea", "lol", "see", "you", "there")


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, n)))


def seed(sessions: Any, data_dir: Path, fact_ids: list[str]) -> dict[str, int]:
    """Bulk rows (no ORM per row), shaped as the agent writes them."""
    rng = random.Random(7)
    now = utcnow()
    start = now - timedelta(days=60)
    chats = [("telegram", f"tg-{i}") for i in range(8)] + [("discord", f"dc-{i}") for i in range(6)] + \
            [("http", f"http-{i}") for i in range(4)] + [("cli", "terminal"), ("console", "playground")] + \
            [("telegram", "ingested-family"), ("whatsapp", "ingested-friends")]
    msg_rows: list[dict[str, Any]] = []
    reply_rows: list[dict[str, Any]] = []
    chat_ids: dict[str, int] = {}
    with sessions.begin() as s:
        for n, (platform, ext) in enumerate(chats, 1):
            s.execute(insert(Chat), [{"id": n, "platform": platform, "external_id": ext, "title": ext.replace("-", " "),
                                      "kind": "group" if "family" in ext else "private", "created_at": start}])
            chat_ids[ext] = n
    live = [c for c in chats if not c[1].startswith("ingested")]
    exchanges = 4_000  # 8,000 messages: each an incoming message and the twin's reply
    ingested = MESSAGES - 2 * exchanges
    mid = rid = 0
    t = start
    for i in range(exchanges):
        platform, ext = live[i % len(live)] if i % 3 else live[0]  # one busy chat, the rest spread
        t += timedelta(seconds=rng.randint(60, 1200))
        mid += 1
        msg_rows.append({"id": mid, "chat_id": chat_ids[ext], "dedup_key": f"live:{mid}", "sender_id": "bob",
                         "sender_name": "Bob", "is_owner": False, "text": sentence(rng), "kind": "text",
                         "is_forwarded": False, "sent_at": t, "source": "live"})
        rid += 1
        text = sentence(rng, 12)
        reply_rows.append({"id": rid, "chat_id": chat_ids[ext], "in_reply_to_id": mid, "text": text,
                           "prompt": "<|im_start|>system\n" + " ".join(sentence(rng, 12) for _ in range(20)),
                           "fact_ids": rng.sample(fact_ids, 2), "adapter_version": f"v{1 + i * 5 // exchanges}",
                           "latency_ms": rng.uniform(500, 1500), "created_at": t + timedelta(seconds=1)})
        mid += 1
        msg_rows.append({"id": mid, "chat_id": chat_ids[ext], "dedup_key": f"live:{mid}", "sender_id": "doppel",
                         "sender_name": "Alex", "is_owner": True, "text": text, "kind": "text", "is_forwarded": False,
                         "sent_at": t + timedelta(seconds=1), "source": "twin"})
    for i in range(ingested):
        ext = "ingested-family" if i % 2 else "ingested-friends"
        mid += 1
        msg_rows.append({"id": mid, "chat_id": chat_ids[ext], "dedup_key": f"ingest:{mid}", "sender_id": "u1",
                         "sender_name": rng.choice(["Alex", "Jana", "Petr"]), "is_owner": False, "text": sentence(rng),
                         "kind": "text", "is_forwarded": False, "sent_at": start + timedelta(minutes=i), "source": "ingest"})
    rated = rng.sample(range(1, rid + 1), RATINGS)
    rating_rows = [{"id": n, "reply_id": r, "rater_id": f"telegram:{rng.randint(1, 40)}",
                    "value": rng.choice([1, 1, 1, -1, -1, 0]), "created_at": now - timedelta(days=rng.uniform(0, 50)),
                    "updated_at": now - timedelta(days=rng.uniform(0, 50))} for n, r in enumerate(rated, 1)]
    correction_rows = [{"id": n, "reply_id": r, "author_id": "telegram:1", "text": sentence(rng, 12),
                        "created_at": now - timedelta(days=rng.uniform(0, 50))}
                       for n, r in enumerate(rng.sample(rated, 100), 1)]
    adapters = data_dir / "adapters"
    adapter_rows = []
    for v in range(1, 11):
        (adapters / f"v{v}").mkdir(parents=True)
        (adapters / f"v{v}" / "adapter_config.json").write_text("{}")
        adapter_rows.append({"id": v, "version": v, "path": str(adapters / f"v{v}"),
                             "status": "active" if v == 9 else "rejected" if v == 10 else "retired",
                             "reason": "held-out loss 2.31 -> 2.27; fact use 75% -> 81%", "metrics": {
                                 "candidate": {"heldout_loss": 2.3 - v * 0.01}}, "created_at": now - timedelta(days=40 - v)})
    (adapters / "ACTIVE").write_text("v9\n")
    run_rows = []
    for n in range(1, 31):
        loss, curve = 3.2, []
        for step in range(1, 201):
            loss = max(0.8, loss * 0.995 + rng.uniform(-0.04, 0.04))
            curve.append([step, round(loss, 4)])
        run_rows.append({"id": n, "kind": "retrain" if n > 1 else "train", "status": rng.choice(["succeeded", "rejected"]),
                         "started_at": now - timedelta(days=31 - n), "finished_at": now - timedelta(days=31 - n, minutes=-4),
                         "config": {"rank": 16}, "rating_ids": [], "adapter_id": n if n <= 10 else None,
                         "metrics": {"loss_curve": curve, "steps": 200, "current": {"heldout_loss": 2.31},
                                     "candidate": {"heldout_loss": 2.27, "fact_use": {"share": 0.8}}}})
    with sessions.begin() as s:
        s.execute(insert(Message), msg_rows)
        s.execute(insert(Reply), reply_rows)
        s.execute(insert(Rating), rating_rows)
        s.execute(insert(Correction), correction_rows)
        s.execute(insert(Adapter), adapter_rows)
        s.execute(insert(TrainingRun), run_rows)
    return {"messages": len(msg_rows), "replies": len(reply_rows), "ratings": len(rating_rows),
            "corrections": len(correction_rows), "runs": len(run_rows), "busy_chat": chat_ids["tg-0"],
            "busy_reply": reply_rows[-1]["id"], "ingested_chat": chat_ids["ingested-family"]}


def _threads() -> str:
    import torch

    n = torch.get_num_threads()
    return f" on {n} torch thread{'s' if n != 1 else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20, help="timed requests per page")
    ap.add_argument("--fake-embedder", action="store_true", help="a bag-of-words embedder instead of all-MiniLM-L6-v2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from knowledge.facts import read_facts_file
    from knowledge.index import KnowledgeBase
    from tests.helpers import FakeEmbedder, console_app

    tmp = Path(tempfile.mkdtemp(prefix="doppel-console-bench-"))
    try:
        engine = make_engine(f"sqlite:///{tmp / 'doppel.db'}")
        upgrade(engine)
        sessions = make_session_factory(engine)
        facts = tmp / "facts.md"
        shutil.copy(ROOT / "bench" / "data" / "facts.md", facts)
        if args.fake_embedder:
            embedder: Any = FakeEmbedder()
        else:
            from knowledge.embed import SentenceEmbedder

            embedder = SentenceEmbedder()
        kb = KnowledgeBase(facts, tmp / "index" / "facts.npz", embedder)
        kb.refresh()
        t0 = time.perf_counter()
        shape = seed(sessions, tmp / "data", [f.id for f in read_facts_file(facts).facts])
        print(f"seeded {shape['messages']:,} messages, {shape['replies']:,} replies, {shape['ratings']:,} ratings, "
              f"{shape['corrections']} corrections, {shape['runs']} runs in {time.perf_counter() - t0:.1f} s "
              f"(SQLite, {(tmp / 'doppel.db').stat().st_size / 1e6:.1f} MB); embedder {embedder.name}"
              + ("" if args.fake_embedder else _threads()))
        app, deps = console_app(None, sessions, kb, tmp / "data", min_ratings=20)
        client = app.test_client()
        client.get("/login")
        with client.session_transaction() as s:
            token = s["csrf"]
        assert client.post("/login", data={"password": "s3cret", "csrf_token": token}).status_code == 302

        from doppel.web import freeze_heap

        freeze_heap()  # as `doppel serve` does once it has loaded everything
        statements = [0]
        event.listen(engine, "before_cursor_execute", lambda *a, **k: statements.__setitem__(0, statements[0] + 1))
        busy, reply = shape["busy_chat"], shape["busy_reply"]
        from sqlalchemy import select

        with sessions() as s:
            middle = s.scalars(select(Message.id).where(Message.chat_id == busy).order_by(Message.id)
                               .offset(1000).limit(1)).one()
        pages = [("status", "/"), ("facts", "/facts"), ("facts + who would ask what", "/facts?ask=shall+we+grab+a+beer"),
                 ("conversations", "/chats"), ("conversations, discord only", "/chats?platform=discord"),
                 (f"conversation ({busy}: 2,000+ messages), newest", f"/chats/{busy}"),
                 ("conversation, older page", f"/chats/{busy}?before={middle}"),
                 ("ingested conversation", f"/chats/{shape['ingested_chat']}"),
                 ("reply record", f"/replies/{reply}"),
                 ("feedback", "/feedback"), ("feedback 👎 since last run, telegram", "/feedback?value=down&since=last&platform=telegram"),
                 ("feedback, adapter v3, page 3", "/feedback?adapter=v3&page=3"),
                 ("feedback corrections", "/feedback?tab=corrections"),
                 ("learning", "/learning"), ("run", "/learning/runs/30"), ("retrain progress (JSON)", "/learning/progress"),
                 ("playground", "/playground")]
        print(f"\n{'page':46} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'SQL':>4} {'KB':>6}")
        worst = 0.0
        for name, url in pages:
            for _ in range(3):
                r = client.get(url)
                assert r.status_code == 200, (url, r.status_code, r.get_data(as_text=True)[:300])
            times = []
            statements[0] = 0
            for _ in range(args.requests):
                t = time.perf_counter()
                r = client.get(url)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            p50 = statistics.median(times)
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            worst = max(worst, p95)
            print(f"{name:46} {p50:8.1f} {p95:8.1f} {times[-1]:8.1f} {statements[0] // args.requests:4d} "
                  f"{len(r.get_data()) / 1024:6.0f}")
        print(f"\nslowest p95: {worst:.1f} ms (target: every page <= 200 ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
