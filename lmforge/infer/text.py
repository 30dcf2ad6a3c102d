"""From generated token ids to streamed text: whole characters only, and stop strings cut off.

Byte-level BPE splits many characters (emoji, CJK, accented letters) over several tokens, and a
single token may end halfway through a character. Decoding such a prefix gives U+FFFD, so the
stream holds text back until the character is complete. Stop strings are matched on the text, so
the stream also holds back any tail that could still grow into a stop string.
"""
from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4   # prompt tokens decoded in front of the output, so leading spaces come out right


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDecoder:
    """Token ids -> text increments that never end in the middle of a character.

    It decodes a short window of recent tokens twice (with and without the new ones) and emits
    the difference, the approach of Hugging Face's text-generation-inference: O(1) per token, and
    right for tokenizers whose decode of a sequence is not the concatenation of token decodes.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and tokenizer.decode(context).endswith(REPLACEMENT):
            context = []  # the prompt itself ends mid-character: start clean
        self.ids = context
        self.prefix_offset = 0             # window start
        self.read_offset = len(context)    # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The held-back rest at the end of generation (invalid bytes become U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class TextStream:
    """Generated tokens -> streamed text, stopping at the first stop string (which is not emitted).

    `push(token)` returns the text that is safe to show now; `stopped` turns True when a stop
    string appeared; `finish()` returns whatever was held back. `text` is everything emitted.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], stop: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stop = [s for s in stop if s]
        self.pending = ""    # decoded but not yet emitted
        self.text = ""       # emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((index for index in (self.pending.find(s) for s in self.stop) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
        elif final or self.stopped:
            out, self.pending = self.pending, ""
        else:
            keep = self._stop_prefix_length(self.pending)
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.text += out
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
