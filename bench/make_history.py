"""Make a realistic-size stand-in chat history: a Telegram Desktop "full account" JSON export built
from real typed chat conversations, with one person as the owner "Alex".

The conversations come from the Chit-Chat Challenge corpus of BYU's Perception, Control & Cognition
lab (7,168 two-person text chats, 258,145 messages, 1,315 participants; MIT licence), which the PyPI
package `chitchat-dataset` ships inside its wheel (`pip install -e .[bench]`). Nothing is downloaded
at run time.

What the script does:
- the owner is one participant (by default the one with 6,638 messages in 137 conversations; 122
  of them were answered, 6,601 messages with 35 different people); they become "Alex" with a
  stable from_id; conversations where nobody answered are left out;
- every other participant the owner talked to becomes a person with a stable made-up name (the
  corpus has anonymous ids, no names) and one personal chat; several conversations with the same
  person are sessions of that chat;
- the timeline is rebuilt: inside a conversation the real gaps between messages are kept (clamped to
  1 s .. 20 min, so seconds to minutes apart); conversations follow each other hours to days apart,
  in waking hours, so that a 3-hour context window and a 5-minute turn gap make sense.

The same arguments and seed give the same file, byte for byte.

    python bench/make_history.py OUT.json [--seed 0] [--owner-id UUID] [--start 2023-01-09]
    python bench/make_history.py --list-speakers 20
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

DEFAULT_OWNER = "a54af4d5-736a-4ef6-8f51-f45b6c5fdab7"  # 6,601 messages in 122 answered conversations
OWNER_USER_ID = 100000001
MIN_GAP_S = 1
MAX_GAP_S = 20 * 60

FIRST_NAMES = (
    "Sam Jordan Taylor Morgan Casey Riley Jamie Avery Quinn Drew Robin Charlie Emma Olivia Noah Liam "
    "Mia Lucas Sofia Ethan Chloe Mason Grace Logan Lily Owen Zoe Caleb Nora Isaac Hannah Eli Ruby Jack "
    "Maya Leo Ava Ben Claire Dylan Ella Gabe Ivy Henry Julia Kai Lena Max Nina Oscar Paige Ryan Sara "
    "Tom Vera Will Anna Josh Kate Luke").split()
LAST_NAMES = (
    "Carter Nguyen Patel Brooks Hughes Reyes Foster Kim Bennett Russo Walsh Larsen Ortiz Price Young "
    "Fischer Moreno Grant Hayes Silva Novak Ward Jensen Perry Cole Lopez Murphy Sato Berg Kelly").split()


def dataset_path(override: str | None = None) -> Path:
    """The corpus file inside the installed `chitchat-dataset` package (or `override`)."""
    if override:
        return Path(override)
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the corpus package is missing: pip install -e '.[bench]' (or pip install chitchat-dataset)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def load_conversations(path: Path) -> list[dict]:
    """Conversations as {"id", "messages": [(datetime, sender, text), ...]} in corpus order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    convs = []
    for cid, conv in data.items():
        msgs = []
        for turn in conv["messages"]:
            for u in turn:
                text = (u.get("text") or "").strip()
                if not text:
                    continue
                ts = datetime.fromisoformat(u["timestamp"].replace("Z", ""))
                msgs.append((ts, u["sender"], text))
        if msgs:
            convs.append({"id": cid, "messages": msgs})
    return convs


def speaker_counts(convs: list[dict]) -> tuple[Counter, Counter]:
    lines: Counter = Counter()
    n_convs: Counter = Counter()
    for c in convs:
        senders = [s for _, s, _ in c["messages"]]
        lines.update(senders)
        n_convs.update(set(senders))
    return lines, n_convs


def stable_int(key: str, lo: int, span: int) -> int:
    return lo + int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % span


