"""Retrieval-augmented generation: retrieved passages go into the prompt, numbered, and the model
is asked to cite them as [1], [2].

    rag = RagChat(load_index("runs/wiki-index"), k=3)
    messages, passages = rag.augment([{"role": "user", "content": "Who painted the Mona Lisa?"}])
    # the last user message now carries the numbered passages; render it with the chat template

The passages go into the LAST user message (not a system prompt): small instruction-tuned models
such as SmolLM2-135M follow context placed right before the question far better, and earlier turns
stay short. `chat --rag`, `serve --rag` and `web --rag` all go through `RagChat.augment`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import UserError
from .store import Index, Passage

INSTRUCTION = ("Answer the question using the numbered passages. Cite the passages you use like [1]. "
               "If they do not contain the answer, say so.")
SOURCES_MARK = "\n\n---\n**Sources**"   # the web UI's footer; stripped from the history sent back
MAX_PASSAGE_CHARS = 1200


def format_passages(passages: Sequence[Passage], max_chars: int = MAX_PASSAGE_CHARS) -> str:
    """'[1] Title: text' lines, one per passage, in rank order."""
    return "\n".join(f"[{i}] {p.title}: {p.text[:max_chars]}" for i, p in enumerate(passages, start=1))


def rag_prompt(question: str, passages: Sequence[Passage]) -> str:
    """The user message for a question with its passages (closed-book: no passages, the question alone)."""
    if not passages:
        return question
    return f"{INSTRUCTION}\n\nPassages:\n{format_passages(passages)}\n\nQuestion: {question}"


def cited(text: str, n_passages: int) -> list[int]:
    """The passage numbers an answer cites, e.g. 'Paris [1][3]' -> [1, 3] (only numbers that exist)."""
    numbers = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
    return sorted(n for n in numbers if 1 <= n <= n_passages)


def sources_markdown(passages: Sequence[Passage]) -> str:
    lines = [f"[{i}] **{p.title}** ({p.source}, score {p.score:.3f})" for i, p in enumerate(passages, start=1)]
    return "\n".join(lines)


@dataclass
class RagChat:
    """Retrieval for chat messages: the last user message is the query."""
    index: Index
    k: int = 3
    retriever: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"--rag-k {self.k} is below 1; retrieve at least one passage")

    def augment(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Passage]]:
        """(messages with passages in the last user message, the passages). Unchanged if no user message."""
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None or not isinstance(messages[last].get("content"), str) or not messages[last]["content"].strip():
            return list(messages), []
        question = messages[last]["content"]
        passages = self.index.search(question, self.k, self.retriever)
        out = [dict(m) for m in messages]
        out[last]["content"] = rag_prompt(question, passages)
        return out, passages


def strip_sources(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant turns without the sources footer the web UI appended (it is not the model's text)."""
    out = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "assistant" and isinstance(content, str) and SOURCES_MARK in content:
            m = dict(m, content=content.split(SOURCES_MARK)[0])
        out.append(m)
    return out


def rag_backend(inner: Any, rag: RagChat) -> Any:
    """Wrap a web ChatBackend (lmforge.serve.web_backends): retrieve for each message, stream the
    reply, then a 'Sources' footer listing the retrieved passages (shown in the web UI)."""
    from ..serve.web_backends import ChatBackend

    class RagBackend(ChatBackend):
        name, max_concurrency, context_length = inner.name, inner.max_concurrency, inner.context_length

        def stream_reply(self, messages, settings) -> Iterator[str]:
            augmented, passages = rag.augment(strip_sources(messages))
            yield from inner.stream_reply(augmented, settings)
            if passages:
                yield SOURCES_MARK + "\n\n" + sources_markdown(passages).replace("\n", "  \n")

        def model_info(self) -> str:
            info = rag.index.manifest
            return (inner.model_info() + f"\n\n**RAG:** {len(rag.index):,} chunks, retriever "
                    f"{rag.retriever or info['retriever']}, index {info['index'].get('kind')}, top {rag.k}; "
                    f"corpus {info.get('corpus', {}).get('name', '?')}")

    return RagBackend()


def generate_answers(engine: Any, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None,
                     params: Any) -> list[str]:
    """Batched answers through the engine and the model's chat template (closed-book when passages is None)."""
    from ..tokenizer.chat_template import render_chat_ids

    prompts = []
    for i, question in enumerate(questions):
        content = rag_prompt(question, passages[i]) if passages is not None else question
        ids, _ = render_chat_ids(engine.tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
        prompts.append(ids)
    return [result.text for result in engine.generate(prompts, params)]


@dataclass
class RagAnswer:
    question: str
    answer: str
    passages: list[Passage]

    def citations(self) -> list[int]:
        return cited(self.answer, len(self.passages))


def ask(engine: Any, index: Index, question: str, params: Any, k: int = 3, retriever: str | None = None) -> RagAnswer:
    passages = index.search(question, k, retriever)
    [answer] = generate_answers(engine, [question], [passages], params)
    return RagAnswer(question, answer, passages)


def sources_json(passages: Sequence[Passage]) -> list[dict[str, Any]]:
    """The passages as the server returns them (`sources` in a chat completion, numbered like the prompt)."""
    return [{"index": i, "title": p.title, "source": p.source, "score": round(p.score, 4), "text": p.text}
            for i, p in enumerate(passages, start=1)]
