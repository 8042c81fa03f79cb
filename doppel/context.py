"""The composition root shared by the commands: settings read once, then the database built
lazily so `doppel --help` and `doppel config` never touch it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.errors import DoppelError, ModelError
from doppel.settings import Settings, load_settings

log = logging.getLogger(__name__)


def _gpu_possible() -> bool:
    """Whether torch could find a GPU here: an NVIDIA or AMD (ROCm) driver, WSL's GPU, or nvidia-smi."""
    import shutil
    from pathlib import Path

    marks = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
    return any(Path(p).exists() for p in marks) or shutil.which("nvidia-smi") is not None


@dataclass
class AppContext:
    settings: Settings
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from doppel.redaction import protect

        protect(self.settings)  # from here on, no log line, traceback or stored row carries a secret

    @classmethod
    def load(cls, **overrides: Any) -> AppContext:
        settings, sources = load_settings(**overrides)
        return cls(settings, sources)

    @cached_property
    def persona(self) -> Any:
        """Who the twin speaks as: ``persona_name`` when it is set; otherwise the name the owner's
        own messages carry in the stored history (the one most of them carry), so that a twin
        trained on "Alice Example"'s chats is told it is Alice Example, not "me". Training samples
        and replies both take it from here, so the prompt stays one."""
        from agent.prompt import Persona

        s = self.settings
        name = s.persona_name
        if self.sources.get("persona_name", "default") == "default":
            name = self.owner_name() or name
        return Persona(name, s.persona_description)

    def owner_name(self) -> str | None:
        """The name most of the owner's stored messages carry (the twin's own replies left out),
        or None when there are none (or no database yet)."""
        from sqlalchemy import func, or_, select
        from sqlalchemy.exc import SQLAlchemyError

        from feedback.models import Message

        q = (select(Message.sender_name).where(Message.is_owner.is_(True), Message.sender_name.is_not(None),
                                               Message.sender_name != "",
                                               or_(Message.source.is_(None), Message.source != "twin"))
             .group_by(Message.sender_name).order_by(func.count().desc(), Message.sender_name).limit(1))
        try:
            with self.raw_engine.connect() as conn:
                name = conn.execute(q).scalar()
        except SQLAlchemyError:
            return None
        return (str(name).strip() or None) if name else None

    def ensure_data_dir(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)

    @cached_property
    def raw_engine(self) -> Engine:
        """The engine without the schema check (for `doppel db ...`)."""
        from feedback.db import make_engine

        if self.settings.resolved_database_url.startswith("sqlite:///"):
            self.ensure_data_dir()
        engine = make_engine(self.settings.resolved_database_url)
        # closed at exit, also by a CLI process that ends without the interpreter's teardown (cli.finish):
        # SQLite checkpoints its write-ahead log into the database file when the last connection closes
        import atexit

        atexit.register(engine.dispose)
        return engine

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
        return RetrievalConfig(top_k=s.facts_top_k, min_score=s.facts_min_score, margin=s.facts_margin, lexical_weight=s.facts_lexical_weight,
                               hub_weight=s.facts_hub_weight,
                               ann_threshold=s.facts_ann_threshold, max_bytes=s.facts_max_bytes)

    @cached_property
    def embedder(self) -> Any:
        from knowledge.embed import make_embedder

        return make_embedder(*self._embedder_args())

    def prepare_embedder(self) -> None:
        """The embedder's first-time work in this data directory, done in a child process before this
        one loads it (see ``knowledge.embed.prepare_in_child``). For a long job: the dataset build."""
        from knowledge.embed import prepare_in_child

        if "embedder" not in self.__dict__:
            prepare_in_child(*self._embedder_args())

    def _embedder_args(self) -> tuple[str, str, bool, Path]:
        from agent.runtime import cpu_has_native_bf16, resolve_dtype

        device, dtype = self.torch_device, self.settings.dtype
        if dtype in ("float32", "float16", "bfloat16"):
            bf16 = dtype == "bfloat16"
        elif device == "cpu":  # as resolve_dtype decides, without importing torch (the embedders load lazily)
            bf16 = cpu_has_native_bf16()
        else:
            import torch

            bf16 = resolve_dtype(dtype, device) == torch.bfloat16
        # bf16 or fp32 is timed once per machine and kept: the embedder's name carries it, and a
        # choice that flipped between runs would re-embed the facts and miss the dataset's cache
        return (self.settings.embedding_model, self.torch_device, bf16,
                self.settings.data_dir / "models" / "embedding-precision.json")

    @property
    def torch_device(self) -> str:
        if self.settings.device != "auto":
            return self.settings.device
        if not _gpu_possible():  # no GPU driver at all: no need to import torch (2 s) to hear "cpu"
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def knowledge(self) -> Any:
        """The facts the twin knows (a ``knowledge.index.KnowledgeBase``), following the facts file."""
        from knowledge.index import KnowledgeBase

        return KnowledgeBase(self.settings.resolved_facts_path, self.settings.facts_index_path,
                             self.embedder, self.retrieval_config())

    def context_config(self) -> Any:
        """Turns and window: the same for the agent and the dataset builder (DESIGN promise 1)."""
        from agent.conversation import ContextConfig

        s = self.settings
        return ContextConfig(window_hours=s.context_window_hours, max_turns=s.context_max_messages,
                             max_message_chars=s.max_message_chars, turn_gap_minutes=s.turn_gap_minutes,
                             scrub_pii=s.scrub_pii, include_service=not s.skip_service)

    def prompt_limits(self) -> Any:
        """The prompt's token budget: the same for the agent and the dataset builder."""
        from agent.prompt import PromptLimits

        s = self.settings
        return PromptLimits(max_context_tokens=s.context_max_tokens, max_length=s.prompt_max_tokens,
                            reserve_for_reply=s.max_new_tokens)

    def agent_config(self) -> Any:
        from agent.runtime import GenerationConfig
        from agent.service import AgentConfig

        s = self.settings
        gen = GenerationConfig(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                               repetition_penalty=s.repetition_penalty, fact_boost=s.fact_boost, max_new_tokens=s.max_new_tokens,
                               min_new_tokens=s.min_new_tokens, calibrated_stop=s.calibrated_stop,
                               length_follow=s.length_follow, split_messages=s.split_replies)
        return AgentConfig(persona=self.persona, limits=self.prompt_limits(),
                           context=self.context_config(), generation=gen)

    def dataset_config(self) -> Any:
        from trainer.dataset import DatasetConfig

        s = self.settings
        return DatasetConfig(context=self.context_config(), limits=self.prompt_limits(),
                             validation_fraction=s.validation_fraction, skip_links_only=s.skip_links_only,
                             skip_forwarded=s.skip_forwarded, skip_media_only=s.skip_media_only,
                             train_speakers=tuple(s.train_speakers), drills_per_fact=s.fact_drills,
                             drill_distractors=s.fact_drill_distractors)

    def facts_retriever(self) -> Any:
        """The agent's own retrieval for many (query, context) pairs at once, as training samples and
        fact drills ask for it: for each, [(fact id, fact text)]. None when there are no facts."""
        kb = self.knowledge
        if not kb.facts():
            return None

        def retrieve(queries: Any) -> list[list[tuple[str, str]]]:
            return [[(h.fact.id, h.fact.text) for h in hits] for hits in kb.search_many(queries)]

        return retrieve

    def _facts_path(self) -> Path:
        kb = self.__dict__.get("knowledge")  # not loaded for this (it would load the embedder)
        return Path(kb.facts_path) if kb is not None else self.settings.resolved_facts_path

    def _training_retrieval(self) -> Any:
        """``facts_retriever`` for a training run, the embedder's first-time work done in a child
        before this process loads it; None without facts or where the facts cannot be read (said)."""
        path = self._facts_path()
        if not path.is_file() or not path.stat().st_size:
            return None
        try:
            self.prepare_embedder()
            return self.facts_retriever()
        except DoppelError as exc:
            log.warning("facts unavailable, training uses none: %s", exc.message)
            return None

    def example_facts(self, tokenizer: Any, persona: Any = None) -> tuple[Any, str]:
        """(what gives history samples their facts where they are used, what names those facts):
        ``trainer.examples.with_facts`` with the agent's retrieval, prompt limits and persona. The
        facts index is read (built if need be) at the first call, not here."""
        from trainer.examples import with_facts

        persona = persona if persona is not None else self.persona
        limits = self.prompt_limits()
        state: dict[str, Any] = {}

        def give(examples: list[Any]) -> list[Any]:
            if not any(e.pending is not None for e in examples):
                return list(examples)
            if "retrieve" not in state:
                state["retrieve"] = self._training_retrieval()
            return with_facts(examples, tokenizer, persona, limits, state["retrieve"])

        return give, self.facts_version()

    def fact_drills(self, tokenizer: Any, persona: Any = None) -> Any:
        """What makes a training run's fact drills (``trainer.dataset.drill_examples``) from the facts
        file as it is then, with the agent's retrieval, in the owner's style of the training set it is
        given; none without facts."""
        from agent.prompt import reply_of
        from trainer.dataset import drill_examples

        persona = persona if persona is not None else self.persona

        def make(train_set: list[Any]) -> list[Any]:
            retrieve = self._training_retrieval()
            if retrieve is None:
                return []
            facts = [(f.id, f.text, f.topic) for f in self.knowledge.facts()]
            replies = [reply_of(tokenizer, e.completion) for e in train_set if e.source == "dataset" and e.owner][:2000]
            return drill_examples(tokenizer, persona, self.dataset_config(), retrieve, facts, replies)

        return make

    def facts_version(self) -> str:
        """The facts file's content and the retrieval's settings, as one name ("" without facts)."""
        import hashlib

        path = self._facts_path()
        if not path.is_file() or not path.stat().st_size:
            return ""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        from knowledge.embed import resolve

        return f"{digest}|{resolve(self.settings.embedding_model)}|{self.retrieval_config()}"

    def runtime(self, adapter: Any = None) -> Any:
        """The model runtime, following the adapter registry (or serving ``adapter``, a path)."""
        from agent.adapters import ActiveAdapter, FixedAdapter
        from agent.runtime import ModelRuntime, check_adapter, load_model

        s = self.settings
        fixed = adapter or s.adapter_path
        if fixed:
            check_adapter(fixed)  # before a model loads for nothing
        llama = self.use_llama_cpp()
        # llama.cpp runs its own int8 copy; the transformers weights it is exported from stay fp32
        model, tokenizer = load_model(s.base_model, s.data_dir, self.torch_device, "float32" if llama else s.dtype)
        source = FixedAdapter(fixed) if fixed else ActiveAdapter(s.adapters_dir)
        if llama:
            from agent.llamacpp import LlamaCppRuntime
            from agent.models import cache_dir_for, packaged_gguf

            rt: ModelRuntime = LlamaCppRuntime(
                model, tokenizer, packaged_gguf(s.base_model, s.data_dir), cache_dir_for(s.base_model, s.data_dir) / "gguf",
                adapter_source=source, queue_timeout_s=s.queue_timeout_s, ftype=s.llama_cpp_weights)
        else:
            rt = ModelRuntime(model, tokenizer, self.torch_device, adapter_source=source,
                              queue_timeout_s=s.queue_timeout_s)
        if fixed:
            rt.use_adapter(fixed)  # a bad --adapter is an error now, not a log line later
        return rt

    def use_llama_cpp(self) -> bool:
        """Whether replies are generated on llama.cpp (DOPPEL_BACKEND): ``auto`` takes it on a CPU
        when llama-cpp-python is installed and the base model is a packaged one (SmolLM2 or Gemma 3:
        its GGUF carries the tokenizer and metadata llama.cpp needs); ``llama_cpp`` insists, and
        fails with a hint where it cannot."""
        from agent import llamacpp
        from agent.models import is_packaged

        s = self.settings
        if s.backend == "transformers":
            return False
        if s.backend == "llama_cpp":
            if not llamacpp.available():
                raise ModelError("DOPPEL_BACKEND=llama_cpp, but llama-cpp-python is not installed.",
                                 hint="Run scripts/setup.sh (it builds llama-cpp-python), or set DOPPEL_BACKEND=auto.")
            if not is_packaged(s.base_model):
                raise ModelError("DOPPEL_BACKEND=llama_cpp runs the packaged base models only (\"\" or gemma3-270m).",
                                 hint="Set DOPPEL_BACKEND=transformers for other DOPPEL_BASE_MODEL models.")
            return True
        if not is_packaged(s.base_model) or self.torch_device != "cpu":
            return False
        if not llamacpp.available():
            if s.base_model:  # the preset is slow without it: say why, once per process
                log.warning("llama-cpp-python is not installed: %s replies on transformers (several times slower). "
                            "Run scripts/setup.sh to build it.", s.base_model)
            return False
        return True

    def recover(self) -> list[str]:
        """Repair what a process killed half-way left: training runs still marked running, and an
        adapter registry whose database and pointer disagree (``trainer.pipeline.recover``)."""
        from doppel.train_cmd import training_lock_path
        from trainer.pipeline import recover
        from trainer.registry import Registry

        return recover(Registry(self.settings.adapters_dir, self.sessions), self.sessions, training_lock_path(self))

    def agent(self, adapter: Any = None, with_facts: bool = True) -> Any:
        from agent.service import Agent

        self.recover()  # before the runtime reads the registry's pointer
        agent = Agent(self.runtime(adapter), self.knowledge if with_facts else None, self.sessions, self.agent_config())
        load = getattr(self.embedder, "load", None)  # the embedders load lazily: not at the first message
        if with_facts and load is not None:
            load()
        return agent
