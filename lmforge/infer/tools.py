"""Tool use while decoding, the Toolformer way: the model writes a call, generation pauses, the
tool runs, its result is inserted as text, and decoding goes on.

    registry = ToolRegistry.builtin(["calculator"])
    loop = ToolLoop(engine, registry)
    [result] = loop.generate([prompt_ids], SamplingParams(max_new_tokens=64))
    result.text    # 'It is [calculator(23*47)→ 1081] 1081.'
    result.calls   # [ToolCall(name='calculator', arguments={'expression': '23*47'}, result='1081', ...)]

The markup is Toolformer's: `[name(arguments)→ result]` (defined with the chat template, which
renders OpenAI tool calls the same way). `arguments` is either JSON (`{"city": "Paris"}`) or, for a
tool with one parameter, the raw text (`calculator(23*47)`). The arrow is the pause: it is a stop
string of every round, so a round ends as soon as the model writes it.

Each round is one batched generation through the engine (every row still running, in one group).
A row that stopped at "→" has its call parsed and run, the text `→ result]` appended, and goes
into the next round as a new prompt: its original prompt ids + the text so far, encoded as plain
text (a tool result cannot inject special tokens). That is a re-prefill: the engine frees a
row's KV cache when its sequence finishes and has no API to append tokens to a live row, so the
row's cache is rebuilt. On CPU with short prompts the extra prefill (one batched forward over
prompt + text so far) costs about as much as decoding a few tokens; a prefix-caching engine could
keep the row instead. Every failure becomes result text, never an exception: an unknown tool, a
malformed call, arguments the tool rejects, a tool that raises (`error: ValueError: ...`), too
many calls, and a call that never reaches its arrow before generation ends (recorded in `calls`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from ..tokenizer.chat_template import (TOOL_CALL_ARROW, TOOL_CALL_CLOSE, TOOL_CALL_OPEN,
                                       format_tool_result)
from .sampling import SamplingParams

ARROW = TOOL_CALL_ARROW
MAX_RESULT_CHARS = 400       # a longer tool result is cut (it goes into the context)
MAX_CALLS = 8                # per sequence: a model that loops on calls still ends
BUILTIN_TOOLS = ("calculator", "retrieval")
_CALL_RE = re.compile(r"\[([A-Za-z_][\w.-]{0,63})\((.*)\)\s*$", re.DOTALL)
_OPEN_RE = re.compile(r"\[([A-Za-z_][\w.-]{0,63})\(")


@dataclass
class Tool:
    """A Python callable the model may call, described by a JSON schema of its keyword arguments."""

    name: str
    function: Callable[..., Any]
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def schema(self) -> dict:
        """OpenAI's tool format: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def arguments(self, text: str) -> dict:
        """The keyword arguments written inside the call's parentheses (ValueError when malformed)."""
        return parse_arguments(text, self.parameters)

    def __call__(self, arguments: dict) -> str:
        result = self.function(**arguments)
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "..."


@dataclass
class ToolCall:
    """One call the model made: what it wrote, and the result text inserted after the arrow."""

    name: str
    arguments: dict
    raw: str                      # the call as written: '[calculator(2+3)'
    result: str | None            # inserted text (an 'error: ...' text when it failed); None: never ran
    error: str | None = None      # why it failed, when it did


@dataclass
class ToolGeneration:
    text: str                     # the whole generated text, the inserted results included
    calls: list[ToolCall]
    finish_reason: str            # "stop" | "length"
    completion_tokens: int        # sampled by the model, over every round
    rounds: int                   # generation rounds (1 + calls that resumed)


