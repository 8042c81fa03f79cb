"""The llama.cpp backend: GGUF export of the (adapter-merged) model, and generation on it."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.gguf_export import _to_interleaved, export_gguf, gguf_name, merged_state
from agent.models import packaged_gguf
from agent.prompt import Persona, Turn, render_prompt
from agent.runtime import GenerationConfig, ModelRuntime
from common.errors import ModelError

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0)


# --- the export, without llama.cpp ---
def test_every_llama_weight_has_a_gguf_name(tiny_model: Any) -> None:
    names = {n: gguf_name(n) for n in tiny_model.state_dict()}
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert names["model.layers.1.self_attn.k_proj.weight"] == "blk.1.attn_k.weight"
    assert names["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    assert names["model.layers.0.post_attention_layernorm.weight"] == "blk.0.ffn_norm.weight"
    assert names["model.norm.weight"] == "output_norm.weight"
    mapped = [g for g in names.values() if g]
    assert len(mapped) == len(set(mapped)) == 2 + 9 * 2 + 1  # embeddings, 9 per layer, norm, lm_head
    assert gguf_name("model.rotary_emb.inv_freq") is None


def test_rotary_rows_become_interleaved_pairs() -> None:
    """transformers rotates (i, i + d/2) within a head; llama.cpp rotates (2i, 2i + 1)."""
    head_dim, heads = 8, 2
    w = np.arange(heads * head_dim, dtype=np.float32)[:, None].repeat(3, axis=1)
    out = _to_interleaved(w, heads)[:, 0].astype(int).tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_merged_state_folds_the_adapter_in(tiny_model: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_model), cfg).save_pretrained(str(tmp_path / "a"))
    peft = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(tmp_path / "a"))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight.detach().clone() + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    peft.merge_adapter()
    state = merged_state(peft)
    assert not [k for k in state if "lora_" in k or "base_layer" in k]
    assert set(state) == set(tiny_model.state_dict())
    torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], expected)


def test_export_refuses_a_model_of_other_shapes(tiny_model: Any, tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    with pytest.raises(ModelError, match="lacks .* tensors"):
        export_gguf(merged_state(tiny_model), tiny_model.config, packaged_gguf(), out)
    assert not out.exists() and not list(tmp_path.glob(".tiny.gguf*"))  # nothing half-written stays


def test_backend_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from doppel.context import AppContext

    monkeypatch.setenv("DOPPEL_BACKEND", "llama_cpp")
    monkeypatch.setenv("DOPPEL_BASE_MODEL", "/models/some-t5")
    with pytest.raises(ModelError, match="packaged base models only"):
        AppContext.load().use_llama_cpp()
    monkeypatch.setenv("DOPPEL_BACKEND", "transformers")
    monkeypatch.delenv("DOPPEL_BASE_MODEL")
    assert AppContext.load().use_llama_cpp() is False


# --- the real model on llama.cpp ---
@pytest.fixture(scope="module")
def llama_rt(real_model: Any, tokenizer: Any):  # type: ignore[no-untyped-def]
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
    from agent.llamacpp import LlamaCppRuntime

    # the export is shared with the other tests that use the session's converted model
    cache = Path(real_model.name_or_path) / "gguf"
    rt = LlamaCppRuntime(copy.deepcopy(real_model), tokenizer, packaged_gguf(), cache)
    assert rt.gguf_path is None  # nothing is exported until it is needed
    rt.prepare()
    assert rt.gguf_path is not None and rt.gguf_path.parent == cache
    yield rt
    rt.close()


def _chat_prompt(tokenizer: Any) -> str:
    turns = [Turn("Bob", "hey, are you coming to the mountains on Saturday?", False),
             Turn("Alex", "maybe, depends on the weather", True),
             Turn("Bob", "sunny all day! Petra is driving at 7. are you still vegetarian? we're grilling", False)]
    return render_prompt(tokenizer, Persona("Alex", "I write short, casual messages."),
                         ["I am vegetarian.", "I live in Prague."], turns).text


def _hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.slow
def test_exported_weights_match_the_packaged_model(llama_rt: Any) -> None:
    """The q and k rows are permuted back to llama.cpp's layout: the export matches the packaged
    GGUF (Q4_1) within Q8_0's rounding, tensor by tensor."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ours = {t.name: t for t in GGUFReader(str(llama_rt.gguf_path)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(packaged_gguf())).tensors}
    assert set(ours) == set(theirs)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        a = dequantize(ours[name].data, ours[name].tensor_type)
        b = dequantize(theirs[name].data, theirs[name].tensor_type)
        assert ours[name].tensor_type.name == "Q8_0"
        assert np.abs(a - b).max() <= np.abs(b).max() / 100, name


