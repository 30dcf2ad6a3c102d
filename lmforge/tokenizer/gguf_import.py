"""The byte-level BPE tokenizer stored in a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF holds the vocabulary as byte-level strings (`tokenizer.ggml.tokens`, one per id), the
ranked merges ("Ġ t"), a type per token (1 normal, 3 control, 4 user-defined), the bos/eos/pad
ids, the chat template, and a *name* for the pre-tokenizer (`tokenizer.ggml.pre`) rather than the
regex itself. The names we know map to a regex (and whether digits are split first), following
llama.cpp: SmolLM2 says "smollm", which is GPT-2's regex after splitting every digit off.

Reading: `gguf.GGUFReader` parses every array element into numpy views, which takes seconds for
a 49k-token vocabulary, so for a path we read just the metadata section ourselves (the format
is a short header and a list of typed key/value pairs). An open GGUFReader can be passed too.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import UserError
from .bpe import BPETokenizer
from .formats import NotByteLevelBPE, tokenizer_from_parts
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN

# tokenizer.ggml.pre -> (regex, split digits first), as llama.cpp's llama-vocab.cpp defines them.
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": (GPT2_PATTERN, False),
    "gpt2": (GPT2_PATTERN, False),
    "smollm": (GPT2_PATTERN, True),
    "starcoder": (GPT2_PATTERN, True),
    "refact": (GPT2_PATTERN, True),
    "llama3": (GPT4_PATTERN, False),
    "llama-bpe": (GPT4_PATTERN, False),
    "llama-v3": (GPT4_PATTERN, False),
}
_CONTROL, _USER_DEFINED = 3, 4

# GGUF value types (gguf.GGUFValueType) -> struct format of one little-endian scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its metadata")
    return data


def _read_value(handle: BinaryIO, value_type: int) -> Any:
    if value_type == _STRING:
        (length,) = struct.unpack("<Q", _read(handle, 8))
        return _read(handle, length).decode("utf-8", errors="replace")
    if value_type == _ARRAY:
        item_type, count = struct.unpack("<IQ", _read(handle, 12))
        if item_type in _SCALARS:  # one read for the whole numeric array
            fmt = _SCALARS[item_type]
            return list(struct.unpack(f"<{count}{fmt}", _read(handle, count * struct.calcsize(fmt))))
        return [_read_value(handle, item_type) for _ in range(count)]
    if value_type in _SCALARS:
        fmt = "<" + _SCALARS[value_type]
        return struct.unpack(fmt, _read(handle, struct.calcsize(fmt)))[0]
    raise ValueError(f"unknown GGUF value type {value_type}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """All key/value pairs of a (little-endian, version 2 or 3) GGUF file; tensors are skipped."""
    with open(path, "rb") as handle:
        magic, version = struct.unpack("<4sI", _read(handle, 8))
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
        _tensor_count, kv_count = struct.unpack("<QQ", _read(handle, 16))
        metadata = {}
        for _ in range(kv_count):
            key = _read_value(handle, _STRING)
            (value_type,) = struct.unpack("<I", _read(handle, 4))
            metadata[key] = _read_value(handle, value_type)
    return metadata


def _metadata(source: Any) -> tuple[dict[str, Any], str]:
    try:
        import gguf
        if isinstance(source, gguf.GGUFReader):
            return {key: field.contents() for key, field in source.fields.items()}, "GGUF file"
    except ImportError:
        pass
    path = Path(source)
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist; check the path")
    try:
        return read_gguf_metadata(path), str(path)
    except (ValueError, OSError, struct.error) as error:
        raise UserError(f"'{path}' is not a readable GGUF file ({error}); check the file") from None


def from_gguf(source: Any, split_digits: bool | None = None) -> BPETokenizer:
    """source: a .gguf path, or an open `gguf.GGUFReader` (e.g. the model loader's).

    split_digits=None follows the file's pre-tokenizer name. transformers' GGUF loader does not
    know "smollm" and falls back to plain GPT-2 pre-tokenization; split_digits=False matches it.
    """
    metadata, name = _metadata(source)
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"the tokenizer in '{name}' is {model!r}, not a byte-level BPE ('gpt2'); "
                        "only byte-level BPE GGUF tokenizers can be imported")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"the GGUF pre-tokenizer {pre!r} in '{name}' is not supported; "
                        f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    pattern, digits_first = GGUF_PRE_TOKENIZERS[pre]
    split_digits = digits_first if split_digits is None else split_digits

    tokens: list[str] = metadata.get("tokenizer.ggml.tokens", [])
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges", [])]
    # Control and user-defined tokens are matched whole in the text, like HF added tokens.
    specials = {token: index for index, (token, kind) in enumerate(zip(tokens, token_types))
                if kind in (_CONTROL, _USER_DEFINED)}
    vocab = {token: index for index, token in enumerate(tokens)}

    def token_of(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config = {"bos_token": token_of("bos_token_id"), "eos_token": token_of("eos_token_id"),
              "pad_token": token_of("padding_token_id"),
              "chat_template": metadata.get("tokenizer.chat_template")}
    try:
        return tokenizer_from_parts(vocab, merges, specials, pattern, split_digits, config, f"GGUF file '{name}'")
    except NotByteLevelBPE as error:
        raise UserError(f"the tokenizer in GGUF file '{name}' is not byte-level BPE ({error})") from None
