"""Progress of long work for the command line: a bar with an ETA on a terminal, and the same
figures as log lines where there is none (nohup, cron, a service, a pipe)."""

from __future__ import annotations

import math
import time


class ProgressLog:
    """Progress as log lines: one every ``every_s`` seconds and at the end, with what is done of
    the total, the loss where there is one, the time elapsed and the ETA (from the rate since the
    first report, so a slow start such as loading a model does not count)."""

    def __init__(self, label: str = "training", unit: str = "step", every_s: float = 30.0) -> None:
        self.label, self.unit, self.every_s = label, unit, every_s
        self.start = time.monotonic()
        self.last = -math.inf  # the first report is always printed
        self.first: tuple[int, float] | None = None
        self.printed: int | None = None

    def __call__(self, done: int, total: int | None, loss: float | None = None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (done, now)
        if done == self.printed or (now - self.last < self.every_s and (total is None or done < total)):
            return  # a count already printed (the end, reported twice) says nothing new
        self.last, self.printed = now, done
        d0, t0 = self.first
        eta = (now - t0) / (done - d0) * (total - done) if total is not None and done > d0 else None
        head = f"{self.label}: {self.unit} {done:,}/{total:,}" if total is not None else f"{self.label}: {self.unit} {done:,}"
        parts = [head + (f", loss {loss:.3f}" if loss is not None else ""), f"elapsed {mmss(now - self.start)}"]
        if eta is not None:
            parts.append(f"ETA {mmss(eta)}")
        print(", ".join(parts), flush=True)


def mmss(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class CountLog:
    """``ProgressLog`` for work reported in increments (``advance``), its total told once known."""

    def __init__(self, label: str, unit: str, every_s: float = 30.0) -> None:
        self.log = ProgressLog(label, unit, every_s)
        self.done = 0
        self.of: int | None = None

    def total(self, n: int) -> None:
        self.done, self.of = 0, n  # told again (a build that starts over): counted again from 0
        self.log.first = self.log.printed = None  # and the rate for the ETA taken afresh

    def advance(self, n: int) -> None:
        self.done += n
        self.log(self.done, self.of)
