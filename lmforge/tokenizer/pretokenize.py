"""Pre-tokenization: cut text into pieces that BPE then encodes one at a time.

Merges never cross a piece boundary, so the pieces decide what a token can be (" the" can be one
token, "e t" cannot). Three steps, in the order every encoder and the trainer apply them:

1. Special tokens (`<|endoftext|>`, ...) are cut out first, longest first, and never split.
2. Optionally every digit becomes its own piece (SmolLM2 and StarCoder do this).
3. A regex cuts the rest: GPT-2's by default, or the GPT-4 style one (cl100k, also Llama 3's).

Speed: the `regex` module is the slow part of both training and encoding (~4 MB/s on GPT-2's
pattern). Most text is made of the same few thousand words, so we first cut text into *segments*
("  word," or " the") with a much simpler stdlib `re` pattern, at points where cutting provably
cannot change the pieces, and run the full regex once per distinct segment.

The same reasoning gives *safe cut points* for streams: streaming training and `encode_iterable`
cut there, so they hold a bounded buffer yet match `encode(whole_text)` exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import regex

# GPT-2 (also the HF `ByteLevel` pre-tokenizer's regex).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4 (cl100k_base) in its classic spelling, which is also Llama 3's: case-insensitive
# contractions, numbers in groups of at most 3 digits, newlines kept apart from other spaces.
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The characters `regex` calls \s, spelled out for stdlib `re` (whose \s also has \x1c-\x1f).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# Segments: cut wherever a non-space character is followed by a space character.
# GPT-2: no piece holds a non-space followed by a space, and whatever matched up to the cut reads
#   a space exactly as it reads the end of the text (letters, digits and punctuation runs all stop
#   at both; contractions like 're fail on both). The regex never looks behind, so the right side
#   matches as in the whole. Digits are split off before the regex and never sit at a cut.
# GPT-4: the same, except that punctuation swallows following newlines (` ?[^\s\p{L}\p{N}]+[\r\n]*`),
#   so after anything but an ASCII letter or digit a newline is not a cut point.
_SEGMENTS = {
    GPT2_PATTERN: re.compile(rf"[{WHITESPACE}]*[^{WHITESPACE}]+|[{WHITESPACE}]+"),
    GPT4_PATTERN: re.compile(rf"[{WHITESPACE}]*[^{WHITESPACE}]+"
                             rf"(?:(?<![A-Za-z0-9])[\r\n][{WHITESPACE}]*(?:[^{WHITESPACE}]+|\Z))*"
                             rf"|[{WHITESPACE}]+"),
}
# Stream cut points: after a letter, before a space (a subset of the segment cuts of both
# patterns), searched backwards from the end of a buffer.
_LAST_LETTER_BEFORE_SPACE = regex.compile(r"(?r)\p{L}(?=\s)")
_DIGIT = regex.compile(r"(\p{N})")


def resolve_pattern(name_or_regex: str) -> str:
    """'gpt2' / 'gpt4' name a built-in regex; anything else is taken as a regex itself."""
    return PATTERNS.get(name_or_regex, name_or_regex)


@dataclass(frozen=True)
class PreTokenizer:
    """Special-token splitting, optional digit splitting, then a regex.

    `pattern` is the regex text (not a name); `special_tokens` are matched longest first.
    A custom regex works too, but without the segment shortcut and without stream cut points.
    """

    pattern: str = GPT2_PATTERN
    split_digits: bool = False
    special_tokens: tuple[str, ...] = ()
    _regex: regex.Pattern = field(init=False, repr=False, compare=False)
    _special_regex: regex.Pattern | None = field(init=False, repr=False, compare=False)
    longest_special: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = regex.compile(self.pattern)
        except regex.error as error:
            raise ValueError(f"pre-tokenization regex {self.pattern!r} does not compile: {error}") from None
        object.__setattr__(self, "_regex", compiled)
        longest_first = sorted(set(self.special_tokens), key=lambda token: (-len(token), token))
        special_regex = regex.compile("|".join(map(regex.escape, longest_first))) if longest_first else None
        object.__setattr__(self, "_special_regex", special_regex)
        object.__setattr__(self, "longest_special", max(map(len, longest_first), default=0))

    @property
    def is_builtin(self) -> bool:
        return self.pattern in _SEGMENTS

    def split_specials(self, text: str) -> Iterator[tuple[str, bool]]:
        """Yield (text, is_special) runs in order; ordinary runs may be empty strings."""
        if self._special_regex is None:
            yield text, False
            return
        start = 0
        for match in self._special_regex.finditer(text):
            yield text[start:match.start()], False
            yield match.group(), True
            start = match.end()
        yield text[start:], False

    def segments(self, text: str) -> list[str]:
        """Cut special-free text into segments that pre-tokenize independently.

        For a custom regex there is no proof of safe cuts, so the segments are the pieces.
        """
        segmenter = _SEGMENTS.get(self.pattern)
        return segmenter.findall(text) if segmenter is not None else self.pieces(text)

    def pieces(self, text: str) -> list[str]:
        """Pre-tokenize text that holds no special tokens (they are split off before)."""
        if not self.split_digits:
            return self._regex_pieces(text)
        pieces: list[str] = []
        # With a capturing group, split() alternates: text, digit, text, digit, ..., text.
        for index, part in enumerate(_DIGIT.split(text)):
            if index % 2:
                pieces.append(part)
            elif part:
                pieces.extend(self._regex_pieces(part))
        return pieces

    def _regex_pieces(self, text: str) -> list[str]:
        if self.is_builtin:
            return self._regex.findall(text)  # the built-in patterns match every character
        # A custom regex may skip characters; like HF's Split(behavior="isolated"), gaps are pieces too.
        pieces, start = [], 0
        for match in self._regex.finditer(text):
            if match.start() > start:
                pieces.append(text[start:match.start()])
            if match.end() > match.start():
                pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def last_safe_cut(self, text: str) -> int:
        """The largest index i > 0 where text[:i] and text[i:] pre-tokenize like the whole, or 0.

        Two kinds of safe points: after a letter and before a space (built-in patterns only),
        and just before a special token (specials are split off first, for any pattern). We stay
        a special token's length away from the end, because the text beyond is not known yet,
        and a letter-space point inside a special token (one with a space in it) does not count.
        """
        limit = max(len(text) - self.longest_special, 0)
        cut = 0
        if self.is_builtin:
            match = _LAST_LETTER_BEFORE_SPACE.search(text, 0, limit)
            cut = match.end() if match is not None else 0
        if self._special_regex is not None:
            for special in self._special_regex.finditer(text, 0, len(text)):
                if special.start() >= limit:
                    break
                if special.start() < cut < special.end():
                    cut = special.start()
                cut = max(cut, special.start())
        return cut


def split_at_safe_points(chunks: Iterable[str], pretokenizer: PreTokenizer, min_chars: int) -> Iterator[str]:
    """Regroup a stream of text (lines, file blocks) into pieces of >= min_chars, cut only at safe points.

    The concatenation of the output equals the concatenation of the input, and pre-tokenizing
    the output pieces one by one gives the pieces of the whole. When no safe point shows up
    (a long run of text with no letter before a space), the buffer grows until one does.
    """
    buffer: list[str] = []
    size, next_check = 0, min_chars
    for chunk in chunks:
        buffer.append(chunk)
        size += len(chunk)
        if size < next_check:
            continue
        text = "".join(buffer)
        cut = pretokenizer.last_safe_cut(text)
        if cut > 0:
            yield text[:cut]
            text = text[cut:]
        buffer, size = [text], len(text)
        # Without a safe point, look again only once the buffer has doubled (no quadratic rescans).
        next_check = min_chars if cut > 0 else 2 * size
    if size:
        yield "".join(buffer)
