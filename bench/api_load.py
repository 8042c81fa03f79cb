"""The HTTP API under load: many chats at once through the real WSGI server, on loopback only.

The app is the API ``doppel serve`` mounts (``agent.api.create_app``), served by waitress with the
same 4 threads, on 127.0.0.1 and a free port, over a real database (SQLite in a temporary
directory, or a fresh schema on PostgreSQL with --postgres). The model is a fake that answers in a
few milliseconds, one request at a time as the real runtime does, and echoes the tag of the newest
message in its prompt ("chat=load-7 n=12"), so a reply that reached the wrong chat, or was written
from another chat's prompt, shows. The real tokenizer builds every prompt.

--chats clients talk at once, each its own conversation: send a message, wait for the reply, rate
every --rate-every-th reply, until --messages in all. A hard --timeout stops them. Then it checks:
every reply names its own chat and message; no 5xx; the messages, replies and ratings rows are
exactly what was sent; /metrics counts what the tables hold. It prints the throughput and the
p50/p95/p99 latency of the replies, and exits 1 if any check fails.

    python bench/api_load.py [--chats 50] [--messages 1000] [--model-ms 2] [--timeout 300] [--postgres]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runtime import Generation, GenerationConfig  # noqa: E402

TOKEN = "load-" + uuid.uuid4().hex
TAG = re.compile(r"chat=(load-\d+) n=(\d+)")
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class EchoRuntime:
    """The model runtime's interface: one generation at a time (a lock, as the real runtime holds
    its model), ``model_ms`` each, answering with the tag of the newest message in the prompt."""

    def __init__(self, tokenizer: Any, model_ms: float) -> None:
        self.tokenizer = tokenizer
        self.adapter_version: str | None = "bench"
        self.max_length = 2048
        self.seconds = model_ms / 1000
        self._lock = threading.Lock()
        self._waiting = 0
        self.generations = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def generate(self, prompt: str, config: GenerationConfig, other_speakers: Any = (), own_name: str = "") -> Generation:
        self._waiting += 1
        with self._lock:
            self._waiting -= 1
            tags = TAG.findall(prompt)
            time.sleep(self.seconds)
            self.generations += 1
        text = f"echo chat={tags[-1][0]} n={tags[-1][1]}" if tags else "echo nothing"
        return Generation(text, text, 10, 4, 1.0, self.seconds * 1000, self.adapter_version)


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)  # seconds, one per message answered
    statuses: Counter[int] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)  # replies that are not for their chat and message
    rated: Counter[int] = field(default_factory=Counter)  # rating value -> replies rated so
    replies: dict[int, str] = field(default_factory=dict)  # reply id -> chat
    timed_out: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def talk(port: int, chat: str, n_messages: int, rate_every: int, deadline: float, out: Results) -> None:
    """One client: a conversation in ``chat``, one message at a time, over one kept-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        for n in range(n_messages):
            if time.monotonic() > deadline:
                out.timed_out = True
                return
            body = json.dumps({"text": f"hey, are you around? chat={chat} n={n}", "sender": f"friend of {chat}"})
            t0 = time.perf_counter()
            conn.request("POST", f"/api/chats/{chat}/messages", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - t0
            with out.lock:
                out.statuses[response.status] += 1
            if response.status != 201:
                with out.lock:
                    out.wrong.append(f"{chat} n={n}: HTTP {response.status} {data[:200]!r}")
                continue
            reply = json.loads(data)
            expected = f"echo chat={chat} n={n}"
            with out.lock:
                out.latencies.append(elapsed)
                out.replies[reply["reply_id"]] = chat
                if reply["chat_id"] != chat or reply["text"] != expected:
                    out.wrong.append(f"{chat} n={n}: got chat {reply['chat_id']!r}, text {reply['text']!r}")
            if rate_every and n % rate_every == rate_every - 1:
                value = 1 if (n // rate_every) % 2 == 0 else -1
                rating = json.dumps({"value": value, "rater": f"friend of {chat}"})
                conn.request("POST", f"/api/replies/{reply['reply_id']}/rating", body=rating, headers=headers)
                rated = conn.getresponse()
                rated.read()
                with out.lock:
                    out.statuses[rated.status] += 1
                    if rated.status == 200:
                        out.rated[value] += 1
                    else:
                        out.wrong.append(f"{chat} n={n}: rating answered HTTP {rated.status}")
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=50, help="conversations at once (one client each)")
    parser.add_argument("--messages", type=int, default=1000, help="messages in all, spread evenly over the chats")
    parser.add_argument("--model-ms", type=float, default=2.0, help="how long the fake model takes per reply")
    parser.add_argument("--rate-every", type=int, default=4, help="rate every N-th reply of each chat (0: none)")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit on the whole run, in seconds")
    parser.add_argument("--threads", type=int, default=4, help="waitress worker threads (doppel serve: 4)")
    parser.add_argument("--postgres", nargs="?", const=PG_URL, default=None, metavar="URL",
                        help=f"use PostgreSQL (a fresh schema, dropped after) instead of SQLite; default {PG_URL}")
    args = parser.parse_args()
    if args.messages % args.chats:
        parser.error("--messages must be a multiple of --chats (each chat gets the same number)")
    with tempfile.TemporaryDirectory(prefix="doppel-load-") as tmp:
        ok = run(args, Path(tmp))
    sys.exit(0 if ok else 1)


def run(args: argparse.Namespace, tmp: Path) -> bool:
    from sqlalchemy import func, select, text
    from waitress.server import create_server

    from agent.api import ApiConfig, create_app
    from agent.models import load_tokenizer
    from agent.service import Agent, AgentConfig
    from doppel.migrate import upgrade
    from feedback.db import make_engine, make_session_factory
    from feedback.models import Chat, Message, Rating, Reply

    schema = None
    if args.postgres:
        admin = make_engine(args.postgres)
        schema = f"load_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{args.postgres}{'&' if '?' in args.postgres else '?'}options=-csearch_path%3D{schema}"
    else:
        url = f"sqlite:///{tmp / 'load.db'}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        t0 = time.perf_counter()
        tokenizer = load_tokenizer("", tmp)
        print(f"database: {engine.url.render_as_string(hide_password=True)}; tokenizer loaded in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        runtime = EchoRuntime(tokenizer, args.model_ms)
        agent = Agent(runtime, None, make_session_factory(engine), AgentConfig())  # type: ignore[arg-type]
        app = create_app(agent, None, ApiConfig(TOKEN))
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is 41": expected here
        server = create_server(app, host="127.0.0.1", port=0, threads=args.threads)  # loopback only
        port = server.effective_port  # type: ignore[union-attr]
        serving = threading.Thread(target=server.run, name="waitress", daemon=True)
        serving.start()
        try:
            ok = drive(args, port, engine, agent, runtime, (Chat, Message, Reply, Rating), func, select)
        finally:
            server.close()
            serving.join(10)
    finally:
        engine.dispose()
        if schema is not None:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    return ok


def drive(args: argparse.Namespace, port: int, engine: Any, agent: Any, runtime: EchoRuntime,
          models: tuple[Any, ...], func: Any, select: Any) -> bool:
    Chat, Message, Reply, Rating = models
    per_chat = args.messages // args.chats
    out = Results()
    chats = [f"load-{i}" for i in range(args.chats)]
    print(f"{args.chats} chats x {per_chat} messages through waitress ({args.threads} threads) on "
          f"127.0.0.1:{port}; the fake model takes {args.model_ms:g} ms a reply", flush=True)
    started = time.perf_counter()
    deadline = time.monotonic() + args.timeout
    with ThreadPoolExecutor(max_workers=args.chats, thread_name_prefix="client") as pool:
        futures = [pool.submit(talk, port, chat, per_chat, args.rate_every, deadline, out) for chat in chats]
        errors = [f.exception(timeout=args.timeout + 60) for f in futures]
    wall = time.perf_counter() - started
    client_errors = [repr(e) for e in errors if e is not None]

    # what the server says, and what the tables hold
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    metrics_text = conn.getresponse().read().decode()
    conn.close()
    with engine.connect() as db:
        chat_rows = {r.id: r.external_id for r in db.execute(select(Chat.id, Chat.external_id).where(Chat.platform == "http"))}
        live = Counter(db.execute(select(Message.chat_id).where(Message.source == "live")).scalars())
        twin = Counter(db.execute(select(Message.chat_id).where(Message.source == "twin")).scalars())
        replies = db.execute(select(Reply.id, Reply.chat_id, Reply.text, Reply.prompt)).all()
        ratings = Counter(db.execute(select(Rating.value)).scalars())
        n_replies = db.execute(select(func.count()).select_from(Reply)).scalar_one()

    answered = len(out.latencies)
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, ok, detail))

    check("every message answered before the time limit", answered == args.messages and not out.timed_out,
          f"{answered} of {args.messages}")
    check("no client error", not client_errors, "; ".join(client_errors[:3]))
    check("no 5xx", not any(code >= 500 for code in out.statuses), str(dict(out.statuses)))
    check("every reply names its own chat and message", not out.wrong, "; ".join(out.wrong[:3]))
    foreign = [r.id for r in replies
               if {c for c, _ in TAG.findall(r.prompt)} != {chat_rows.get(r.chat_id)}
               or not r.text.startswith(f"echo chat={chat_rows.get(r.chat_id)} ")]
    check("every stored prompt and reply holds only its own chat", not foreign and len(replies) == answered,
          f"{len(foreign)} foreign of {len(replies)}")
    check("reply ids are the replies' own", all(chat_rows.get(cid) == out.replies.get(rid) for rid, cid, *_ in replies))
    per_chat_ok = all(live.get(cid) == per_chat and twin.get(cid) == per_chat for cid in chat_rows) \
        and sorted(chat_rows.values()) == sorted(chats)
    check("messages rows: each chat holds its messages and the twin's replies", per_chat_ok,
          f"{sum(live.values())} incoming, {sum(twin.values())} from the twin in {len(chat_rows)} chats")
    check("ratings rows are the ratings sent", ratings == +out.rated, f"{dict(ratings)} against {dict(out.rated)}")
    m_replies = metric(metrics_text, "doppel_replies_total")
    m_count = metric(metrics_text, "doppel_reply_latency_seconds_count")
    m_up = metric(metrics_text, 'doppel_ratings_total{value="up"}')
    m_down = metric(metrics_text, 'doppel_ratings_total{value="down"}')
    check("/metrics replies = reply rows = latency count", m_replies == n_replies == m_count,
          f"{m_replies:g}, {n_replies}, {m_count:g}")
    check("/metrics ratings = rating rows", (m_up, m_down) == (ratings.get(1, 0), ratings.get(-1, 0)),
          f"up {m_up:g} down {m_down:g}")
    check("/metrics errors = 0 and nobody waiting", metric(metrics_text, "doppel_errors_total") == 0
          and metric(metrics_text, "doppel_queue_waiting") == 0)
    check("the model ran once per reply", runtime.generations == n_replies, f"{runtime.generations}")

    requests = sum(out.statuses.values())
    lat = [x * 1000 for x in out.latencies] or [float("nan")]
    print(f"\n{answered:,} replies and {sum(out.rated.values())} ratings ({requests:,} requests) in {wall:.1f} s: "
          f"{answered / wall:,.0f} replies/s, {requests / wall:,.0f} requests/s")
    print(f"reply latency: p50 {percentile(lat, 50):.0f} ms, p95 {percentile(lat, 95):.0f} ms, "
          f"p99 {percentile(lat, 99):.0f} ms, max {max(lat):.0f} ms, mean {statistics.fmean(lat):.0f} ms")
    print(f"the fake model's share: {runtime.generations * args.model_ms / 1000:.1f} s of {wall:.1f} s "
          f"(one reply at a time)\n")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f" ({detail})" if detail else ""))
    return all(ok for _, ok, _ in checks)


if __name__ == "__main__":
    main()
