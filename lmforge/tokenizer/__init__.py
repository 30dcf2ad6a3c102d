"""lmforge.tokenizer: byte-level BPE written from scratch, and the formats around it.

    from lmforge.tokenizer import train_bpe, load_tokenizer
    tok = train_bpe(["corpus.txt"], vocab_size=8192)
    tok.save("artifacts/tok")
    tok = load_tokenizer("artifacts/tok")
    tok.decode(tok.encode("Hello <|endoftext|>"))
    ids, mask = render_chat_ids(tok, messages)   # chat template -> token ids + assistant loss mask
"""
from .bpe import BPETokenizer
from .chat_template import default_stop_token_ids, normalize_messages, render_chat, render_chat_ids
from .hf_wrapper import HFTokenizer
from .loading import Tokenizer, load_tokenizer
from .pretokenize import GPT2_PATTERN, GPT4_PATTERN, PreTokenizer
from .special_tokens import CHATML_TEMPLATE, DEFAULT_SPECIAL_TOKENS, END_TOKENS
from .train import learn_merges, train_bpe, train_bpe_on_texts

__all__ = [
    "BPETokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "train_bpe", "train_bpe_on_texts",
    "learn_merges", "PreTokenizer", "GPT2_PATTERN", "GPT4_PATTERN", "CHATML_TEMPLATE", "DEFAULT_SPECIAL_TOKENS",
    "END_TOKENS", "render_chat", "render_chat_ids", "normalize_messages", "default_stop_token_ids",
]
