"""Write a Hugging Face Llama-family or Gemma 3 model (with a LoRA adapter merged in) as a GGUF
file that llama.cpp runs.

The packaged base model ships as GGUF; its metadata (architecture, hyper-parameters, tokenizer,
chat template) is copied from it unchanged, and only the weights are replaced by the model's own,
so the exported file tokenizes exactly like the original. Two facts of the format matter:

- Tensors are named ``blk.N.attn_q.weight`` and so on, with the same ``(out, in)`` layout as torch.
- Llama: llama.cpp applies rotary embeddings to interleaved pairs, transformers to the two halves
  of each head, so the rows of the q and k projections are permuted per head (``_to_interleaved``).
  Gemma's rotary layout is the same on both sides (no permutation).
- Gemma 3: its RMS norms scale by ``1 + weight`` in transformers and by ``weight`` in llama.cpp, so
  every norm is written with 1 added (transformers subtracts it when it reads the GGUF). It has
  four norms per layer and q/k norms; the output head is the token embedding.

Weights are written as Q8_0 (8-bit blocks of 32 with a scale each; measured here: next-token
agreement with fp32 far above dynamic int8's) or F32/F16; norms stay F32.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ModelError

log = logging.getLogger(__name__)

FTYPES = {"q8_0": 7, "f16": 1, "f32": 0}  # general.file_type values (llama_ftype)

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
LAYER_NAMES = {"llama": _LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
# the GGUF architecture each transformers model_type is written as
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """The GGUF tensor name for a transformers parameter of a model of GGUF architecture ``arch``,
    or None for one GGUF has no use for."""
    stem, _, kind = hf_name.rpartition(".")
    if kind != "weight":
        return None
    if stem.startswith("model.language_model."):  # Gemma 3 loaded as its multimodal class
        stem = "model." + stem[len("model.language_model."):]
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.weight"
    parts = stem.split(".", 3)  # model, layers, N, rest
    names = LAYER_NAMES[arch]
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{parts[2]}.{names[parts[3]]}.weight"
    return None


def _to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary layout (per head: first half, second half) -> llama.cpp's (pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def merged_state(model: Any) -> dict[str, Any]:
    """The model's weights with any merged LoRA adapter folded in, under plain transformers names
    (peft wraps a layer as ``...q_proj.base_layer``; the ``lora_`` tensors themselves are dropped)."""
    out: dict[str, Any] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _template_fields(template: Path) -> tuple[str, list[tuple[str, Any, Any, Any]], list[tuple[str, Any]]]:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(template))
    arch = str(reader.fields["general.architecture"].contents())
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    tensors = [(t.name, t.tensor_type) for t in reader.tensors]
    return arch, fields, tensors


def export_gguf(state: Mapping[str, Any], config: Any, template: Path, out: Path, ftype: str = "q8_0") -> Path:
    """Write ``state`` (transformers names, from ``merged_state``) as GGUF at ``out``, atomically.

    ``template`` is a GGUF of the same architecture and shapes (the packaged base model): its
    metadata and its list of tensors are kept. Raises ModelError when the model does not fit it.
    """
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, GGUFValueType
    from gguf.quants import quantize

    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {sorted(FTYPES)}")
    arch, fields, tensors = _template_fields(template)
    model_type = getattr(config, "model_type", "llama")
    if arch not in LAYER_NAMES or ARCHITECTURES.get(model_type) != arch:
        raise ModelError(f"Cannot export a {model_type} model to GGUF for llama.cpp (template: {arch}).",
                         hint="Set DOPPEL_BACKEND=transformers for this model.")
    by_gguf = {}
    for name, tensor in state.items():
        g = gguf_name(name, arch)
        if g is not None:
            by_gguf[g] = tensor
    if "output.weight" not in {n for n, _ in tensors}:
        by_gguf.pop("output.weight", None)  # tied to token_embd
    missing = [n for n, _ in tensors if n not in by_gguf]
    if missing:
        raise ModelError(f"The model lacks {len(missing)} tensors the GGUF needs, e.g. {missing[0]}.",
                         hint="Only Llama-family models with the base model's shapes can run on llama.cpp; "
                              "set DOPPEL_BACKEND=transformers.")
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "f16": GGMLQuantizationType.F16,
             "f32": GGMLQuantizationType.F32}[ftype]

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(str(tmp), arch)
        for key, value, vtype, sub in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        writer.add_key_value("general.file_type", FTYPES[ftype], GGUFValueType.UINT32)
        for name, template_type in tensors:
            w = by_gguf[name].detach().to(torch.float32).cpu().numpy()
            if arch == "llama" and name.endswith("attn_q.weight"):
                w = _to_interleaved(w, n_head)
            elif arch == "llama" and name.endswith("attn_k.weight"):
                w = _to_interleaved(w, n_kv)
            elif arch == "gemma3" and name.endswith("norm.weight"):
                w = w + 1.0
            if w.ndim == 1 or template_type == GGMLQuantizationType.F32 or w.shape[-1] % 32:
                writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
                continue
            if qtype == GGMLQuantizationType.F32:
                writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
            elif qtype == GGMLQuantizationType.F16:
                writer.add_tensor(name, w.astype(np.float16))
            else:
                writer.add_tensor(name, quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (%s, %.0f MB)", out.name, ftype, out.stat().st_size / 1e6)
    return out