@pytest.mark.slow
def test_llama_cpp_agrees_with_transformers(llama_rt: Any, real_model: Any, tokenizer: Any, tmp_path: Path) -> None:
    ids = tokenizer(_chat_prompt(tokenizer), add_special_tokens=False)["input_ids"]
    ref = _hf_logits(real_model, ids)
    ours = llama_rt.logits_for(ids)
    assert ours.shape == ref.shape
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    assert agree >= 0.9, agree  # measured 0.97 (a wrong q/k layout gives near 0)

    g = llama_rt.generate(_chat_prompt(tokenizer), GREEDY, other_speakers={"Bob"}, own_name="Alex")
    assert g.new_tokens == 12 and g.prompt_tokens == len(ids) and g.total_ms >= g.prefill_ms > 0
    assert "<|im_" not in g.raw and g.raw.strip()
    again = llama_rt.generate(_chat_prompt(tokenizer), GREEDY)  # the prefix cache reuses all but one token
    assert again.new_tokens == 12 and again.raw.strip()
    # Evaluated alone, that last token's logits differ from a whole-prompt prefill by llama.cpp's rounding
    # (up to ~0.8 of ~33 here), so greedy text may part at a near tie: the two next-token distributions
    # are compared instead. A cache that kept the wrong tokens' keys gives another distribution.
    with llama_rt._lock:
        llama_rt._prefill(ids)
        warm = llama_rt._logits()
        llama_rt.prefix_cache = False
        try:
            llama_rt._prefill(ids)
            cold_logits = llama_rt._logits()
        finally:
            llama_rt.prefix_cache = True

    def dist(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max())
        return e / e.sum()

    assert warm.argmax() == cold_logits.argmax()
    assert 0.5 * np.abs(dist(warm) - dist(cold_logits)).sum() < 0.1  # measured 0.03
    llama_rt.prefix_cache = False
    try:
        cold = llama_rt.generate(_chat_prompt(tokenizer), GREEDY)
    finally:
        llama_rt.prefix_cache = True
    assert cold.raw == g.raw  # a whole-prompt prefill repeats exactly
    # a reply stops at the end of its turn unless min_new_tokens holds it
    torch.manual_seed(0)  # sampled: one draw in many runs to the limit; this test is about the stop token
    short = llama_rt.generate(_chat_prompt(tokenizer), GenerationConfig(temperature=0.7, max_new_tokens=200))
    assert 0 < short.new_tokens < 200


