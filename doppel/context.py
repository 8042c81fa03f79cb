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

    def retrieval_config(self) -> Any:
        from knowledge.index import RetrievalConfig

        s = self.settings
        return RetrievalConfig(top_k=s.facts_top_k, min_score=s.facts_min_score, lexical_weight=s.facts_lexical_weight,
                               ann_threshold=s.facts_ann_threshold, max_bytes=s.facts_max_bytes)

    @cached_property
    def embedder(self) -> Any:
        from knowledge.embed import SentenceEmbedder

        return SentenceEmbedder(self.settings.embedding_model, device=self.torch_device)

    @property
    def torch_device(self) -> str:
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def knowledge(self) -> Any:
        """The facts the twin knows (a ``knowledge.index.KnowledgeBase``), following the facts file."""
        from knowledge.index import KnowledgeBase

        return KnowledgeBase(self.settings.resolved_facts_path, self.settings.facts_index_path,
                             self.embedder, self.retrieval_config())
