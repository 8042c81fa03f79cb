"""Screenshots of every console page for the README (docs/console/*.png).

Serves the console on 127.0.0.1 over a temporary database seeded with a small believable history
(a scripted model stands in for the real one, so no weights load), signs in with headless Chromium
(Debian's chromium + chromium-driver, through Selenium) and saves each page, full length.
Emoji need a colour emoji font (Debian: fonts-noto-color-emoji).

    python scripts/screenshots.py [--out docs/console] [--width 1280]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FACTS = """# Facts about Alex

<!-- Headings are topics; each bullet is one fact. The twin puts the best-matching few into each prompt. -->

## Home
- I live in Prague, in the Vinohrady district.
- I share a flat with my partner Jana.
- My flat is on the fifth floor and the building has no lift.

## Work
- I work as a backend developer at a logistics startup.
- I mostly write Python and some Go.

## Food
- I am vegetarian: no meat, no steak, no burgers.
- I am allergic to peanuts.

## Pets
- My cat is called Knedlík; she is four.

## Weekends
- I go bouldering on Sundays when it is not raining.
"""

# (platform, chat, title, sender, rater, [(message, the twin's reply), ...])
CHATS = [
    ("telegram", "5551", "Jana", "Jana", "telegram:5551", [
        ("are you coming to dinner at my parents on friday?", "yes! what should I bring"),
        ("maybe wine? and they're making goulash, is that ok", "I'll eat the dumplings 😅 still vegetarian"),
        ("right, sorry. I'll tell mum", "thanks ❤"),
    ]),
    ("discord", "9001", "climbing crew", "Petr", "discord:7788", [
        ("who's in for bouldering on sunday?", "me, if it's not raining"),
        ("forecast says sunny", "then count me in, 10 at the usual place?"),
    ]),
    ("http", "site-widget", "website chat", "visitor", "http", [
        ("hi! what do you do for work?", "backend dev at a logistics startup, mostly python"),
        ("cool, do you like it?", "most days yes"),
    ]),
    ("cli", "terminal", "terminal", "friend", "cli:alex", [
        ("how's the cat?", "knedlík is great, sleeping on my keyboard as usual"),
        ("do you have a lift in your building?", "sadly no, fifth floor and no lift 🙃"),
    ]),
]
RATINGS = {  # (chat, exchange) -> ratings
    ("5551", 0): [1], ("5551", 1): [-1], ("5551", 2): [1], ("9001", 0): [1], ("9001", 1): [1],
    ("site-widget", 0): [1], ("site-widget", 1): [-1], ("terminal", 0): [1], ("terminal", 1): [1],
}


def curve(rng: Any, steps: int, start: float, end: float) -> list[list[float]]:
    out = []
    for i in range(1, steps + 1):
        base = end + (start - end) * (0.965 ** i)
        out.append([i, round(base + rng.uniform(-0.12, 0.12), 4)])
    return out


def seed(deps: Any, sessions: Any, data_dir: Path) -> None:
    import random

    from feedback.models import Adapter, Message, Reply, TrainingRun, utcnow

    rng = random.Random(3)
    agent, runtime = deps.agent, deps.agent.runtime
    for platform, chat, title, sender, rater, exchanges in CHATS:
        for n, (message, answer) in enumerate(exchanges):
            runtime.replies.append(answer)
            runtime.adapter_version = "v3" if n else "v2"
            reply = agent.reply(chat, sender, message, platform=platform, chat_title=title)
            for value in RATINGS.get((chat, n), []):
                agent.rate(reply.id, rater, value)
            if (chat, n) == ("5551", 1):
                agent.correct(reply.id, rater, "ooh I'll stick to the dumplings, still vegetarian")
    runtime.replies.append("she's called Knedlík, four years old and very spoiled")
    runtime.adapter_version = "v3"
    played = agent.reply("playground", "Sam", "what's your cat called?", platform="console")
    agent.rate(played.id, "console:owner", 1)
    runtime.replies.append("nah, I'm vegetarian. pizza?")
    agent.reply("playground", "Sam", "fancy a steak tonight?", platform="console")
    now = utcnow()
    adapters = []
    for v, status, reason in ((1, "retired", "held-out loss 2.4110 -> 2.1875; fact use 50% -> 69%"),
                              (2, "rejected", "held-out loss rose from 2.1875 to 2.3020 (more than the 2% tolerance)"),
                              (3, "active", "held-out loss 2.1875 -> 2.1702; fact use 69% -> 75%; rating margin 0.0210 -> 0.0654")):
        src = data_dir / f"staging-v{v}"
        src.mkdir(parents=True)
        (src / "adapter_config.json").write_text("{}")
        row = deps.registry.register(src, status="retired" if status == "active" else status, reason=reason,
                                     metrics={"candidate": {"heldout_loss": {1: 2.1875, 2: 2.302, 3: 2.1702}[v]}},
                                     fingerprint=None, config={})
        adapters.append(row.id)
    deps.registry.activate(3)
    runs = [("train", "succeeded", 0, 120, 3.1, 2.05, {"heldout_loss": 2.411, "fact_use": {"share": 0.5}},
             {"heldout_loss": 2.1875, "fact_use": {"share": 0.69}}, None),
            ("retrain", "rejected", 1, 60, 2.6, 2.3, {"heldout_loss": 2.1875, "fact_use": {"share": 0.69}},
             {"heldout_loss": 2.302, "fact_use": {"share": 0.62}}, None),
            ("retrain", "failed", None, 0, 0, 0, None, None, "There are no ratings or corrections to learn from yet. "
                                                             "Rate some replies (👍/👎) first."),
            ("retrain", "succeeded", 2, 60, 2.5, 2.0, {"heldout_loss": 2.1875, "fact_use": {"share": 0.69}, "rating_margin": 0.021},
             {"heldout_loss": 2.1702, "fact_use": {"share": 0.75}, "rating_margin": 0.0654}, None)]
    import math

    for run in runs:  # perplexity is exp(held-out loss)
        for figures in (run[6], run[7]):
            if figures:
                figures["perplexity"] = round(math.exp(figures["heldout_loss"]), 3)
    with sessions.begin() as s:
        for i, (kind, status, adapter, steps, a, b, current, candidate, error) in enumerate(runs):
            started = now - timedelta(days=len(runs) - i, hours=-3)
            metrics = {} if error else {"loss_curve": curve(rng, steps, a, b), "steps": steps, "examples": steps * 8,
                                        "current": current, "candidate": candidate, "tokens_per_s": 151.2,
                                        "seconds": steps * 3.1, "ratings_used": 0 if kind == "train" else 9}
            s.add(TrainingRun(kind=kind, status=status, started_at=started, finished_at=started + timedelta(minutes=6),
                              metrics=metrics, error=error, config={"rank": 16, "learning_rate": 0.001},
                              adapter_id=adapters[adapter] if adapter is not None else None))
            if adapter is not None:
                s.get(Adapter, adapters[adapter]).created_at = started + timedelta(minutes=6)
        # spread the conversations over the last day and a half, as they came, with real-looking latencies
        messages = s.query(Message).order_by(Message.id).all()
        at = {}
        for i, m in enumerate(messages):
            m.sent_at = (at[messages[i - 1].id] + timedelta(seconds=2) if m.source == "twin"
                         else now - timedelta(minutes=(len(messages) - i) * 47))
            at[m.id] = m.sent_at
        for r in s.query(Reply):
            r.created_at = at[r.in_reply_to_id] + timedelta(seconds=1)
            r.latency_ms = rng.uniform(640, 1150)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args()

    from selenium.webdriver.common.by import By

    from agent.models import load_tokenizer
    from doppel.migrate import upgrade
    from feedback.db import make_engine, make_session_factory
    from knowledge.index import KnowledgeBase
    from tests.helpers import FakeEmbedder, Served, console_app, start_browser

    tmp = Path(tempfile.mkdtemp(prefix="doppel-screens-"))
    driver = served = None
    try:
        engine = make_engine(f"sqlite:///{tmp / 'doppel.db'}")
        upgrade(engine)
        sessions = make_session_factory(engine)
        (tmp / "facts.md").write_text(FACTS, encoding="utf-8")
        try:  # the packaged embedding model, for scores as the twin computes them
            from knowledge.embed import SentenceEmbedder

            embedder: Any = SentenceEmbedder()
        except Exception as exc:
            print(f"the embedding model is not available ({exc}); scores come from a bag-of-words stand-in")
            embedder = FakeEmbedder()
        kb = KnowledgeBase(tmp / "facts.md", tmp / "index.npz", embedder)
        app, deps = console_app(load_tokenizer("", tmp / "models"), sessions, kb, tmp / "data", password="demo")
        seed(deps, sessions, tmp / "data")
        served = Served(app)
        driver = start_browser(args.width, 900)
        args.out.mkdir(parents=True, exist_ok=True)

        def shot(name: str, path: str, before: Any = None) -> None:
            import base64

            driver.get(served.url + path)
            if before:
                before()
            time.sleep(0.3)
            height = min(driver.execute_script("return document.documentElement.scrollHeight"), 2600)
            png = driver.execute_cdp_cmd("Page.captureScreenshot", {  # the whole page, not the window
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": args.width, "height": height, "scale": 1}})
            (args.out / f"{name}.png").write_bytes(base64.b64decode(png["data"]))
            print(f"{args.out / name}.png")

        shot("sign-in", "/login")
        field = driver.find_element(By.NAME, "password")
        field.send_keys("demo")
        field.submit()
        time.sleep(0.3)
        shot("status", "/")
        shot("facts", "/facts?ask=fancy+a+steak+tonight%3F")
        from sqlalchemy import select

        from feedback.models import Chat

        with sessions() as s:
            jana = s.scalar(select(Chat.id).where(Chat.external_id == "5551"))
        shot("conversations", "/chats")
        shot("conversation", f"/chats/{jana}", lambda: driver.execute_script(
            "document.querySelectorAll('details.correct')[1].open = true"))
        shot("feedback", "/feedback")
        shot("learning", "/learning")
        shot("run", "/learning/runs/1")
        shot("playground", "/playground")
    finally:
        if driver is not None:
            driver.quit()
        if served is not None:
            served.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
