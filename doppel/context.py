"""The composition root shared by the commands: settings read once, then the database built
lazily so `doppel --help` and `doppel config` never touch it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from doppel.settings import Settings, load_settings


@dataclass
class AppContext:
    settings: Settings
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, **overrides: Any) -> AppContext:
        settings, sources = load_settings(**overrides)
        return cls(settings, sources)

    def ensure_data_dir(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)

    @cached_property
    def raw_engine(self) -> Engine:
        """The engine without the schema check (for `doppel db ...`)."""
        from feedback.db import make_engine

        if self.settings.resolved_database_url.startswith("sqlite:///"):
            self.ensure_data_dir()
        return make_engine(self.settings.resolved_database_url)

    @cached_property
    def engine(self) -> Engine:
        """The engine, refusing a schema that is behind or ahead of the code."""
        from doppel.migrate import ensure_current

        engine = self.raw_engine
        ensure_current(engine)
        return engine

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        from feedback.db import make_session_factory

        return make_session_factory(self.engine)
