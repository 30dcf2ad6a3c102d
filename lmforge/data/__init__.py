"""lmforge.data: corpora -> token shards (train.bin / val.bin / meta.json) -> CLM and MLM batches;
chat / instruction conversations for SFT.

    from lmforge.data import prepare_shards, CausalLMLoader, read_conversations
    prepare_shards("shakespeare", "artifacts/tokenizer", "data/shakespeare")
    batch = CausalLMLoader("data/shakespeare", "train", batch_size=8, seq_len=128, seed=0).next_batch()
    chats = read_conversations("data.jsonl")   # or "sharegpt", "chatterbot", "reasoning-gym:chain_sum"

Names are imported on first use, so importing the package (e.g. for the CLI) does not load torch.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "open_corpus": "lmforge.data.corpora",
    "Corpus": "lmforge.data.corpora",
    "Document": "lmforge.data.corpora",
    "prepare_shards": "lmforge.data.shards",
    "describe_shards": "lmforge.data.shards",
    "check_shards": "lmforge.data.shards",
    "read_meta": "lmforge.data.shards",
    "open_tokens": "lmforge.data.shards",
    "token_dtype": "lmforge.data.shards",
    "ShardMeta": "lmforge.data.shards",
    "SplitStats": "lmforge.data.shards",
    "CausalLMLoader": "lmforge.data.loaders",
    "MaskedLMLoader": "lmforge.data.loaders",
    "Masking": "lmforge.data.loaders",
    "iter_eval_batches": "lmforge.data.loaders",
    "IGNORE_INDEX": "lmforge.data.loaders",
    "Conversation": "lmforge.data.conversations",
    "read_conversations": "lmforge.data.conversations",
    "detect_format": "lmforge.data.conversations",
    "to_conversation": "lmforge.data.conversations",
    "check_messages": "lmforge.data.conversations",
    "FORMATS": "lmforge.data.conversations",
    "load_sharegpt": "lmforge.data.chat_corpora",
    "load_chatterbot": "lmforge.data.chat_corpora",
    "reasoning_gym_conversations": "lmforge.data.chat_corpora",
    "score_answer": "lmforge.data.chat_corpora",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
