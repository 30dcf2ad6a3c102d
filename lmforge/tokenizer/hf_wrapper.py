"""`HFTokenizer`: any HF `tokenizers.Tokenizer` (e.g. MiniLM's WordPiece) behind lmforge's contract.

Byte-level BPE tokenizers load as our own `BPETokenizer`; everything else (WordPiece, Unigram,
BPE with normalizers) is served by HF's implementation through this thin wrapper, so
`load_tokenizer(minilm_dir)` gives the same interface: `encode`, `decode`, `mask_id`, ...
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import UserError
from ..io import atomic_path, ensure_writable_dir, write_json_atomic


class HFTokenizer:
    """Wraps `tokenizers.Tokenizer`; roles come from tokenizer_config.json (BERT: [CLS] is bos,
    [SEP] is eos and the document separator, [PAD], [MASK])."""

    def __init__(self, tokenizer: Any, config: Mapping[str, Any] | None = None) -> None:
        self._tokenizer = tokenizer
        # Files like MiniLM's pin truncation at 128 and padding to 128; the contract wants raw ids.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._config = dict(config or {})
        self.chat_template: str | None = self._config.get("chat_template") if isinstance(
            self._config.get("chat_template"), str) else None

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer

        from .formats import read_tokenizer_config

        folder = Path(directory)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"'{folder}' has no tokenizer.json; give an HF tokenizer directory")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"tokenizer file '{path}' could not be loaded by HF tokenizers ({error}); fix or re-export it") from None
        config_path = folder / "tokenizer_config.json"
        config = read_tokenizer_config(config_path) if config_path.is_file() else {}
        return cls(tokenizer, config)

    # --- roles ------------------------------------------------------------------------------

    def _config_token_id(self, *keys: str) -> int | None:
        for key in keys:
            value = self._config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and self._tokenizer.token_to_id(value) is not None:
                return self._tokenizer.token_to_id(value)
        return None

    @property
    def bos_id(self) -> int | None:
        return self._config_token_id("bos_token", "cls_token")

    @property
    def eos_id(self) -> int | None:
        return self._config_token_id("eos_token", "sep_token")

    @property
    def eot_id(self) -> int | None:
        return self._config_token_id("eos_token", "sep_token")

    @property
    def pad_id(self) -> int | None:
        return self._config_token_id("pad_token")

    @property
    def mask_id(self) -> int | None:
        return self._config_token_id("mask_token")

    @property
    def unk_id(self) -> int | None:
        return self._config_token_id("unk_token")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {token.content: index for index, token in self._tokenizer.get_added_tokens_decoder().items()
                if token.special}

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Ids of text; add_special_tokens=True adds the model's frame (BERT: [CLS] ... [SEP])."""
        self._tokenizer.encode_special_tokens = not allow_special
        try:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _refuse_surrogates([text])
            raise
        finally:
            self._tokenizer.encode_special_tokens = False

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        texts = list(texts)
        self._tokenizer.encode_special_tokens = not allow_special
        try:
            return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            _refuse_surrogates(texts)
            raise
        finally:
            self._tokenizer.encode_special_tokens = False

    def encode_iterable(self, lines: Iterable[str]) -> Iterator[int]:
        """Line by line (these tokenizers split on whitespace, so lines are independent)."""
        for line in lines:
            yield from self.encode(line)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Never raises: unknown ids are left out."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        known = [index for index in ids if isinstance(index, int) and 0 <= index < self.vocab_size]
        return self._tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def id_to_bytes(self, index: int) -> bytes:
        token = self._tokenizer.id_to_token(index)
        if token is None:
            raise ValueError(f"token id {index} is not in this tokenizer (vocab_size {self.vocab_size})")
        return token.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        target = ensure_writable_dir(directory)
        with atomic_path(target / "tokenizer.json") as temporary:
            self._tokenizer.save(str(temporary))
        write_json_atomic(target / "tokenizer_config.json", self._config)
        return target

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, model={type(self._tokenizer.model).__name__})"


def _refuse_surrogates(texts: list[str]) -> None:
    """HF tokenizers (Rust) take UTF-8 only and raise a bare TypeError for a lone surrogate (what
    Python makes of undecodable bytes in argv or a file read with errors="surrogateescape")."""
    for text in texts:
        try:
            if isinstance(text, str):
                text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise UserError(f"the text holds an unpaired surrogate ({error.object[error.start]!r}), which is not "
                            "valid Unicode; clean the text (e.g. decode its bytes with errors='replace')") from None