class ToolRegistry:
    """The tools a model may call, by name (matched case-insensitively)."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools or []:
            self.add(tool)

    def add(self, tool: Tool) -> Tool:
        if not re.fullmatch(r"[A-Za-z_][\w.-]{0,63}", tool.name):
            raise UserError(f"tool name {tool.name!r} is not a valid name; use letters, digits, _ . - (at most 64)")
        self.tools[tool.name.lower()] = tool
        return tool

    def register(self, name: str, function: Callable[..., Any], description: str = "",
                 parameters: dict | None = None) -> Tool:
        """Add a Python callable; `parameters` is the JSON schema of its keyword arguments."""
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type") != "object"):
            raise UserError(f"tool '{name}': parameters must be a JSON schema object "
                            '({"type": "object", "properties": {...}}); fix the schema')
        return self.add(Tool(name, function, description, parameters or {"type": "object", "properties": {}}))

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name.lower())

    @property
    def names(self) -> list[str]:
        return [tool.name for tool in self.tools.values()]

    def __len__(self) -> int:
        return len(self.tools)

    def run(self, raw: str) -> ToolCall:
        """Parse and run a call written as '[name(arguments)' (the text before the arrow). Never raises."""
        match = _CALL_RE.search(raw)
        if match is None:
            name = (_OPEN_RE.search(raw) or [None, "?"])[1]
            return _failed(name, raw, "malformed tool call; write [tool(arguments)→")
        name, argument_text = match.group(1), match.group(2)
        tool = self.get(name)
        if tool is None:
            return _failed(name, raw, f"unknown tool '{name}'; the tools are {', '.join(self.names) or 'none'}")
        try:
            arguments = tool.arguments(argument_text)
        except ValueError as error:
            return _failed(tool.name, raw, f"bad arguments for {tool.name}: {error}")
        try:
            return ToolCall(tool.name, arguments, raw, tool(arguments))
        except Exception as error:   # a tool's failure is the model's to read, not the server's to die of
            return _failed(tool.name, raw, f"{type(error).__name__}: {error}", arguments)

    def describe(self) -> str:
        """A system-prompt paragraph: the markup, each tool, and an example."""
        lines = [f"You can call tools by writing {TOOL_CALL_OPEN}tool(input){ARROW} in your answer; the result is "
                 f"written after the arrow and closed with {TOOL_CALL_CLOSE}, then you continue. Tools:"]
        for tool in self.tools.values():
            properties = list((tool.parameters.get("properties") or {}))
            signature = properties[0] if len(properties) == 1 else "{json arguments}"
            lines.append(f"- {tool.name}({signature}): {tool.description}")
        if self.get("calculator"):
            lines.append("Example: 12 * 23 is [calculator(12*23)→ 276] 276.")
        return "\n".join(lines)

    @classmethod
    def builtin(cls, names: list[str] | str, index_dir: str | Path | None = None) -> "ToolRegistry":
        """The built-in tools by name: calculator, retrieval (over a RAG index; needs `index_dir`)."""
        if isinstance(names, str):
            names = [part for part in names.split(",") if part.strip()]
        registry = cls()
        for name in (part.strip().lower() for part in names):
            if name == "calculator":
                registry.add(calculator_tool())
            elif name == "retrieval":
                registry.add(retrieval_tool(index_dir))
            else:
                raise UserError(f"--tools: unknown tool '{name}'; choose from {', '.join(BUILTIN_TOOLS)}")
        return registry


def parse_arguments(text: str, parameters: dict) -> dict:
    """'{"a": 1}' -> {"a": 1}; raw text -> {the single parameter: text}; checks required keys."""
    properties = list((parameters.get("properties") or {}))
    required = list(parameters.get("required") or [])
    text = text.strip()
    if text.startswith("{"):
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"the arguments are not valid JSON ({error.msg})") from None
        if not isinstance(arguments, dict):
            raise ValueError("the JSON arguments must be an object")
    elif len(properties) == 1:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        arguments = {properties[0]: text}
    elif not properties and not text:
        arguments = {}
    else:
        raise ValueError(f"write the arguments as a JSON object with {', '.join(properties) or 'no keys'}")
    missing = [name for name in required if name not in arguments]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    unknown = [name for name in arguments if name not in properties]
    if unknown and parameters.get("additionalProperties") is False:
        raise ValueError(f"unknown argument {', '.join(unknown)}")
    return arguments


def _failed(name: str, raw: str, error: str, arguments: dict | None = None) -> ToolCall:
    return ToolCall(name, arguments or {}, raw, f"error: {error}", error)


def open_call(text: str) -> str | None:
    """The text of a call that was opened ('[name(') and not finished with an arrow or ']', if any."""
    start = max(text.rfind(TOOL_CALL_OPEN), 0)
    tail = text[start:]
    match = _OPEN_RE.match(tail)
    if match is None or ARROW in tail or TOOL_CALL_CLOSE in tail:
        return None
    return tail


def call_before_arrow(text: str) -> str | None:
    """The call the text ends with ('[name(args)', the arrow not included), or None if it ends with
    no call opening at all (an arrow in ordinary text)."""
    start = text.rfind(TOOL_CALL_OPEN)
    if start < 0 or TOOL_CALL_CLOSE in text[start:] or _OPEN_RE.match(text[start:]) is None:
        return None
    return text[start:]


# ----------------------------------------------------------------------------- built-in tools

def calculator_tool() -> Tool:
    from .calculator import calculate

    return Tool("calculator", calculate, "evaluates arithmetic: numbers, + - * / // % ** and parentheses",
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]})


def retrieval_tool(index_dir: str | Path | None, k: int = 2) -> Tool:
    """Search a RAG index (lmforge.rag, built with `lmforge rag index`); loaded once, at the first call."""
    if index_dir is None:
        raise UserError("the retrieval tool needs an index; pass --tool-index DIR (built with "
                        "`lmforge rag index --corpus wiki --out DIR`)")
    if not Path(index_dir).is_dir():
        raise UserError(f"the retrieval index '{index_dir}' does not exist; build it with "
                        f"`lmforge rag index --corpus wiki --out {index_dir}`")
    state: dict[str, Any] = {}

    def search(query: str) -> str:
        if "index" not in state:
            try:
                from .. import rag
            except ImportError as error:
                raise RuntimeError(f"retrieval needs lmforge.rag, which cannot be imported ({error})") from None
            state["index"] = rag.load_index(str(index_dir))
        hits = state["index"].search(query, k)
        return " | ".join(_hit_text(hit) for hit in hits) or "no results"

    return Tool("retrieval", search, "searches the knowledge base and returns the best passages",
                {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})


def _hit_text(hit: Any) -> str:
    """One search hit as 'title: text', whatever shape the index returns (object, dict, (score, item))."""
    if isinstance(hit, tuple):
        hit = next((part for part in hit if not isinstance(part, (int, float))), hit[-1])
    get = hit.get if isinstance(hit, dict) else lambda name, default=None: getattr(hit, name, default)
    text = get("text") or get("chunk") or get("content") or str(hit)
    title = get("title")
    text = " ".join(str(text).split())[:200]
    return f"{title}: {text}" if title else text


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    tokens: int = 0
    rounds: int = 0
    finish_reason: str | None = None


class ToolLoop:
    """Generation with tool calls around an `Engine` (see the module docstring)."""

    def __init__(self, engine: Any, registry: ToolRegistry, max_calls: int = MAX_CALLS) -> None:
        self.engine, self.registry, self.max_calls = engine, registry, max_calls

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | None = None
                 ) -> list[ToolGeneration]:
        """Every prompt (token ids or text) to the end, with its tool calls; rows are batched each round."""
        rows = [self._row(prompt, params) for prompt in prompts]
        while True:
            active = [row for row in rows if row.finish_reason is None]
            if not active:
                break
            for _ in self._round(active):
                pass
        return [self._result(row) for row in rows]

    def stream(self, prompt: list[int] | str, params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield text as it is generated, the inserted '→ result]' pieces included; `self.last` is the
        ToolGeneration once the iterator is exhausted."""
        row = self._row(prompt, params)
        while row.finish_reason is None:
            for _, delta in self._round([row]):
                yield delta
        self.last = self._result(row)

    # --------------------------------------------------------------------- internals

    def _row(self, prompt: list[int] | str, params: SamplingParams | None) -> _Row:
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return _Row(ids, (params or SamplingParams()).validate())

    def _round(self, rows: list[_Row]) -> Iterator[tuple[_Row, str]]:
        """One batched generation for `rows`; yields (row, text delta); then handles each row's end."""
        engine = self.engine
        group = engine.new_group()
        sequences = []
        try:
            for row in rows:
                budget = row.params.max_new_tokens - row.tokens
                stop = list(row.params.stop) + ([ARROW] if len(row.calls) < self.max_calls else [])
                params = dataclasses.replace(row.params, max_new_tokens=budget, stop=stop)
                ids = row.prompt_ids + engine.tokenizer.encode(row.text, allow_special=False)
                try:
                    sequences.append(engine.submit(ids, params, group=group))
                except UserError:            # the context is full (context_policy="error")
                    row.finish_reason = "length"
                    sequences.append(None)
            pending = [s for s in sequences if s is not None]
            while pending:
                engine.step()
                for row, sequence in zip(rows, sequences):
                    while sequence is not None and sequence.deltas:
                        delta = sequence.deltas.popleft()
                        row.text += delta
                        yield row, delta
                pending = [s for s in pending if not s.finished]
        finally:
            for sequence in sequences:
                if sequence is not None:
                    engine.cancel(sequence)
        for row, sequence in zip(rows, sequences):
            if sequence is None:
                continue
            sequence.raise_if_failed()
            row.rounds += 1
            row.tokens += sequence.completion_tokens
            inserted = self._after(row, sequence)
            if inserted:
                row.text += inserted
                yield row, inserted

    def _after(self, row: _Row, sequence: Any) -> str:
        """What to insert after a round (the tool's '→ result]'), or "" and the row's finish reason."""
        at_arrow = sequence.finish_reason == "stop" and self._stopped_at_arrow(row, sequence)
        if at_arrow and row.tokens < row.params.max_new_tokens:
            raw = call_before_arrow(row.text)
            if raw is None:                  # an arrow in ordinary text: keep it and go on
                return ARROW
            call = self.registry.run(raw)
            row.calls.append(call)
            return ARROW + format_tool_result(call.result)
        row.finish_reason = sequence.finish_reason if sequence.finish_reason in ("stop", "length") else "stop"
        unfinished = open_call(row.text)
        if unfinished is not None:
            name = _OPEN_RE.match(unfinished).group(1)
            row.calls.append(ToolCall(name, {}, unfinished, None,
                                      f"the call to {name} never reached '{ARROW}' before generation ended"))
        return ""

    def _stopped_at_arrow(self, row: _Row, sequence: Any) -> bool:
        """Whether the round's first stop string was the arrow (not a user stop or an end token)."""
        if len(row.calls) >= self.max_calls:
            return False
        decoded = self.engine.tokenizer.decode(sequence.token_ids)
        arrow = decoded.find(ARROW)
        if arrow < 0:
            return False
        others = [decoded.find(stop) for stop in row.params.stop if stop and stop in decoded]
        return not others or arrow <= min(others)

    def _result(self, row: _Row) -> ToolGeneration:
        return ToolGeneration(row.text, row.calls, row.finish_reason or "length", row.tokens, row.rounds)
