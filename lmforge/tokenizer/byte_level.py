"""GPT-2's byte <-> printable character table, used to write byte tokens as JSON/text strings.

A byte-level BPE token is a byte string (maybe not valid UTF-8). GPT-2's `vocab.json`, HF's
`tokenizer.json` and GGUF files store each byte as one printable unicode character instead:
printable ASCII and Latin-1 bytes stand for themselves, the other 68 bytes (controls, space,
...) are shifted to U+0100 and above, so a space is written "Ġ" and a newline "Ċ".
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """byte value (0..255) -> the printable character that stands for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_char().items()}


def bytes_to_token_string(token: bytes) -> str:
    """b' the' -> 'Ġthe'."""
    table = byte_to_char()
    return "".join(table[byte] for byte in token)


def token_string_to_bytes(token: str) -> bytes:
    """'Ġthe' -> b' the'. Raises KeyError for a character outside the byte alphabet."""
    table = char_to_byte()
    return bytes(table[char] for char in token)


def is_byte_level_string(token: str) -> bool:
    """True when every character of `token` is one of the 256 byte stand-ins."""
    table = char_to_byte()
    return all(char in table for char in token)
