"""The special tokens later stages rely on, and the default chat template.

`<|endoftext|>` separates documents in the token shards, `<|im_start|>` / `<|im_end|>` frame chat
turns (ChatML, as SmolLM2 and Qwen use), `<|pad|>` pads batches and `<|mask|>` is BERT's [MASK].
"""
from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
MASK = "<|mask|>"

DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, PAD, MASK)
# Specials that end a turn or a document, for tokenizers that do not name their own end token
# (generation stops at them; an assistant turn is trained on through the first of them).
END_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_END, "<|eot_id|>", "<|end|>", "</s>")

# ChatML, in HF's Jinja dialect: `<|im_start|>role\ncontent<|im_end|>\n` per message, then
# `<|im_start|>assistant\n` when the caller asks for the model's turn (add_generation_prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template_for(special_tokens: dict[str, int] | tuple[str, ...] | list[str]) -> str | None:
    """ChatML when both of its markers are special tokens, else no template."""
    return CHATML_TEMPLATE if IM_START in special_tokens and IM_END in special_tokens else None
