"""What the console is handed by the composition root (``doppel/web.py``): the core objects it
calls, and a provider of the facts about the running process it shows on the status page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from console.retrain import Retrainer


@dataclass(frozen=True)
class SystemInfo:
    """The running process as the status page shows it."""

    model: str  # the base model
    backend: str  # what generates replies (llama.cpp, transformers)
    device: str
    database: str  # the URL, password hidden
    data_dir: str
    next_nightly: datetime | None  # when the nightly retraining fires next
    schedule: str  # in words: "03:00 every day (Europe/Prague)"
    scheduler_here: bool  # whether this process runs the scheduler


@dataclass
class ConsoleDeps:
    secret: str | None  # the password that signs the owner in; None refuses to start
    agent: Any  # agent.service.Agent
    knowledge: Any | None  # knowledge.index.KnowledgeBase; None: no facts served here
    sessions: sessionmaker[Session]
    registry: Any  # trainer.registry.Registry
    system: Callable[[], SystemInfo]
    retrainer: Retrainer | None = None  # None: "retrain now" is not offered
    nightly_min_ratings: int = 20  # the nightly job retrains after this many new ratings
    session_days: int = 7  # a sign-in lasts this long
    secure_cookie: bool = False  # send the session cookie over HTTPS only (behind a TLS proxy)
