"""GGUF import for the Llama family (llama.cpp's file format), e.g. the bundled SmolLM2-135M-Instruct.

    model = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")      # dequantized to fp32

A GGUF file holds metadata (`llama.block_count`, `llama.rope.freq_base`, the tokenizer, the chat
template, ...) and tensors named `blk.N.attn_q.weight` etc., each stored as F32, F16 or in a
block-quantized format (Q8_0: 32 int8 values + one scale per block; Q4_0/Q4_1: 32 4-bit values
+ a scale (and a minimum)). We read it with the `gguf` package, dequantize every tensor to fp32,
rename it to its Hugging Face Llama name, and let `hf.py`'s Llama table build our model. So a
GGUF model and the same model in HF format load through one mapping.

RoPE layout: llama.cpp rotates adjacent channel pairs (2i, 2i+1), so its converter permutes the
rows of every head of W_q and W_k from HF's half-split layout (i, i + D/2) into that order. We
undo the permutation on load (`interleaved_to_half_split`) and keep `rope_interleaved=False`:
the imported model then has exactly the weights `transformers` builds from the same file, and
exports to HF without further changes. (Keeping GGUF's rows with `rope_interleaved=True` would
give the same outputs; one layout everywhere is simpler to reason about.)
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .config import ModelConfig
from .builders import tied_names
from .hf import LLAMA, config_from_hf, import_state_dict, interleaved_to_half_split

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
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise UserError(f"'{path}' is not a readable GGUF file ({error}); re-download it") from None


@dataclass
class GGUFHeader:
    """A GGUF file's scalar metadata and tensor shapes (GGUF order: fastest dimension first)."""

    metadata: dict[str, Any]
    tensor_shapes: dict[str, list[int]]

    @classmethod
    def from_reader(cls, reader: Any) -> "GGUFHeader":
        from gguf import GGUFValueType

        values = {key: field.contents() for key, field in reader.fields.items()
                  if field.types and field.types[0] != GGUFValueType.ARRAY}
        return cls(values, {tensor.name: [int(n) for n in tensor.shape] for tensor in reader.tensors})


# GGUF value type -> struct format (little-endian). 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Read only the header: scalar metadata and tensor names/shapes; arrays are skipped.

    `gguf.GGUFReader` also builds a numpy view for every one of the ~100k tokenizer strings,
    which takes seconds; `lmforge model info` needs a dozen numbers. Layout (GGUF v2/v3):
    magic "GGUF", u32 version, u64 tensor count, u64 key/value count, then each key (u64 length
    + UTF-8) with a u32 value type and the value, then each tensor's name, u32 n_dims, u64 dims,
    u32 type and u64 offset.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist; check the path")
    if path.stat().st_size < 24:
        raise UserError(f"'{path}' is not a readable GGUF file (it is {path.stat().st_size} bytes); re-download it")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0

        def take(fmt: str) -> Any:
            nonlocal offset
            (value,) = struct.unpack_from(fmt, data, offset)
            offset += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal offset
            length = take("<Q")
            if offset + length > len(data):
                raise struct.error("a string runs past the end of the file")
            offset += length
            return bytes(data[offset - length:offset]).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == _STRING:
                return string()
            if kind in _SCALAR_FORMATS:
                return take(_SCALAR_FORMATS[kind])
            if kind != _ARRAY:
                raise ValueError(f"unknown value type {kind}")
            item_kind, count = take("<I"), take("<Q")
            if item_kind == _STRING:
                for _ in range(count):
                    length = take("<Q")   # (not `offset += take(...)`: take moves offset first)
                    offset += length
            elif item_kind in _SCALAR_FORMATS:
                offset += count * struct.calcsize(_SCALAR_FORMATS[item_kind])
            else:
                raise ValueError(f"unsupported array item type {item_kind}")
            return None  # arrays (the tokenizer's vocabulary and merges) are not needed here

        try:
            if data[:4] != b"GGUF" or take("<4xI") not in (2, 3):
                raise ValueError("not a GGUF v2/v3 little-endian file")
            tensor_count, kv_count = take("<Q"), take("<Q")
            metadata = {}
            for _ in range(kv_count):
                key, kind = string(), take("<I")
                item = value(kind)
                if item is not None:
                    metadata[key] = item
            shapes = {}
            for _ in range(tensor_count):
                name, n_dims = string(), take("<I")
                shapes[name] = [take("<Q") for _ in range(n_dims)]
                offset += 4 + 8  # tensor type and data offset
        except struct.error:
            raise UserError(f"'{path}' is not a readable GGUF file (its header is truncated); re-download it") from None
        except ValueError as error:
            raise UserError(f"'{path}' is not a readable GGUF file ({error}); re-download it") from None
    return GGUFHeader(metadata, shapes)


def hf_config_from_gguf(header: GGUFHeader, where: str) -> dict[str, Any]:
    """The Llama hyperparameters in the GGUF metadata, as an HF LlamaConfig dict."""
    meta = header.metadata
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(f"{where} is a '{architecture}' model; lmforge imports GGUF files of the "
                        f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} architecture only")
    prefix = f"{architecture}."

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(prefix + key, default)
        if value is None:
            raise UserError(f"{where} lacks the metadata key '{prefix + key}'; the file is incomplete")
        return value

    if meta.get(prefix + "rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"{where} uses RoPE scaling '{meta[prefix + 'rope.scaling.type']}', which is not supported")
    d_model, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = meta.get(prefix + "attention.key_length") or d_model // n_heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{where} applies RoPE to part of each head only, which is not supported")
    if "token_embd.weight" not in header.tensor_shapes:
        raise UserError(f"{where} has no token_embd.weight tensor; the file is incomplete")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get(prefix + "vocab_size") or header.tensor_shapes["token_embd.weight"][1],
        "hidden_size": d_model, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads), "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        # Without a separate output matrix the model reuses the embedding (tied weights).
        "tie_word_embeddings": "output.weight" not in header.tensor_shapes,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
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
    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(values.astype("float32", copy=False).reshape(shape).copy())


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
        if tensor.name.endswith("attn_q.weight"):
            weight = interleaved_to_half_split(weight, config.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = interleaved_to_half_split(weight, config.n_kv_heads)
        state[templates[tensor.name]] = weight
    return state


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, reader: Any = None) -> nn.Module:
    """A Llama-family GGUF file -> our GPT (eval mode) with dequantized weights.

    `reader`: an already opened `gguf.GGUFReader` of `path` (opening one takes seconds)."""
    from .builders import build_model

    path = Path(path)
    reader = reader if reader is not None else open_gguf(path)
    where = f"'{path}'"
    config = config_from_hf(hf_config_from_gguf(GGUFHeader.from_reader(reader), where), where)
    model = build_model(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    hf_state = hf_state_from_gguf(reader, config, path)
    ours, _ = import_state_dict(hf_state, config, LLAMA, expected, dict.fromkeys(hf_state, path))
    result = model.load_state_dict(ours, strict=False)
    if set(result.missing_keys) - tied_names(model) or result.unexpected_keys:
        raise RuntimeError(f"GGUF mapping incomplete: {result}")
    return model.to(dtype).eval()

