"""The model runtime: the base model, the active LoRA adapter, and generation.

One ``ModelRuntime`` per process. Generation runs one request at a time under a lock (a 2-core CPU
gains nothing from running two at once, and the KV cache of one request must not mix with
another's); an adapter swap takes the same lock, so a request in flight finishes on the adapter it
started with and the next one uses the new adapter.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.models import PACKAGED, cache_dir_for, is_packaged, load_tokenizer, packaged_gguf
from common.errors import BusyError, ModelError

log = logging.getLogger(__name__)


FACT_BOOST = 3.0  # the default of GenerationConfig.fact_boost (see FactBoost for what it measured)


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1  # on the reply's and the prompt's tokens, not the facts' (ReplyRepetitionPenalty)
    fact_boost: float = FACT_BOOST  # added to the logits of the words only the facts hold (FactBoost)
    max_new_tokens: int = 64
    min_new_tokens: int = 1
    calibrated_stop: bool = True  # the temperature sharpens the words, not the decision to stop (CalibratedStop)
    length_follow: float = 1.0  # how far a reply's length follows the owner's in this conversation (agent.prompt.length_bias; 0: off)
    stop_bias: float = 0.0  # added to the end-of-turn logits, < 0 writes longer: one reply's, set from length_follow
    split_messages: bool = True  # a reply may be sent as several short messages, as the person does

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplyRepetitionPenalty:
    """The repetition penalty (a logits processor, computed as transformers' RepetitionPenaltyLogitsProcessor
    does) on the tokens the reply has written and on the prompt's, except the words only its facts
    hold. Transformers' own penalises every token of the prompt, the facts' words too
    ("vegetarian", "Prague"): the twin was pushed away from the very words it should state.
    Measured on one trained adapter (bench/quality.py, 48 held-out questions, 16 conversations):

    - the whole prompt penalised (before): held-out fact use 65 %, median reply 104 chars, authorship 90 %
    - only the reply's own tokens: 75 %, 62 chars, 46 % (replies echo the conversation's words)
    - the prompt but not the facts, nor the end-of-turn marker: 71 %, 42 chars, 96 %
    - the prompt but not the facts (this): 71 %, 79 chars (the owner: 136), 98 %

    Both backends use this one processor."""

    def __init__(self, penalty: float, n_prompt: int, prompt_ids: Sequence[int]) -> None:
        import torch

        self.penalty = penalty
        self.n_prompt = n_prompt
        self.prompt_ids = torch.tensor([sorted(set(prompt_ids))], dtype=torch.long)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        ids = torch.cat([self.prompt_ids.to(input_ids.device), input_ids[:1, self.n_prompt:]], dim=1)
        if ids.shape[1] == 0:
            return scores
        got = torch.gather(scores, 1, ids.expand(scores.shape[0], -1))
        got = torch.where(got < 0, got * self.penalty, got / self.penalty)
        return scores.scatter(1, ids.expand(scores.shape[0], -1), got)


def reply_repetition_penalty(penalty: float, tokenizer: Any, prompt: str, n_prompt: int) -> ReplyRepetitionPenalty:
    """The processor for one reply to ``prompt`` (``n_prompt`` tokens)."""
    from agent.prompt import without_facts

    held = tokenizer(without_facts(prompt), add_special_tokens=False)["input_ids"]
    return ReplyRepetitionPenalty(penalty, n_prompt, held)


class FactBoost:
    """Adds ``boost`` to the logits of the tokens that only the prompt's facts hold (words such as
    "vegetarian" or "Knedlík", not in the instructions or the conversation), each until the reply
    has written it. A 135M model asked "do you eat meat?" with "I am vegetarian" in its prompt
    often answers in the fact's shape with made-up content ("I eat chicken"); this is a copy bias
    toward the facts it was given. Where no fact reached the prompt (small talk, mostly) it does
    nothing.

    Measured on the 60 tuning questions (bench/quality.py's stand-in history, one adapter trained
    for 10 minutes), fact use of the base model / the trained adapter: boost 0: 25 % / 78 %;
    1.5: 43 % / 75 %; 3: 58 % / 77 %; 5: 78 % / 73 %: it lifted the untrained model and did nothing
    for the trained one, so it was off. Since a fact more than 0.1 below the best stays out of the
    prompt (``RetrievalConfig.margin``) there are fewer other facts' words to raise, and it helps
    both. Again on the tuning questions, another 10-minute adapter: 0: 30 % / 83 %; 1.5: 53 / 85;
    2: 63 / 85; 3: 77 / 88; 4: 80 / 87; 5: 78 / 82. At 3 (the default) on the 48 held-out
    questions, never tuned on: base 25 -> 60 %, twin 75 -> 77 %; small talk stating a fact 4 % either
    way, no unasked fact in 32 replies to real conversations, authorship 0.820 -> 0.805, median reply
    95 -> 76 characters (owner 136)."""

    def __init__(self, boost: float, n_prompt: int, fact_ids: Sequence[int]) -> None:
        import torch

        self.boost = boost
        self.n_prompt = n_prompt
        self.fact_ids = torch.tensor(sorted(set(fact_ids)), dtype=torch.long)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.fact_ids.numel() == 0:
            return scores
        ids = self.fact_ids.to(scores.device)
        written = input_ids[0, self.n_prompt:]
        if written.numel():
            ids = ids[~torch.isin(ids, written)]
        if ids.numel() == 0:
            return scores
        scores = scores.clone()
        scores[:, ids] += self.boost
        return scores


def fact_boost(boost: float, tokenizer: Any, prompt: str, n_prompt: int) -> FactBoost:
    """The fact boost for one reply to ``prompt``: the tokens of the facts' lines (as the prompt
    tokenizes them, leading spaces included) that are words, less every token of the rest."""
    from agent.prompt import split_facts

    rest, facts = split_facts(prompt)
    if not facts:
        return FactBoost(boost, n_prompt, [])
    elsewhere = set(tokenizer(rest, add_special_tokens=False)["input_ids"])
    # the template's own tokens (the last fact's line may end with the end-of-turn marker) are no words
    elsewhere |= set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = set()
    for line in facts:
        for i in tokenizer(" " + line, add_special_tokens=False)["input_ids"]:
            if i not in elsewhere and any(ch.isalnum() for ch in tokenizer.decode([i])):
                ids.add(i)
    return FactBoost(boost, n_prompt, sorted(ids))


def reply_processors(config: GenerationConfig, tokenizer: Any, prompt: str, n_prompt: int,
                     stop_ids: Sequence[int] = ()) -> list[Any]:
    """The logits processors both backends apply to a reply: the repetition penalty, the fact boost
    and the stop bias."""
    procs: list[Any] = []
    if config.repetition_penalty and config.repetition_penalty != 1.0:
        procs.append(reply_repetition_penalty(config.repetition_penalty, tokenizer, prompt, n_prompt))
    if config.fact_boost:
        procs.append(fact_boost(config.fact_boost, tokenizer, prompt, n_prompt))
    if config.stop_bias and stop_ids:
        procs.append(StopBias(config.stop_bias, stop_ids))
    return procs


class StopBias:
    """A constant added to the end-of-turn tokens' logits: multiplies the odds of ending the reply
    at each step by exp(bias), so a negative bias lengthens the reply (where stopping is rare and
    even, by about exp(-bias)). Set per reply from the conversation (``agent.prompt.length_bias``);
    it runs before ``CalibratedStop``, which keeps the biased stop probability untempered."""

    def __init__(self, bias: float, stop_ids: Sequence[int]) -> None:
        import torch

        self.bias = float(bias)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores = scores.clone()
        scores[:, self.stop_ids.to(scores.device)] += self.bias
        return scores


class CalibratedStop:
    """The temperature, applied to what the reply says but not to whether it ends: the stop
    tokens keep the probability the model gives them (temperature 1), the other tokens share the
    rest in their tempered proportions.

    A temperature below 1 sharpens every choice toward the likeliest token, and at the end of a
    sentence that is often the end-of-turn marker: with plain tempering a twin stops earlier than
    the person it learnt from (measured on a trained adapter, 32 validation conversations: the
    owner's training-period replies have a median of 75 characters; the twin's greedy replies 40-58,
    sampled at 0.7 47-51, at 1.0 78-101). Drawn at the model's own odds, the stop comes where the
    history put it, while the words stay as focused as the temperature asks."""

    def __init__(self, temperature: float, stop_ids: Sequence[int]) -> None:
        import torch

        self.temperature = temperature
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        s = scores.float()
        tempered = torch.log_softmax(s / self.temperature, dim=-1)
        if self.stop_ids.numel() == 0:
            return tempered
        stop = self.stop_ids.to(s.device)
        own = torch.log_softmax(s, dim=-1)[:, stop]  # the stop tokens' log-probabilities at temperature 1
        p_own = own.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
        p_tempered = tempered[:, stop].exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
        out = tempered + torch.log1p(-p_own) - torch.log1p(-p_tempered)
        out[:, stop] = own
        return out


@dataclass
class Generation:
    text: str  # the reply, cleaned: no prompt echo, no other speaker's lines
    raw: str  # what the model wrote, decoded
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    total_ms: float
    adapter_version: str | None


def adapter_reply_chars(path: Path | None) -> float | None:
    """``owner_reply_chars`` from an adapter's ``doppel.json`` (written when it was registered), or None."""
    if path is None:
        return None
    try:
        value = json.loads((Path(path) / "doppel.json").read_text(encoding="utf-8")).get("metrics", {}).get("owner_reply_chars")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    # auto: bf16 where the hardware has it (measured here: prefill 2.5x, decode 1.6x over fp32)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 is emulated
    and measured slower than fp32 (here, on a Xeon without it: prefill 1.0 s vs 0.35 s)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def load_model(spec: str, data_dir: Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec`` ('' = the packaged SmolLM2, 'gemma3-270m' = the packaged
    Gemma). A packaged GGUF is converted once (~13-30 s) and saved as safetensors under the data
    directory; later loads take about a second."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(spec, data_dir)
    cache = cache_dir_for(spec, data_dir)
    try:
        if is_packaged(spec):
            if not (cache / "config.json").is_file() or not any(cache.glob("*.safetensors")):
                _convert_packaged(cache, packaged_gguf(spec, data_dir))
            source, kwargs = str(cache), {}
        else:
            source, kwargs = spec, {"local_files_only": True}
        config = AutoConfig.from_pretrained(source, **kwargs)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the model {spec or PACKAGED}: {exc}",
                         hint="DOPPEL_BASE_MODEL must be a model folder or an id already in the local "
                              "Hugging Face cache; nothing is downloaded.") from None
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _convert_packaged(cache: Path, gguf: Path) -> None:
    """GGUF -> safetensors, written to a temporary folder and renamed into place (a crash never
    leaves a half-written model that a later start would trust)."""
    from transformers import AutoModelForCausalLM

    import contextlib
    import io

    log.info("converting the packaged model %s (once)", gguf.name)
    # transformers draws a tqdm bar of its own here that no setting turns off; the callers show
    # a status line for this step instead, and an error still surfaces as an exception
    from agent.models import one_gguf_parse

    with contextlib.redirect_stderr(io.StringIO()), one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized already; transformers refuses to save while it thinks otherwise
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    try:
        model.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.replace(cache / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- cleaning what the model wrote ---------------------------------------------------------------

_SPEAKER_LINE = re.compile(r"^\s*[\w .'-]{1,40}:\s")
_WORD = re.compile(r"\w+")
_SENTENCE_START = re.compile(r"(?<=[.!?])\s+")
_ECHO_WORDS = 5  # this many words in a row of the instruction make an echo of it ("with people you know" is chat)


def _shingles(words: Sequence[str], n: int = _ECHO_WORDS) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _instruction_shingles() -> frozenset[tuple[str, ...]]:
    """Runs of words of the system message's instruction, the persona's name left out."""
    from agent.prompt import Persona, system_text

    return frozenset(_shingles(_WORD.findall(system_text(Persona("\u2063")).casefold())))


_INSTRUCTION = _instruction_shingles()


def _cut_echo(line: str, name: set[str]) -> tuple[str, bool]:
    """The line up to the sentence where it starts repeating the instruction ("Sentence 2: Same
    language, length and tone.", as the untrained model sometimes writes), and whether it did.
    The persona's name (its words: ``name``) is left out of both sides."""
    sentences = _SENTENCE_START.split(line)
    for i, sentence in enumerate(sentences):
        if _shingles([w for w in _WORD.findall(sentence.casefold()) if w not in name]) & _INSTRUCTION:
            return " ".join(sentences[:i]), True
    return line, False


def clean_reply(raw: str, other_speakers: set[str], own_name: str) -> str:
    """Cut the reply at the first line where the model starts writing someone else's turn
    ("Bob: ..."), or at the sentence where it repeats its instruction, and strip a leading "Own
    name:" it may have copied from the transcript."""
    lines = raw.replace("\r", "").split("\n")
    kept: list[str] = []
    lowered = {s.casefold() for s in other_speakers if s}
    own_words = set(_WORD.findall(own_name.casefold()))
    for i, line in enumerate(lines):
        line, echoed = _cut_echo(line, own_words)
        if echoed:
            kept.append(line)
            break
        m = _SPEAKER_LINE.match(line)
        if m:
            name = line.split(":", 1)[0].strip().casefold()
            if name == own_name.casefold() and i == 0:
                line = line.split(":", 1)[1].lstrip()
            elif name in lowered or name in {"user", "assistant", "system"}:
                break
        kept.append(line)
    return "\n".join(kept).strip()


def split_reply(text: str, max_parts: int = 4) -> list[str]:
    """The messages to send: the reply's non-empty lines (the model learned from the person's
    turns, where consecutive messages were joined by newlines), at most ``max_parts``; the rest
    stays joined in the last one."""
    parts = [p.strip() for p in text.split("\n") if p.strip()]
    if len(parts) <= max_parts:
        return parts
    return parts[: max_parts - 1] + ["\n".join(parts[max_parts - 1:])]


def check_adapter(path: Path | str) -> Path:
    """``path`` as a Path, if it holds a LoRA adapter; else a ModelError that says what to pass."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"No LoRA adapter at {path} (adapter_config.json is missing).",
                         hint="Pass the folder a training run wrote, e.g. <data_dir>/adapters/v3.")
    return path


# -- the runtime ---------------------------------------------------------------------------------

AdapterSource = Callable[[], "tuple[str, Path] | None"]


class ModelRuntime:
    """The base model plus the active adapter. ``generate`` is safe to call from many threads."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu",
                 adapter_source: AdapterSource | None = None, queue_timeout_s: float = 30.0) -> None:
        self.base = model
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.adapter_source = adapter_source
        self.adapter_version: str | None = None
        self.adapter_path: Path | None = None
        self.queue_timeout_s = queue_timeout_s
        self._lock = threading.Lock()
        self._waiting = 0
        self._serial = 0
        eos = {tokenizer.eos_token_id}
        for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(marker) if marker in tokenizer.get_vocab() else None
            if tid is not None:
                eos.add(tid)
        self.stop_ids = sorted(t for t in eos if t is not None)

    @property
    def max_length(self) -> int:
        cfg = self.base.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(self.tokenizer, "model_max_length", 2048)
        return int(min(n, 8192))

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def reply_chars(self) -> float | None:
        """The median length of the owner's replies the serving adapter learnt from (None: the base
        model, or an adapter trained before it was recorded): what ``length_bias`` measures from."""
        return adapter_reply_chars(self.adapter_path)

    # adapters -----------------------------------------------------------------------------------

    def use_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Serve with the LoRA adapter at ``path`` (None: the base model alone). Waits for the request
        in flight; the swap happens between requests."""
        with self._lock:
            self._swap(path, version)

    def _swap(self, path: Path | None, version: str | None) -> None:
        """Replace the adapter. The active adapter is merged into the weights while it serves, so an
        adapter costs nothing per token; it is unmerged before the next swap."""
        if path is None:
            if self.model is not self.base:
                self.model.unmerge_adapter()
                self.model = self.model.unload()
                self.base = self.model
            self.adapter_version = self.adapter_path = None
            return
        path = check_adapter(path)
        from peft import PeftModel

        self._serial += 1
        name = f"adapter{self._serial}"
        try:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            else:
                old = self.model.active_adapter
                self.model.unmerge_adapter()
                try:
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                except BaseException:
                    self.model.merge_adapter()  # the old adapter keeps serving
                    raise
                self.model.set_adapter(name)
                self.model.delete_adapter(old)
            self.model.merge_adapter()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"Cannot apply the adapter {path}: {exc}",
                             hint="Was it trained for this base model (DOPPEL_BASE_MODEL)?") from None
        self.model.to(self.device).eval()
        self.adapter_path, self.adapter_version = path, version or path.name
        log.info("serving with adapter %s", self.adapter_version)

    def prepare(self) -> None:
        """Load what the first reply needs now rather than during it: the registry's active adapter."""
        with self._lock:
            self._follow_registry()

    def _follow_registry(self) -> None:
        if self.adapter_source is None:
            return
        try:
            active = self.adapter_source()
        except Exception as exc:  # a broken registry must not stop the twin from answering
            log.warning("cannot read the active adapter: %s", exc)
            return
        if active is None:
            if self.adapter_version is not None:
                self._swap(None, None)
            return
        version, path = active
        if version != self.adapter_version:
            try:
                self._swap(path, version)
            except ModelError as exc:
                log.error("%s (still serving %s)", exc.message, self.adapter_version or "the base model")

    # generation ---------------------------------------------------------------------------------

    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(),
                 other_speakers: set[str] = frozenset(), own_name: str = "") -> Generation:  # type: ignore[assignment]
        self._waiting += 1
        try:
            if not self._lock.acquire(timeout=self.queue_timeout_s):
                raise BusyError(f"The twin is busy: a reply waited over {self.queue_timeout_s:.0f} s for the model.",
                                hint="Try again in a moment, or raise DOPPEL_QUEUE_TIMEOUT_S.")
        finally:
            self._waiting -= 1
        try:
            self._follow_registry()
            return self._generate(prompt, config, other_speakers, own_name)
        finally:
            self._lock.release()

    def _generate(self, prompt: str, config: GenerationConfig, other_speakers: set[str], own_name: str) -> Generation:
        import torch

        t0 = time.perf_counter()
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        n_prompt = int(enc["input_ids"].shape[1])
        room = self.max_length - n_prompt
        if room < 1:
            raise ModelError(f"The prompt ({n_prompt} tokens) fills the model's length ({self.max_length}).",
                             hint="Lower DOPPEL_CONTEXT_MAX_TOKENS or shorten the facts.")
        sample = config.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=min(config.max_new_tokens, room), min_new_tokens=min(config.min_new_tokens, room),
            do_sample=sample, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        processors = reply_processors(config, self.tokenizer, prompt, n_prompt, self.stop_ids)
        temperature = config.temperature
        if sample and config.calibrated_stop and temperature != 1.0:
            # after the reply processors, before top-k and top-p, as generate() places its own temperature
            processors.append(CalibratedStop(temperature, self.stop_ids))
            temperature = 1.0
        if processors:
            from transformers.generation.logits_process import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if sample:
            kwargs.update(temperature=temperature, top_p=config.top_p, top_k=config.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        first: list[float] = []

        class _FirstToken:  # records when prefill ended (the first new token arrived)
            def put(self, value: Any) -> None:
                if value is not None and len(first) < 2:
                    first.append(time.perf_counter())

            def end(self) -> None:
                pass

        with torch.inference_mode():
            out = self.model.generate(**enc, streamer=_FirstToken(), **kwargs)
        new = out[0, n_prompt:]
        raw = self.tokenizer.decode(new, skip_special_tokens=True)
        total = (time.perf_counter() - t0) * 1000
        prefill = ((first[1] if len(first) > 1 else time.perf_counter()) - t0) * 1000
        text = clean_reply(raw, set(other_speakers), own_name)
        return Generation(text, raw, n_prompt, int(new.shape[0]), prefill, total, self.adapter_version)