def build_export(convs: list[dict], owner: str, owner_name: str, seed: int, start: datetime,
                 tz: timezone) -> tuple[dict, dict]:
    """The export object and a summary of what is in it."""
    rng = random.Random(seed)
    mine = [c for c in convs if any(s == owner for _, s, _ in c["messages"])]
    if not mine:
        sys.exit(f"no conversation has the speaker {owner!r} (see --list-speakers)")
    # a "conversation" where nobody ever answered the owner is no chat: leave it out
    alone = sum(1 for c in mine if all(s == owner for _, s, _ in c["messages"]))
    mine = [c for c in mine if any(s != owner for _, s, _ in c["messages"])]
    mine.sort(key=lambda c: (c["messages"][0][0], c["id"]))

    # partners in order of first conversation; stable made-up names, stable ids
    partners: list[str] = []
    for c in mine:
        for _, s, _ in c["messages"]:
            if s != owner and s not in partners:
                partners.append(s)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    random.Random(f"names-{seed}").shuffle(names)
    used_first: set[str] = set()
    name_of: dict[str, str] = {}
    for p in partners:  # prefer distinct first names, as in a real contact list
        pick = next((n for n in names if n.split()[0] not in used_first), names[0])
        names.remove(pick)
        used_first.add(pick.split()[0])
        name_of[p] = pick
    uid_of = {p: stable_int(p, 200_000_000, 700_000_000) for p in partners}

    chats: dict[str, dict] = {}
    msg_id = 0
    t = start
    owner_lines = other_lines = 0
    for c in mine:
        others = {s for _, s, _ in c["messages"] if s != owner}
        partner = min(others, key=partners.index)
        chat = chats.setdefault(partner, {"name": name_of[partner], "type": "personal_chat",
                                          "id": uid_of[partner], "messages": []})
        prev = None
        for ts, sender, text in c["messages"]:
            if prev is not None:
                gap = (ts - prev).total_seconds()
                gap = min(max(gap, MIN_GAP_S), MAX_GAP_S) if gap > 0 else rng.randint(1, 4)
                t += timedelta(seconds=int(gap))
            prev = ts
            msg_id += 1
            is_owner = sender == owner
            owner_lines += is_owner
            other_lines += not is_owner
            local = t.astimezone(tz)
            chat["messages"].append({
                "id": msg_id, "type": "message",
                "date": local.strftime("%Y-%m-%dT%H:%M:%S"),
                "date_unixtime": str(int(t.timestamp())),
                "from": owner_name if is_owner else name_of[sender],
                "from_id": f"user{OWNER_USER_ID if is_owner else uid_of[sender]}",
                "text": text,
                "text_entities": [{"type": "plain", "text": text}],
            })
        # the next conversation: a few hours later (same day) or one to three days later
        if rng.random() < 0.45:
            t += timedelta(hours=rng.uniform(2.0, 9.0))
        else:
            t += timedelta(days=rng.randint(1, 3), hours=rng.uniform(-3.0, 3.0))
        local = t.astimezone(tz)
        if local.hour < 8 or local.hour >= 23:  # asleep: move to the next morning / evening
            day = local.date() + (timedelta(days=1) if local.hour >= 23 else timedelta(0))
            wake = datetime(day.year, day.month, day.day, 8, tzinfo=tz)
            t = (wake + timedelta(minutes=rng.randint(0, 12 * 60))).astimezone(timezone.utc)
        t += timedelta(seconds=rng.randint(0, 59))

    chat_list = sorted(chats.values(), key=lambda ch: ch["messages"][-1]["id"], reverse=True)
    export = {
        "about": "Here is the data you requested. (Stand-in history made by bench/make_history.py "
                 "from the Chit-Chat Challenge corpus, BYU PCC lab, MIT licence.)",
        "personal_information": {"user_id": OWNER_USER_ID, "first_name": owner_name, "last_name": "",
                                 "phone_number": "+42 0000 0000", "username": "", "bio": ""},
        "chats": {"about": "This page lists all chats from this export.", "list": chat_list},
    }
    first = min(int(m["date_unixtime"]) for ch in chat_list for m in ch["messages"])
    last = max(int(m["date_unixtime"]) for ch in chat_list for m in ch["messages"])
    summary = {"owner": owner, "owner_name": owner_name, "conversations": len(mine),
               "unanswered_conversations_left_out": alone, "chats": len(chat_list),
               "messages": owner_lines + other_lines, "owner_messages": owner_lines,
               "other_messages": other_lines,
               "first": datetime.fromtimestamp(first, tz).isoformat(),
               "last": datetime.fromtimestamp(last, tz).isoformat()}
    return export, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("out", nargs="?", help="where to write the export (JSON)")
    ap.add_argument("--seed", type=int, default=0, help="timeline and names (default 0)")
    ap.add_argument("--owner-id", default=DEFAULT_OWNER, help="corpus speaker id who becomes the owner")
    ap.add_argument("--owner-name", default="Alex", help="the owner's display name (default Alex)")
    ap.add_argument("--start", default="2023-01-09T18:30",
                    help="local date/time of the first message (default 2023-01-09T18:30)")
    ap.add_argument("--utc-offset-hours", type=float, default=1.0,
                    help="the exporter's time zone, for the local `date` fields (default +1)")
    ap.add_argument("--dataset", help="corpus file to read instead of the installed package's")
    ap.add_argument("--list-speakers", type=int, metavar="N",
                    help="print the N speakers with the most messages and exit")
    args = ap.parse_args(argv)

    convs = load_conversations(dataset_path(args.dataset))
    if args.list_speakers:
        lines, n_convs = speaker_counts(convs)
        print(f"{'speaker':38} {'messages':>8} {'conversations':>13}")
        for s, n in lines.most_common(args.list_speakers):
            print(f"{s:38} {n:8d} {n_convs[s]:13d}")
        return 0
    if not args.out:
        ap.error("give the output path (or --list-speakers N)")
    tz = timezone(timedelta(hours=args.utc_offset_hours))
    start = datetime.fromisoformat(args.start).replace(tzinfo=tz).astimezone(timezone.utc)
    export, summary = build_export(convs, args.owner_id, args.owner_name, args.seed, start, tz)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        json.dump(export, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    summary["bytes"] = out.stat().st_size
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
