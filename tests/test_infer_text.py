"""Streaming text: whole UTF-8 characters only, stop strings held back and cut; chat templates."""
from __future__ import annotations

import pytest

from infer_support import load_tiny
from lmforge.errors import UserError
from lmforge.infer import render_chat
from lmforge.infer.text import IncrementalDecoder, TextStream

TEXT = "Naïve café — 日本語 and emoji 🎉🚀 end"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny()[1]


def test_byte_tokens_of_one_character_come_out_together(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT) // 2          # the tiny vocabulary splits the non-ASCII text into bytes
    decoder = IncrementalDecoder(tokenizer, prompt_ids=tokenizer.encode("Say: "))
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces                        # some tokens ended mid-character and were held back
    for piece in pieces:
        piece.encode("utf-8")                  # no lone surrogates: valid UTF-8 text


def test_invalid_bytes_at_the_end_are_flushed_as_replacement(tokenizer):
    decoder = IncrementalDecoder(tokenizer, prompt_ids=[])
    first_byte_of_emoji = tokenizer.encode("🎉")[0]
    assert decoder.push(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"


def test_stop_string_across_tokens_is_cut_and_never_shown(tokenizer):
    ids = tokenizer.encode("alpha beta STOP gamma")
    stream = TextStream(tokenizer, [], stop=["STOP", "zeta"])
    shown = ""
    for token in ids:
        shown += stream.push(token)
        assert "ST" not in shown or shown.endswith("beta ")   # a possible stop prefix is held back
        if stream.stopped:
            break
    shown += stream.finish()
    assert stream.stopped and shown == stream.text == "alpha beta "


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    stream = TextStream(tokenizer, [], stop=["the end"])
    shown = "".join(stream.push(token) for token in tokenizer.encode("not the en"))
    assert shown == "not "                     # "the en" could still become "the end"
    assert shown + stream.finish() == "not the en" and not stream.stopped


def test_render_chat_uses_chatml_for_our_tokenizer(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert render_chat(tokenizer, messages) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tokenizer, messages[:2], add_generation_prompt=False).endswith("Hello<|im_end|>\n")
    # Special-token strings in the rendered prompt become single special ids.
    assert tokenizer.encode(render_chat(tokenizer, messages[:1]))[0] == tokenizer.special_tokens["<|im_start|>"]


class Templated:
    """A tokenizer stand-in with an HF-style template that uses bos/eos and raise_exception."""

    chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                     "{{ raise_exception('tools are not supported') }}{% endif %}"
                     "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    roles = {"bos": "<s>", "eos": "</s>"}


def test_render_chat_uses_the_tokenizer_template_with_hf_variables():
    text = render_chat(Templated(), [{"role": "user", "content": "Hi"}])
    assert text == "<s>[user] Hi</s>[assistant] "
    with pytest.raises(UserError, match="tools are not supported"):
        render_chat(Templated(), [{"role": "tool", "content": "42"}])


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "no role"}], "messages\\[0\\]"),
    ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
    ([{"role": "user", "content": 42}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
])
def test_bad_messages_are_user_errors(tokenizer, messages, problem):
    with pytest.raises(UserError, match=problem):
        render_chat(tokenizer, messages)
