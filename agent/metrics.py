"""Process metrics in the Prometheus text format (no client library needed for three series)."""

from __future__ import annotations

import bisect
import threading

BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replies = 0
        self.latency_sum = 0.0
        self.latency_counts = [0] * (len(BUCKETS) + 1)
        self.ratings = {1: 0, -1: 0, 0: 0}
        self.errors = 0

    def observe_reply(self, seconds: float) -> None:
        with self._lock:
            self.replies += 1
            self.latency_sum += seconds
            self.latency_counts[bisect.bisect_left(BUCKETS, seconds)] += 1

    def observe_rating(self, value: int) -> None:
        with self._lock:
            self.ratings[value] = self.ratings.get(value, 0) + 1

    def observe_error(self) -> None:
        with self._lock:
            self.errors += 1

    def render(self, extra: dict[str, float] | None = None) -> str:
        with self._lock:
            lines = ["# HELP doppel_reply_latency_seconds Time from a message to its reply.",
                     "# TYPE doppel_reply_latency_seconds histogram"]
            cumulative = 0
            for bound, n in zip(BUCKETS, self.latency_counts):
                cumulative += n
                lines.append(f'doppel_reply_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += self.latency_counts[-1]
            lines += [f'doppel_reply_latency_seconds_bucket{{le="+Inf"}} {cumulative}',
                      f"doppel_reply_latency_seconds_sum {self.latency_sum:.6f}",
                      f"doppel_reply_latency_seconds_count {cumulative}",
                      "# HELP doppel_replies_total Replies sent.", "# TYPE doppel_replies_total counter",
                      f"doppel_replies_total {self.replies}",
                      "# HELP doppel_ratings_total Ratings recorded or changed, by value.",
                      "# TYPE doppel_ratings_total counter"]
            for value, label in ((1, "up"), (-1, "down"), (0, "withdrawn")):
                lines.append(f'doppel_ratings_total{{value="{label}"}} {self.ratings.get(value, 0)}')
            lines += ["# HELP doppel_errors_total Requests that failed.", "# TYPE doppel_errors_total counter",
                      f"doppel_errors_total {self.errors}"]
            for name, value in (extra or {}).items():
                lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
