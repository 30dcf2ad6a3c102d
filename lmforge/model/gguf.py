"""GGUF import for the Llama family (llama.cpp's file format), e.g. the bundled SmolLM2-135M-Instruct.

    model = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")      # dequantized to fp32

A GGUF file holds metadata (`llama.block_count`, `llama.rope.freq_base`, the tokenizer, the chat
template, ...) and tensors named `blk.N.attn_q.weight` etc., each stored as F32, F16 or in a
block-quantized format (Q8_0: 32 int8 values + one scale per block; Q4_0/Q4_1: 32 4-bit values
+ a scale (and a minimum)). We read it with the `gguf` package, dequantize every tensor to fp32,
rename it to its Hugging Face Llama name, and let `hf.llama`'s table build our model. So a
GGUF model and the same model in HF format load through one mapping.

RoPE layout: llama.cpp rotates adjacent channel pairs (2i, 2i+1), so its converter permutes the
rows of every head of W_q and W_k from HF's half-split layout (i, i + D/2) into that order. We
undo the permutation on load (`interleaved_to_half_split`) and keep `rope_interleaved=False`:
the imported model then has exactly the weights `transformers` builds from the same file, and
exports to HF without further changes. (Keeping GGUF's rows with `rope_interleaved=True` would
give the same outputs; one layout everywhere is simpler to reason about.)
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..gguf_file import GGUFHeader, read_gguf_header
from .builders import tied_names
from .config import ModelConfig
from .hf import LLAMA, config_from_hf, expected_shapes, import_state_dict, interleaved_to_half_split

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
DEQUANTIZABLE = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

# GGUF tensor names -> HF Llama names ({i} is the layer).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` (memory-mapped: tensors are read only when touched)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist; check the path")
    try:
        return gguf.GGUFReader(path)
    # gguf parses with numpy views over the file: damage surfaces as whichever error its bytes hit.
    except (ValueError, OSError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError,
            OverflowError, MemoryError) as error:
        raise UserError(f"'{path}' is not a readable GGUF file ({error}); re-download it") from None


def header_from_reader(reader: Any, where: str) -> GGUFHeader:
    """The header of an open `gguf.GGUFReader` (scalar metadata and tensor shapes; arrays skipped)."""
    from gguf import GGUFValueType

    try:
        values = {key: field.contents() for key, field in reader.fields.items()
                  if field.types and field.types[0] != GGUFValueType.ARRAY}
        shapes = {tensor.name: [int(n) for n in tensor.shape] for tensor in reader.tensors}
    except (UnicodeDecodeError, ValueError, IndexError) as error:
        raise UserError(f"{where} has unreadable metadata ({error}); re-download it") from None
    return GGUFHeader(values, shapes)


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Only the header: scalar metadata and tensor names/shapes (fast; arrays are skipped)."""
    return read_gguf_header(path)


