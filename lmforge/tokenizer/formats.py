"""Reading and writing other tokenizer formats: HF `tokenizer.json`, GPT-2 files, tiktoken.

All of them write byte tokens with GPT-2's printable byte alphabet (see `byte_level`).
A saved lmforge tokenizer is an HF directory: `tokenizer.json` (vocab, merges, special tokens,
pre-tokenizer) and `tokenizer_config.json` (special-token roles and the chat template), so
`tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast` load it directly.

Readers return `BPEParts` and writers take any `BPEData` (see `parts`); `BPETokenizer` builds
itself from the parts, so this module never imports `bpe`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UserError
from ..io import atomic_open, ensure_writable_dir, read_json, write_json_atomic
from .byte_level import bytes_to_token_string, is_byte_level_string
from .parts import BPEData, BPEParts, NotByteLevelBPE, parts_from_strings
from .pretokenize import GPT2_PATTERN
from .special_tokens import DEFAULT_SPECIAL_TOKENS

__all__ = ["NotByteLevelBPE", "read_hf_json", "read_hf_directory", "read_gpt2_files", "read_tokenizer_config",
           "save_hf_directory", "save_gpt2_files", "to_hf_json", "to_tiktoken"]


# --- HF tokenizer.json ------------------------------------------------------------------------

def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _pre_tokenizer_json(tokenizer: BPEData) -> dict[str, Any]:
    """GPT-2's regex is HF's ByteLevel(use_regex=True); any other regex is an explicit Split."""
    steps = [{"type": "Digits", "individual_digits": True}] if tokenizer.split_digits else []
    if tokenizer.pattern == GPT2_PATTERN:
        steps.append(_byte_level(use_regex=True))
    else:
        steps.append({"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False})
        steps.append(_byte_level(use_regex=False))
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def to_hf_json(tokenizer: BPEData) -> dict[str, Any]:
    """The `tokenizer.json` document (as a dict) of a tokenizer."""
    vocab = {bytes_to_token_string(token): index for token, index in sorted(tokenizer.vocab.items(), key=lambda item: item[1])}
    # Specials go in the model vocab too (as HF does): without them, a tokenizer whose specials are
    # not the last ids (SmolLM2's are 0..16) would get them renumbered when HF loads the file.
    vocab.update(tokenizer.special_tokens)
    added = [{"id": index, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for text, index in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(tokenizer),
        "post_processor": None,
        "decoder": _byte_level(use_regex=True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [[bytes_to_token_string(left), bytes_to_token_string(right)] for left, right in tokenizer.merges],
        },
    }


def _tokenizer_config(tokenizer: BPEData) -> dict[str, Any]:
    roles = tokenizer.roles
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": roles["bos"],
        "eos_token": roles["eos"],
        "pad_token": roles["pad"],
        "mask_token": roles["mask"],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": tokenizer.chat_template,
    }


def save_hf_directory(tokenizer: BPEData, directory: str | os.PathLike) -> Path:
    target = ensure_writable_dir(directory)
    write_json_atomic(target / "tokenizer.json", to_hf_json(tokenizer), indent=None)
    write_json_atomic(target / "tokenizer_config.json", _tokenizer_config(tokenizer))
    return target


def _parse_pre_tokenizer(spec: Mapping[str, Any] | None) -> tuple[str, bool]:
    """(regex, split_digits) from an HF pre_tokenizer, or NotByteLevelBPE."""
    if spec is None:
        raise NotByteLevelBPE("it has no pre-tokenizer (a byte-level BPE needs ByteLevel)")
    steps = list(spec["pretokenizers"]) if spec.get("type") == "Sequence" else [spec]
    split_digits = False
    if steps and steps[0].get("type") == "Digits":
        if not steps[0].get("individual_digits"):
            raise NotByteLevelBPE("its Digits pre-tokenizer groups digits (only individual digits are supported)")
        split_digits = True
        steps = steps[1:]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise NotByteLevelBPE("its pre-tokenizer does not end with ByteLevel(add_prefix_space=false)")
    byte_level, splits = steps[-1], steps[:-1]
    if not splits and byte_level.get("use_regex", True):
        return GPT2_PATTERN, split_digits
    if len(splits) == 1 and not byte_level.get("use_regex", True):
        split = splits[0]
        pattern = split.get("pattern", {}).get("Regex")
        if (split.get("type") == "Split" and isinstance(pattern, str) and pattern
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return pattern, split_digits
    raise NotByteLevelBPE(f"its pre-tokenizer {json.dumps(spec)[:200]} is not one we reproduce")


def read_hf_json(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> BPEParts:
    """The parts of a byte-level BPE `tokenizer.json`; NotByteLevelBPE for anything else."""
    data = read_json(path, "tokenizer file")
    try:
        vocab, merges, specials, pattern, split_digits = _parse_hf_document(data, path)
    except NotByteLevelBPE:
        raise   # a valid file of another kind: the caller falls back to HF's implementation
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # Valid JSON of the wrong shape (a list, an added token without "content", ...).
        raise _malformed(path, f"{type(error).__name__}: {error}") from None
    return parts_from_strings(vocab, merges, specials, pattern, split_digits, config, f"tokenizer file '{path}'")


def _malformed(path: str | os.PathLike, detail: str) -> UserError:
    return UserError(f"tokenizer file '{path}' is not a well-formed tokenizer.json ({detail}); "
                     "re-export it, or retrain it with `lmforge tokenizer train`")


def _parse_hf_document(data: Any, path: str | os.PathLike
                       ) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], str, bool]:
    """(vocab, merges, special tokens, regex, split_digits) of a tokenizer.json document.

    Raises NotByteLevelBPE for a tokenizer we do not reproduce; a document of the wrong shape
    raises AttributeError, KeyError, TypeError or ValueError, which the caller turns into one UserError.
    """
    if not isinstance(data, dict):
        raise TypeError(f"the document is a JSON {type(data).__name__}, not an object")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise NotByteLevelBPE(f"its model is {model.get('type')!r}, not BPE")
    if data.get("normalizer") is not None:
        raise NotByteLevelBPE("it has a normalizer")
    unsupported = {key: model.get(key) for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout")
                   if model.get(key)}
    unsupported.update({key: True for key in ("byte_fallback", "ignore_merges") if model.get(key)})
    if unsupported:
        raise NotByteLevelBPE(f"its BPE model uses {sorted(unsupported)}")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotByteLevelBPE("its decoder is not ByteLevel")
    pattern, split_digits = _parse_pre_tokenizer(data.get("pre_tokenizer"))
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TypeError("added_tokens is not a list")
    if any(token.get(flag) for token in added for flag in ("lstrip", "rstrip", "single_word")):
        raise NotByteLevelBPE("an added token strips spaces or matches single words only")
    specials = {token["content"]: token["id"] for token in added}
    vocab = dict(model.get("vocab", {}))
    if not all(isinstance(text, str) and type(index) is int for text, index in [*vocab.items(), *specials.items()]):
        raise TypeError("a vocabulary or added token is not a string with an integer id")
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model.get("merges", [])]
    if any(len(merge) != 2 or not all(isinstance(part, str) for part in merge) for merge in merges):
        raise UserError(f"tokenizer file '{path}' has a malformed merge; each merge must be two tokens")
    return vocab, merges, specials, pattern, split_digits


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict (roles, chat template), with a clear error if it is not one."""
    config = read_json(path, "tokenizer config")
    if not isinstance(config, dict):
        raise UserError(f"tokenizer config '{path}' is a JSON {type(config).__name__}, not an object; "
                        "re-export it (or delete it to use lmforge's default roles)")
    return config


