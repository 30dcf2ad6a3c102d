"""The byte-level BPE tokenizer stored in a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF holds the vocabulary as byte-level strings (`tokenizer.ggml.tokens`, one per id), the
ranked merges ("Ġ t"), a type per token (1 normal, 3 control, 4 user-defined), the bos/eos/pad
ids, the chat template, and a *name* for the pre-tokenizer (`tokenizer.ggml.pre`) rather than the
regex itself. The names we know map to a regex (and whether digits are split first), following
llama.cpp: SmolLM2 says "smollm", which is GPT-2's regex after splitting every digit off.

Reading: for a path, `lmforge.gguf_file` reads just the metadata section (fast); an open
`gguf.GGUFReader` (the model loader's) can be passed too. Either way this module returns
`BPEParts`, which `BPETokenizer.from_gguf` builds the tokenizer from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..gguf_file import read_gguf_header
from .parts import BPEParts, NotByteLevelBPE, parts_from_strings
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
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def _metadata(source: Any) -> tuple[dict[str, Any], str]:
    try:
        import gguf
        if isinstance(source, gguf.GGUFReader):
            try:
                return {key: field.contents() for key, field in source.fields.items()}, "GGUF file"
            except (UnicodeDecodeError, ValueError, IndexError) as error:
                raise UserError(f"the GGUF file's metadata cannot be read ({error}); re-download it") from None
    except ImportError:
        pass
    path = Path(source)
    return read_gguf_header(path, arrays=("tokenizer.",), tensors=False).metadata, str(path)


def _list_of(metadata: dict[str, Any], key: str, kind: type, name: str, default: list | None = None) -> list:
    """A metadata array whose items are all of `kind`, or a UserError naming the key."""
    value = metadata.get(key, default if default is not None else [])
    if not isinstance(value, list) or not all(isinstance(item, kind) and not isinstance(item, bool) for item in value):
        raise UserError(f"'{key}' in '{name}' is not a list of {kind.__name__}s; the file is damaged -- re-download it")
    return value


def read_gguf_tokenizer(source: Any, split_digits: bool | None = None) -> BPEParts:
    """The tokenizer's parts. source: a .gguf path, or an open `gguf.GGUFReader`.

    split_digits=None follows the file's pre-tokenizer name. transformers' GGUF loader does not
    know "smollm" and falls back to plain GPT-2 pre-tokenization; split_digits=False matches it.
    """
    metadata, name = _metadata(source)
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"the tokenizer in '{name}' is {model!r}, not a byte-level BPE ('gpt2'); "
                        "only byte-level BPE GGUF tokenizers can be imported")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"the GGUF pre-tokenizer {pre!r} in '{name}' is not supported; "
                        f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    pattern, digits_first = GGUF_PRE_TOKENIZERS[pre]
    split_digits = digits_first if split_digits is None else split_digits

    tokens: list[str] = _list_of(metadata, "tokenizer.ggml.tokens", str, name)
    if not tokens:
        raise UserError(f"'{name}' has no tokenizer vocabulary (tokenizer.ggml.tokens); it holds no usable tokenizer")
    token_types: list[int] = _list_of(metadata, "tokenizer.ggml.token_type", int, name, [_NORMAL] * len(tokens))
    merge_strings: list[str] = _list_of(metadata, "tokenizer.ggml.merges", str, name)
    merges = [tuple(merge.split(" ")) for merge in merge_strings]
    if any(len(merge) != 2 for merge in merges):
        raise UserError(f"a merge in '{name}' is not two tokens separated by a space; the file is damaged")
    # Control and user-defined tokens are matched whole in the text, like HF added tokens.
    specials = {token: index for index, (token, kind) in enumerate(zip(tokens, token_types))
                if kind in (_CONTROL, _USER_DEFINED)}
    vocab = {token: index for index, token in enumerate(tokens)}

    def token_of(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    template = metadata.get("tokenizer.chat_template")
    config = {"bos_token": token_of("bos_token_id"), "eos_token": token_of("eos_token_id"),
              "pad_token": token_of("padding_token_id"),
              "chat_template": template if isinstance(template, str) else None}
    try:
        return parts_from_strings(vocab, merges, specials, pattern, split_digits, config, f"GGUF file '{name}'")
    except NotByteLevelBPE as error:
        raise UserError(f"the tokenizer in GGUF file '{name}' is not byte-level BPE ({error})") from None