def hf_config_from_gguf(header: GGUFHeader, where: str) -> dict[str, Any]:
    """The Llama hyperparameters in the GGUF metadata, as an HF LlamaConfig dict.

    Every value is type-checked (a damaged file may hold a string where a count belongs), and the
    layer count and embedding are checked against the tensors the file holds, so a bogus header
    is refused before a model is built from it."""
    meta, shapes = header.metadata, header.tensor_shapes
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(f"{where} is a '{architecture}' model; lmforge imports GGUF files of the "
                        f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} architecture only")
    prefix = f"{architecture}."

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = meta.get(prefix + key, default)
        if value is None:
            raise UserError(f"{where} lacks the metadata key '{prefix + key}'; the file is incomplete")
        valid = (type(value) is int and value >= 1) if kind is int else \
            (type(value) in (int, float) and math.isfinite(value) and value > 0)
        if not valid:
            what = "a positive integer" if kind is int else "a positive number"
            raise UserError(f"{where} has {prefix + key} = {value!r}, which is not {what}; the file is damaged")
        return value

    if meta.get(prefix + "rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"{where} uses RoPE scaling '{meta[prefix + 'rope.scaling.type']}', which is not supported")
    d_model, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", d_model // n_heads or 1)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{where} applies RoPE to part of each head only, which is not supported")
    embedding = shapes.get("token_embd.weight")
    if embedding is None or len(embedding) != 2:
        raise UserError(f"{where} has no 2-D token_embd.weight tensor; the file is incomplete")
    vocab_size = get("vocab_size", embedding[1])
    if embedding != [d_model, vocab_size]:
        raise UserError(f"{where}: token_embd.weight has shape {embedding} but the metadata implies "
                        f"{[d_model, vocab_size]}; the file is damaged")
    n_layers = get("block_count")
    layers = {name.split(".")[1] for name in shapes if name.startswith("blk.")}
    if n_layers > len(layers):
        raise UserError(f"{where} says {prefix}block_count = {n_layers} but holds tensors for {len(layers)} layers; "
                        "the file is damaged")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": d_model, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads), "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": float(get("rope.freq_base", 10000.0, kind=float)),
        # Without a separate output matrix the model reuses the embedding (tied weights).
        "tie_word_embeddings": "output.weight" not in shapes,
        "pad_token_id": pad if type(pad) is int else None,
    }


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its header only (fast; no tensor is read)."""
    return config_from_hf(hf_config_from_gguf(read_header(path), f"'{path}'"), f"'{path}'")


def dequantize(tensor: Any, path: Path) -> torch.Tensor:
    """One GGUF tensor -> fp32 [rows, columns] (GGUF lists dims fastest-first: [columns, rows])."""
    from gguf.quants import dequantize as gguf_dequantize

    kind = tensor.tensor_type.name
    if kind not in DEQUANTIZABLE:
        raise UserError(f"tensor '{tensor.name}' in '{path}' is {kind}; lmforge dequantizes "
                        f"{', '.join(DEQUANTIZABLE)} only (re-quantize the model to one of them)")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = gguf_dequantize(tensor.data, tensor.tensor_type)
        return torch.from_numpy(values.astype("float32", copy=False).reshape(shape).copy())
    except (ValueError, TypeError, IndexError, AssertionError) as error:   # data that does not fit the shape
        raise UserError(f"tensor '{tensor.name}' in '{path}' cannot be dequantized to shape {list(shape)} "
                        f"({error}); the file is damaged -- re-download it") from None


def hf_state_from_gguf(reader: Any, config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized and renamed to HF Llama names, q/k rows in HF's half-split order."""
    templates = {}
    for gguf_name, hf_name in GGUF_TO_HF.items():
        for i in range(config.n_layers if "{i}" in gguf_name else 1):
            templates[gguf_name.format(i=i)] = hf_name.format(i=i)
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in templates:
            continue  # e.g. rope_freqs.weight, which plain RoPE does not use
        weight = dequantize(tensor, path)
        heads = {"attn_q.weight": config.n_heads, "attn_k.weight": config.n_kv_heads}.get(tensor.name.split(".", 2)[-1])
        # A q/k matrix of the wrong size is left as it is: import_state_dict names the mismatch.
        if heads is not None and weight.shape[0] % (2 * heads) == 0:
            weight = interleaved_to_half_split(weight, heads)
        state[templates[tensor.name]] = weight
    return state


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, reader: Any = None) -> nn.Module:
    """A Llama-family GGUF file -> our GPT (eval mode) with dequantized weights.

    `reader`: an already opened `gguf.GGUFReader` of `path` (opening one takes seconds)."""
    from .builders import build_model

    path = Path(path)
    reader = reader if reader is not None else open_gguf(path)
    where = f"'{path}'"
    config = config_from_hf(hf_config_from_gguf(header_from_reader(reader, where), where), where)
    hf_state = hf_state_from_gguf(reader, config, path)
    # Names and shapes are checked against a meta-device model first: nothing is allocated for a
    # header that does not match the tensors.
    ours, _ = import_state_dict(hf_state, config, LLAMA, expected_shapes(config), dict.fromkeys(hf_state, path))
    model = build_model(config)
    result = model.load_state_dict(ours, strict=False)
    if set(result.missing_keys) - tied_names(model) or result.unexpected_keys:
        raise RuntimeError(f"GGUF mapping incomplete: {result}")
    return model.to(dtype).eval()