def read_hf_directory(directory: str | os.PathLike) -> BPEParts:
    """The parts of an HF tokenizer directory (tokenizer.json + optional tokenizer_config.json)."""
    folder = Path(directory)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"'{folder}' has no tokenizer.json; give a directory written by `lmforge tokenizer train`")
    config_path = folder / "tokenizer_config.json"
    config = read_tokenizer_config(config_path) if config_path.is_file() else None
    return read_hf_json(folder / "tokenizer.json", config)


# --- GPT-2 vocab.json + merges.txt ------------------------------------------------------------

def save_gpt2_files(tokenizer: BPEData, directory: str | os.PathLike) -> tuple[Path, Path]:
    """vocab.json maps byte-level strings (and special tokens, as GPT-2 does) to ids."""
    target = ensure_writable_dir(directory)
    vocab = {bytes_to_token_string(token): index for token, index in tokenizer.vocab.items()}
    vocab.update(tokenizer.special_tokens)
    vocab_path, merges_path = target / "vocab.json", target / "merges.txt"
    write_json_atomic(vocab_path, dict(sorted(vocab.items(), key=lambda item: item[1])), indent=None)
    with atomic_open(merges_path, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        for left, right in tokenizer.merges:
            handle.write(f"{bytes_to_token_string(left)} {bytes_to_token_string(right)}\n")
    return vocab_path, merges_path


def read_gpt2_files(vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                    special_tokens: Sequence[str] | None = None) -> BPEParts:
    """Special tokens: the ones named, else lmforge's defaults found in vocab.json, plus any
    entry that is not written in the byte alphabet (it cannot be a BPE token)."""
    vocab = read_json(vocab_path, "vocab file")
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"vocab file '{vocab_path}' must be a non-empty JSON object of token -> id")
    if not all(type(index) is int for index in vocab.values()):
        raise UserError(f"vocab file '{vocab_path}' maps a token to something other than an integer id; fix the file")
    merges_file = Path(merges_path)
    if not merges_file.is_file():
        raise UserError(f"merges file '{merges_file}' does not exist; check the path")
    try:
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"merges file '{merges_file}' is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "re-export it") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"merges file '{merges_file}' line {number} is not two tokens separated by a space; fix the file")
        merges.append((parts[0], parts[1]))
    named = DEFAULT_SPECIAL_TOKENS if special_tokens is None else tuple(special_tokens)
    specials = {text: index for text, index in vocab.items() if text in named or not is_byte_level_string(text)}
    config = None  # lmforge's role names apply
    try:
        return parts_from_strings(vocab, merges, specials, GPT2_PATTERN, False, config, f"GPT-2 files '{vocab_path}'")
    except NotByteLevelBPE as error:
        raise UserError(f"GPT-2 files '{vocab_path}' are not byte-level BPE ({error})") from None


