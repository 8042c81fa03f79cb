""""Retrain now" from the console: one training run in a background thread, its progress kept in a
small shared object the page polls. The run itself is handed in by the composition root (it knows
the model, the dataset and the training settings); this module only starts, watches and reports."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import BusyError, DoppelError, InputError

log = logging.getLogger(__name__)

KINDS = {"retrain": "learn from the ratings (the nightly run)", "train": "train a fresh adapter on the whole training set"}

StepFn = Callable[[int, int, "float | None"], None]
PhaseFn = Callable[[str], None]
# (kind, on_step, on_phase) -> a trainer.pipeline.RunResult (status, message, run_id)
RunFn = Callable[[str, StepFn, PhaseFn], Any]


@dataclass
class RetrainState:
    state: str = "idle"  # idle | running | succeeded | rejected | failed | skipped
    kind: str = ""
    phase: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    message: str = ""
    run_id: int | None = None
    started: float | None = None  # unix time
    finished: float | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["running"] = self.running
        d["elapsed_s"] = round((self.finished or time.time()) - self.started, 1) if self.started else None
        return d


class Retrainer:
    """Starts at most one run at a time, and none while another process holds the training lock."""

    def __init__(self, run: RunFn, lock_path: Path | None = None) -> None:
        self._run = run
        self.lock_path = lock_path
        self._lock = threading.Lock()
        self._state = RetrainState()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> RetrainState:
        with self._lock:
            return RetrainState(**asdict(self._state))

    def start(self, kind: str) -> None:
        """Start a run of ``kind`` ("retrain" or "train") in the background.

        Raises:
            BusyError: a run is going (started here, by the nightly job or by `doppel train`).
        """
        if kind not in KINDS:
            raise InputError(f"Unknown kind of run {kind!r}.", hint=f"Choose one of: {', '.join(KINDS)}.")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise BusyError("A run started from the console is still going.",
                                hint="Watch its progress on this page; it shows under Runs when it ends.")
            if self.lock_path is not None:
                from trainer.pipeline import single_flight

                try:
                    with single_flight(self.lock_path):  # taken and given back: nobody else is training
                        pass
                except BusyError:
                    raise BusyError("A training run is already going (the nightly job, `doppel train`, or "
                                    "another console).", hint="Wait for it to finish; it shows under Runs when it ends.") from None
            self._state = RetrainState(state="running", kind=kind, phase="loading the model and the training set",
                                       started=time.time())
            self._thread = threading.Thread(target=self._work, args=(kind,), name="console-retrain", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> RetrainState:
        """Wait for the run in progress (for tests and scripts)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    def _on_step(self, step: int, total: int, loss: float | None) -> None:
        with self._lock:
            s = self._state
            s.step, s.total, s.phase = step, total, "training"
            if loss is not None:
                s.loss = loss

    def _on_phase(self, text: str) -> None:
        with self._lock:
            self._state.phase = text

    def _finish(self, state: str, message: str, run_id: int | None = None) -> None:
        with self._lock:
            s = self._state
            s.state, s.message, s.run_id, s.finished, s.phase = state, message, run_id, time.time(), ""

    def _work(self, kind: str) -> None:
        try:
            result = self._run(kind, self._on_step, self._on_phase)
        except DoppelError as exc:
            self._finish("failed", f"{exc.message} {exc.hint or ''}".strip())
        except Exception as exc:  # the thread must say what happened; the log has the traceback
            log.exception("training run started from the console failed")
            self._finish("failed", f"{type(exc).__name__}: {exc}. The active adapter is unchanged; the server log has the details.")
        else:
            status = getattr(result, "status", "succeeded")
            self._finish(status if status in ("succeeded", "rejected", "skipped", "failed") else "succeeded",
                         str(getattr(result, "message", "")), getattr(result, "run_id", None))