@pytest.mark.slow
def test_llama_cpp_serves_the_adapter_and_swaps_it(llama_rt: Any, real_model: Any, tokenizer: Any,
                                                   tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(real_model), cfg)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.6)  # strong enough to change the answers, not enough to wreck the model
    peft.save_pretrained(str(tmp_path / "v1"))
    peft.merge_adapter()
    ids = tokenizer(_chat_prompt(tokenizer), add_special_tokens=False)["input_ids"]
    ref_adapted = _hf_logits(peft, ids)
    base_logits = llama_rt.logits_for(ids)
    base_path = llama_rt.gguf_path

    llama_rt.use_adapter(tmp_path / "v1", "v1")
    assert llama_rt.adapter_version == "v1" and llama_rt.gguf_path != base_path
    adapted = llama_rt.logits_for(ids)
    assert float((adapted.argmax(-1) == ref_adapted.argmax(-1)).mean()) >= 0.9
    # the adapter moves the logits, and llama.cpp moves them where transformers does
    moved, error = np.abs(adapted - base_logits).mean(), np.abs(adapted - ref_adapted).mean()
    print(f"adapter moved logits by {moved:.3f}, llama.cpp vs transformers {error:.3f}")
    assert moved > 3 * error
    assert llama_rt.generate(_chat_prompt(tokenizer), GREEDY).adapter_version == "v1"

    with pytest.raises(ModelError, match="adapter_config.json"):
        llama_rt.use_adapter(tmp_path / "missing")
    assert llama_rt.adapter_version == "v1"  # the broken one never replaced it

    llama_rt.use_adapter(None)
    assert llama_rt.gguf_path == base_path  # the base export is reused, not redone
    np.testing.assert_allclose(llama_rt.logits_for(ids), base_logits, atol=1e-3)
    # the transformers weights it exports from are the base model's again
    torch.testing.assert_close(llama_rt.base.model.layers[0].self_attn.q_proj.weight,
                               real_model.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(llama_rt, ModelRuntime)


@pytest.mark.slow
def test_an_adapter_exported_by_the_trainer_is_loaded_not_exported_again(
        llama_rt: Any, real_model: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer exports a new adapter before activating it (``TrainingDeps.prepare_serving``);
    the serving process then finds the file by the adapter's content and only loads it."""
    import shutil
    import time

    from peft import LoraConfig, PeftModel, get_peft_model

    from agent import llamacpp

    torch.manual_seed(7)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    staging = tmp_path / "staging" / "adapter"
    get_peft_model(copy.deepcopy(real_model), cfg).save_pretrained(str(staging))
    candidate = PeftModel.from_pretrained(copy.deepcopy(real_model), str(staging))
    candidate.merge_adapter()
    t = time.perf_counter()
    exported = llamacpp.export_merged(candidate, staging, packaged_gguf(), llama_rt.cache_dir)
    export_s = time.perf_counter() - t
    shutil.move(str(staging), str(tmp_path / "v7"))  # the registry moves the folder into place

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the serving process exported the adapter again")

    monkeypatch.setattr(llamacpp, "export_gguf", no_export)
    t = time.perf_counter()
    llama_rt.use_adapter(tmp_path / "v7", "v7")
    swap_s = time.perf_counter() - t
    print(f"export in the trainer {export_s:.1f} s; swap in the server {swap_s:.2f} s")
    try:
        assert llama_rt.gguf_path == exported
        ids = tokenizer(_chat_prompt(tokenizer), add_special_tokens=False)["input_ids"]
        want = _hf_logits(candidate, ids)
        served = llama_rt.logits_for(ids)
        agree = float((served.argmax(-1) == want.argmax(-1)).mean())
        llama_rt.use_adapter(None)
        base = llama_rt.logits_for(ids)

        def gap(a: np.ndarray) -> float:  # mean absolute log-probability difference to the candidate
            la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
            lw = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) - want.max(-1, keepdims=True)
            return float(np.abs(la - lw).mean())

        print(f"next-token agreement with the candidate {agree:.3f}; log-prob gap: the export {gap(served):.3f}, "
              f"the base model {gap(base):.3f}")
        # Q8_0 rounding moves a few argmaxes of this random (untrained) adapter (0.898-0.95 on the CPUs
        # seen); what matters is that the adapter served is this one: far closer to it than the base model
        assert agree >= 0.85 and gap(served) < 0.5 * gap(base)
    finally:
        llama_rt.use_adapter(None)  # the base export exists: no export needed


def test_sampling_among_the_top_k_is_transformers_top_k_then_top_p() -> None:
    """The llama.cpp backend takes the nucleus over the top-k candidates only (not a sort of the
    whole 262k vocabulary of Gemma): the same distribution as transformers' warpers."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from agent.llamacpp import LlamaCppRuntime
    from agent.runtime import GenerationConfig

    torch.manual_seed(3)
    seq = torch.zeros((1, 1), dtype=torch.long)
    for top_k, top_p in ((50, 0.9), (5, 0.5), (50, 1.0), (1000, 0.95)):
        cfg = GenerationConfig(temperature=0.7, top_k=top_k, top_p=top_p)
        scores = torch.randn(1, 5000) * 3
        reference = scores.clone()
        reference = TopKLogitsWarper(top_k)(seq, reference)
        if top_p < 1.0:
            reference = TopPLogitsWarper(top_p)(seq, reference)
        want = torch.softmax(reference, dim=-1)[0]
        nucleus = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        values, index = LlamaCppRuntime.candidates(seq, scores, cfg, nucleus)
        got = torch.zeros(5000).index_add_(0, index[0], torch.softmax(values, dim=-1)[0])
        assert torch.allclose(got, want, atol=1e-6), (top_k, top_p)


@pytest.mark.slow
def test_the_gate_answers_on_llama_cpp_as_the_twin_will(llama_rt: Any, real_model: Any, tokenizer: Any,
                                                        tmp_path: Path) -> None:
    """With ``generation_runtime`` set (the twin serves on llama.cpp), the evaluation's greedy answers
    come from llama.cpp: the same text its runtime generates for the prompt, the runtime closed after;
    the held-out loss stays on transformers, and figures of one backend are never reused for the other."""
    from types import SimpleNamespace

    from agent.llamacpp import LlamaCppRuntime
    from trainer import pipeline
    from trainer.evaluate import EVAL_ASKER, EvalConfig, EvalSet, Probe
    from trainer.examples import Example

    built: list[Any] = []

    def generation_runtime(adapter: Path | None) -> Any:
        rt = LlamaCppRuntime(copy.deepcopy(real_model), tokenizer, packaged_gguf(), llama_rt.cache_dir)
        built.append(rt)
        return rt

    questions = [("are you still vegetarian?", "I am vegetarian."), ("where do you live now?", "I live in Prague.")]
    probes = [Probe(render_prompt(tokenizer, Persona("Alex"), [fact], [Turn(EVAL_ASKER, q)]).text, fact, (fact,), question=q)
              for q, fact in questions]
    prompt = render_prompt(tokenizer, Persona("Alex"), [], [Turn("Bob", "how was the weekend?")]).text
    ev = EvalSet(validation=[Example(prompt, "great, went hiking<|im_end|>")], facts=probes)
    deps: Any = SimpleNamespace(registry=SimpleNamespace(dir=tmp_path), tokenizer=tokenizer, persona=Persona("Alex"),
                                device="cpu", load_base=lambda: copy.deepcopy(real_model),
                                generation_runtime=generation_runtime, generation_backend="llama.cpp q8_0")
    cfg = EvalConfig(examples=1, fact_questions=2)
    got = pipeline._evaluate(deps, None, ev, cfg, [], [], False, use_cache=True)
    assert len(built) == 1 and built[0]._llm is None  # used, then closed
    answers = [a["answer"] for a in got["fact_use"]["answers"]]
    direct = LlamaCppRuntime(copy.deepcopy(real_model), tokenizer, packaged_gguf(), llama_rt.cache_dir)
    try:
        short = GenerationConfig(temperature=0, max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.1,
                                 fact_boost=cfg.fact_boost, split_messages=False)
        assert answers == [direct.generate(p.prompt, short, {EVAL_ASKER}, "Alex").text for p in probes]
    finally:
        direct.close()
    assert got["heldout_loss"] is not None and got["heldout_loss"] > 0

    # on transformers the loss comes from the cache, the answers do not (another backend wrote them)
    deps.generation_runtime, deps.generation_backend = None, "transformers"
    again = pipeline._evaluate(deps, None, ev, cfg, [], [], False, use_cache=True)
    assert again["heldout_loss"] == got["heldout_loss"] and len(built) == 1
    assert len(list((tmp_path / ".eval-cache").glob("*.json"))) == 3  # the loss once, the answers per backend


def test_llama_cpp_replies_stop_at_the_models_own_odds(tiny_model: Any, tokenizer: Any, tmp_path: Path) -> None:
    """The llama.cpp backend's sampler (its logits replaced by fixed odds: stop 27 % a step) ends
    replies at the model's odds at temperature 0.3, as the transformers backend does."""
    pytest.importorskip("llama_cpp")
    from agent.llamacpp import LlamaCppRuntime
    from tests.helpers import mean_sampled_length

    word = tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    fixed = np.full(len(tokenizer), -40.0, dtype=np.float32)
    fixed[word], fixed[tokenizer.eos_token_id] = 2.0, 1.0

    class FixedOdds(LlamaCppRuntime):  # the sampler as it is; no model behind the logits
        def _ensure_loaded(self) -> None:
            pass

        def _prefill(self, ids: list[int]) -> None:
            pass

        def _step(self, token: int) -> None:
            pass

        def _logits(self) -> np.ndarray:
            return fixed.copy()

    rt = FixedOdds(tiny_model, tokenizer, tmp_path / "none.gguf", tmp_path)
    lengths = {calibrated: mean_sampled_length(rt, calibrated) for calibrated in (True, False)}
    assert 2.0 < lengths[True] < 5.5, lengths
    assert lengths[False] > 8, lengths
    # a stop bias of -log 3 (a conversation where the owner writes long): a third of the odds of
    # stopping, about 6.8 tokens a reply under the 12-token cap
    longer = mean_sampled_length(rt, True, draws=60, stop_bias=-math.log(3))
    assert 5.5 < longer < 8.5 and longer > lengths[True] + 1.5, (longer, lengths)
