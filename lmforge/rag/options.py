"""--rag DIR on chat, serve and web (light: imported when their parsers are built, before torch)."""
from __future__ import annotations

from typing import Any


def add_rag_arguments(parser: Any) -> None:
    """--rag DIR and --rag-k for chat, serve and web."""
    parser.add_argument("--rag", default=None, metavar="DIR",
                        help="answer with passages retrieved from this index (built by `lmforge rag index`)")
    parser.add_argument("--rag-k", type=int, default=3, metavar="K", help="with --rag: passages per message")


def rag_from_args(args: Any) -> Any:
    if getattr(args, "rag", None) is None:
        return None
    from .generate import RagChat
    from .store import load_index

    index = load_index(args.rag)
    if index.vectors is not None:
        index.embedder()   # load (and check) the embedding model now, not inside the first request
    return RagChat(index, k=getattr(args, "rag_k", 3))

