"""The data of a byte-level BPE tokenizer, as the file formats read and write it.

Imports go one way: the format modules (`formats`, `gguf_import`) read files into `BPEParts`
and write anything shaped like `BPEData`; `bpe.BPETokenizer` builds itself from `BPEParts` and
calls the writers with itself. No format module imports `bpe`, so there is no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from .byte_level import token_string_to_bytes
from .special_tokens import ENDOFTEXT, MASK, PAD, chat_template_for

ROLES = ("bos", "eos", "pad", "mask")


class NotByteLevelBPE(ValueError):
    """The tokenizer file is valid but describes something BPETokenizer cannot reproduce exactly."""


class BPEData(Protocol):
    """What a writer needs of a tokenizer: `BPETokenizer` and `BPEParts` both have it."""

    vocab: dict[bytes, int]
    merges: list[tuple[bytes, bytes]]
    pattern: str
    split_digits: bool
    chat_template: str | None

    @property
    def special_tokens(self) -> dict[str, int]: ...

    @property
    def roles(self) -> dict[str, str | None]: ...


@dataclass
class BPEParts:
    """Everything `BPETokenizer(...)` takes, read from a file; `source` names it in errors."""

    vocab: dict[bytes, int]
    merges: list[tuple[bytes, bytes]]
    special_tokens: dict[str, int]
    pattern: str
    split_digits: bool
    chat_template: str | None
    roles: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ROLES))
    source: str = "tokenizer"


def _role(config: Mapping[str, Any], key: str, specials: Mapping[str, int]) -> str | None:
    """A role token from tokenizer_config.json (a string or an AddedToken dict), if it is special."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value in specials else None


def chat_template_from_config(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def parts_from_strings(vocab_strings: Mapping[str, int], merges: Sequence[tuple[str, str]],
                       special_tokens: Mapping[str, int], pattern: str, split_digits: bool,
                       config: Mapping[str, Any] | None, source: str) -> BPEParts:
    """Parts from byte-level token strings ("Ġthe"); specials are taken out of the vocab.

    config: a tokenizer_config.json-like dict (roles + chat template); None means lmforge's own
    role names and the chat template its special tokens imply. Raises NotByteLevelBPE when a token
    is not written in the byte-level alphabet.
    """
    try:
        vocab = {token_string_to_bytes(text): index for text, index in vocab_strings.items()
                 if text not in special_tokens}
        byte_merges = [(token_string_to_bytes(left), token_string_to_bytes(right)) for left, right in merges]
    except KeyError as error:
        raise NotByteLevelBPE(f"token character {error.args[0]!r} is outside the byte-level alphabet") from None
    config = config or {}
    if config:
        roles = {key: _role(config, f"{key}_token", special_tokens) for key in ROLES}
    else:  # no config: recognise lmforge's own names
        roles = {"bos": None, "eos": ENDOFTEXT if ENDOFTEXT in special_tokens else None,
                 "pad": PAD if PAD in special_tokens else None, "mask": MASK if MASK in special_tokens else None}
    template = chat_template_from_config(config) if config else chat_template_for(special_tokens)
    return BPEParts(vocab, byte_merges, dict(special_tokens), pattern, split_digits, template, roles, source)