# --- tiktoken ---------------------------------------------------------------------------------

def to_tiktoken(tokenizer: BPEData, name: str = "lmforge"):
    """A tiktoken.Encoding with the same ids.

    tiktoken merges the adjacent pair whose *concatenation has the lowest id*, so it agrees with
    merge-rank BPE only when ids grow with merge rank and every token is a byte or a merge
    result. Our trained tokenizers are built that way; GPT-2's files are too.
    """
    import tiktoken

    if tokenizer.split_digits:
        raise UserError("this tokenizer splits digits before its regex, which tiktoken cannot express; "
                        "export it as tokenizer.json instead")
    if any(bytes([byte]) not in tokenizer.vocab for byte in range(256)):
        raise UserError("this tokenizer's vocabulary lacks some single bytes, which tiktoken requires; "
                        "export it as tokenizer.json instead")
    merged_ids = [tokenizer.vocab[left + right] for left, right in tokenizer.merges]
    if any(earlier >= later for earlier, later in zip(merged_ids, merged_ids[1:])) \
            or len(tokenizer.vocab) != 256 + len(tokenizer.merges):
        raise UserError("this tokenizer's ids are not in merge order, so tiktoken (which merges by id) "
                        "would encode differently; export it as tokenizer.json instead")
    return tiktoken.Encoding(name=name, pat_str=tokenizer.pattern, mergeable_ranks=dict(tokenizer.vocab),
                             special_tokens=tokenizer.special_tokens)
