"""Fuzz every export parser with hostile files for a while, and print what it tried and found.

Each format gets an equal share of the time. Its inputs (tests/fuzzing.py): the real corpus files of
that format (tests/corpus) mutated structure-aware and byte by byte, and exports generated from
scratch, read with and without --format, in zones at the ends of the offsets, with the streaming
JSON reader's chunk cut small (its result must equal a whole-buffer read). Every input's rows are
checked against the columns they go into; every --db-every-th input is ingested into a SQLite
database that already holds a good export (through ``ingest_paths``; now and then in the parser
process), and a refused one must leave every table exactly as it was.

Any exception other than a clear ``InputError`` is a crash: hypothesis shrinks it to a minimal
input, which is written to --crashes and printed.

    python bench/fuzz.py [--minutes 10] [--formats telegram,discord,...] [--seed 1] [--db-every 10]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
import traceback
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import FlakyFailure  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.errors import InputError  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    FILE_NAMES,
    FORMATS,
    ZONES,
    chunk_chars,
    dump_database,
    hostile_file,
    ingest_check,
    parse_file,
    seeds,
)

CORPUS = ROOT / "tests" / "corpus"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROUND = 100  # examples per hypothesis run; the time is checked between examples
CHUNKS = (1 << 20, 1 << 20, 7, 64)  # the reader's chunk: the default, or small enough to cut every value


@dataclass
class Tally:
    inputs: int = 0
    refused: int = 0
    accepted: int = 0
    ingested: int = 0
    in_parser_process: int = 0
    seconds: float = 0.0
    crashes: dict[tuple[str, str], str] = field(default_factory=dict)  # (exception, place) -> minimal input
    crashing_inputs: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Database:
    """A database holding one good export: SQLite in the work folder, put back from its copy every so
    often (so that what accepted files add does not make every dump slower), or a fresh schema on
    PostgreSQL, made again as often (and dropped at the end)."""

    def __init__(self, folder: Path, postgres: str | None = None) -> None:
        self.folder = folder
        self.postgres = postgres
        self.schema: str | None = None
        self.engine: Any = None
        self.accepted = 0
        if postgres is None:
            self.template = folder / "template.db"
            self._fill(f"sqlite:///{self.template}").dispose()  # closed: all of it in the file, none in a WAL
        self.reset()

    def _fill(self, url: str) -> Any:
        from doppel.migrate import upgrade
        from feedback.db import make_engine
        from trainer.ingest.service import IngestOptions, ingest_paths

        engine = make_engine(url)
        upgrade(engine)
        good = CORPUS / "telegram" / "mlomb-chat-analytics__MultiChat_2C_6M__full_account.json"
        ingest_paths(engine, [good], IngestOptions(me="Alice"))
        return engine

    def reset(self) -> None:
        from feedback.db import make_engine

        self.close()
        if self.postgres is None:
            shutil.copy(self.template, self.folder / "fuzz.db")
            self.engine = make_engine(f"sqlite:///{self.folder / 'fuzz.db'}")
        else:
            self.schema = f"fuzz_{uuid.uuid4().hex[:10]}"
            with self._admin() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {self.schema}")
            sep = "&" if "?" in self.postgres else "?"
            self.engine = self._fill(f"{self.postgres}{sep}options=-csearch_path%3D{self.schema}")
        self.dump = dump_database(self.engine)
        self.accepted = 0

    def _admin(self) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.postgres).begin()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        if self.schema is not None:
            with self._admin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {self.schema} CASCADE")
            self.schema = None

    def check(self, path: Path, fmt: str | None, me: str, tz: Any, parser_process: bool) -> str:
        outcome = ingest_check(self.engine, path, fmt, me, tz, parser_process=parser_process, before=self.dump)
        if outcome == "accepted":
            self.accepted += 1
            if self.accepted >= 50:
                self.reset()
            else:
                self.dump = dump_database(self.engine)
        return outcome


def fuzz_format(fmt: str, budget_s: float, work: Path, db: Database, db_every: int, base_seed: int | None,
                crashes_dir: Path) -> Tally:
    tally = Tally()
    format_seeds = seeds(CORPUS)[fmt]
    path = work / FILE_NAMES[fmt]
    last: list[Any] = [None]
    started = time.monotonic()
    deadline = started + budget_s
    strategy = st.tuples(hostile_file(fmt, format_seeds), st.sampled_from(ZONES), st.sampled_from([None, fmt]),
                         st.sampled_from(CHUNKS))

    def one(args: Any) -> None:
        (data, me), tz, forced, chunk = args
        last[0] = (data, me, tz, forced, chunk)
        tally.inputs += 1
        try:
            check(data, me, tz, forced, chunk)
        except Exception as exc:
            tally.crashing_inputs += 1
            if signature(exc) in tally.crashes:
                return  # known already: let hypothesis look for another one
            raise  # a new one: hypothesis shrinks it

    def check(data: bytes, me: str, tz: Any, forced: str | None, chunk: int) -> None:
        path.write_bytes(data)
        roll = zlib.crc32(data)  # which inputs also go to the database: by content, so a replay agrees
        pg_rows = roll % 2 == 1
        with chunk_chars(chunk):
            result = parse_file(path, forced, me, tz, sqlite=not pg_rows)
        if chunk != CHUNKS[0]:  # a small chunk must not change what is read
            whole = parse_file(path, forced, me, tz, sqlite=not pg_rows)
            if isinstance(result, InputError) != isinstance(whole, InputError) or (
                    not isinstance(result, InputError) and result != whole):
                raise AssertionError(f"reading {chunk} characters at a time gives another result: "
                                     f"{_short(result)} against {_short(whole)}")
        if isinstance(result, InputError):
            tally.refused += 1
            tally.errors[_kind(result)] += 1
        else:
            tally.accepted += 1
        if roll % db_every == 0:
            in_child = (roll // db_every) % 10 == 0  # one database check in ten goes through the parser process
            db.check(path, forced, me, tz, parser_process=in_child)
            tally.ingested += 1
            tally.in_parser_process += in_child

    runs = 0
    examples = 20
    while time.monotonic() < deadline:
        test = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                        phases=[Phase.generate, Phase.shrink])(given(strategy)(one))
        if base_seed is not None:
            test = seed(base_seed * 100_003 + runs)(test)
        runs += 1
        t0, n0 = time.monotonic(), tally.inputs
        try:
            test()
        except Exception as exc:  # a new crash; the minimal input is the last one tried
            if isinstance(exc, FlakyFailure) and exc.exceptions:
                exc = exc.exceptions[0]
            data, me, tz, forced, chunk = last[0]
            digest = hashlib.sha1(data).hexdigest()[:10]
            out = crashes_dir / f"{fmt}-{digest}.bin"
            crashes_dir.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            sig = signature(exc)
            tally.crashes[sig] = (f"{sig[0]} at {sig[1]}: {str(exc)[:300]} (--format {forced}, zone {tz}, "
                                  f"chunk {chunk}, me {me!r}; input {out}, {len(data)} bytes: {data[:200]!r})")
            print(f"  CRASH {tally.crashes[sig]}", flush=True)
            db.reset()
        # the next run takes about 5 s (or what is left): hypothesis cannot stop in the middle of one
        rate = (tally.inputs - n0) / max(time.monotonic() - t0, 1e-3)
        examples = max(5, min(1000, int(rate * min(5.0, deadline - time.monotonic()))))
    tally.seconds = time.monotonic() - started
    return tally


def signature(exc: BaseException) -> tuple[str, str]:
    """A crash's identity: its exception class and the deepest place in Doppel's code it passed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(ROOT))]
    frames = [f for f in frames if "/bench/" not in f.filename] or frames
    where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else "?"
    return type(exc).__name__, where


