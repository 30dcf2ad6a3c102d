"""How well a tokenizer compresses some text: bytes per token and how much of the vocabulary is used."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .loading import Tokenizer


@dataclass
class TokenizerStats:
    name: str
    vocab_size: int
    num_bytes: int       # UTF-8 bytes of the input
    num_tokens: int
    distinct_ids: int    # how many different ids the input used

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(self.num_tokens, 1)

    @property
    def vocab_used(self) -> float:
        """Fraction of the vocabulary that appears at least once."""
        return self.distinct_ids / max(self.vocab_size, 1)


def measure(tokenizer: Tokenizer, files: Sequence[Path], name: str) -> TokenizerStats:
    """Encode every file (streaming, each file a document) and count."""
    num_bytes = num_tokens = 0
    seen: set[int] = set()
    for path in files:
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                for index in tokenizer.encode_iterable(handle):
                    num_tokens += 1
                    seen.add(index)
        except UnicodeDecodeError as error:  # the same sentence as `tokenizer train` gives
            raise UserError(f"input file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}); "
                            "convert it to UTF-8 first") from None
        num_bytes += path.stat().st_size  # the file's bytes are the UTF-8 bytes of its text
    return TokenizerStats(name, tokenizer.vocab_size, num_bytes, num_tokens, len(seen))