def _kind(exc: InputError) -> str:
    """The sort of refusal, for the summary: the message without its particulars."""
    import re

    text = re.sub(r"\d+", "N", exc.message)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)", "…", text)
    return re.sub(r"^\S+\.(json|txt)\b", "FILE", text)[:90]


def _short(result: Any) -> str:
    return repr(result)[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="total time, split evenly across the formats")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: " + ", ".join(FORMATS))
    parser.add_argument("--seed", type=int, default=None, help="make the run repeatable")
    parser.add_argument("--db-every", type=int, default=10, help="ingest every N-th input into the database")
    parser.add_argument("--crashes", type=Path, default=ROOT / "bench" / "fuzz-crashes",
                        help="where minimal crashing inputs are written")
    parser.add_argument("--postgres", nargs="?", const=PG_URL, default=None, metavar="URL",
                        help=f"ingest into PostgreSQL (a fresh schema, dropped after) instead of SQLite; default {PG_URL}")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        parser.error(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    budget = args.minutes * 60 / len(formats)
    print(f"Fuzzing {', '.join(formats)} for {args.minutes:g} min ({budget:.0f} s each); "
          f"every {args.db_every}th input is ingested into {'PostgreSQL' if args.postgres else 'SQLite'}.", flush=True)
    totals: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix="doppel-fuzz-") as tmp:
        work = Path(tmp)
        db = Database(work, args.postgres)
        for fmt in formats:
            (work / fmt).mkdir()
            totals[fmt] = t = fuzz_format(fmt, budget, work / fmt, db, args.db_every, args.seed, args.crashes)
            print(f"{fmt:12s} {t.inputs:7,d} inputs in {t.seconds:5.0f} s ({t.inputs / max(t.seconds, 1e-9):5.0f}/s): "
                  f"{t.accepted:,} accepted, {t.refused:,} refused with an InputError, {t.ingested:,} ingested "
                  f"({t.in_parser_process} in the parser process), {len(t.crashes)} crashes "
                  f"({t.crashing_inputs} crashing inputs)", flush=True)
            for kind, n in t.errors.most_common(6):
                print(f"{'':14s}{n:6,d}  {kind}")
        db.close()
    inputs = sum(t.inputs for t in totals.values())
    seconds = sum(t.seconds for t in totals.values())
    crashes = [c for t in totals.values() for c in t.crashes.values()]
    print(f"\nTotal: {inputs:,} inputs in {seconds / 60:.1f} min, "
          f"{sum(t.ingested for t in totals.values()):,} of them ingested; {len(crashes)} crashes.")
    for c in crashes:
        print(f"  {c}")
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
