"""Conversations: chat / instruction data for supervised fine-tuning, from files in many formats.

    convs = read_conversations("data.jsonl")            # .json, .jsonl, .parquet, a `datasets` directory,
    convs = read_conversations("sharegpt")              # a cached HF dataset name, or a built-in corpus
    convs[0].messages   # [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]

Formats (auto-detected from the first record's keys; `format=` forces one):
alpaca (instruction/input/output), dolly (instruction/context/response), sharegpt (conversations of
{from, value}), messages (OpenAI {role, content}), oasst (OpenAssistant message rows, rebuilt into
threads) and prompt_completion (TRL, strings or message lists). System prompts, multi-turn and tool
turns are kept. Every conversation is checked: at least one assistant turn with text, a user or tool
turn before each assistant turn, a tool turn only after an assistant turn, a system turn only first.
Bad input raises `UserError` naming the file and line (JSONL, 1-based) or record (JSON/Parquet, 0-based).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UserError

BUILTINS = ("sharegpt", "chatterbot", "reasoning-gym:TASK[?size=N&seed=S]")  # see lmforge.data.chat_corpora
SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".txt")  # a name with these is meant as a path
FORMATS = ("auto", "alpaca", "dolly", "sharegpt", "messages", "oasst", "prompt_completion")
EXPECTED = {
    "alpaca": "'instruction' and 'output' (strings; optional 'input', 'system')",
    "dolly": "'instruction' and 'response' (strings; optional 'context')",
    "sharegpt": "'conversations' (or 'items'): a list of {'from', 'value'} turns (optional 'system')",
    "messages": "'messages': a list of {'role', 'content'} messages",
    "oasst": "'message_id', 'parent_id', 'text' and 'role' ('prompter' or 'assistant')",
    "prompt_completion": "'prompt' and 'completion' (strings, or lists of {'role', 'content'} messages)",
}
# ShareGPT exports name the speakers in many ways; these are the ones seen in the wild.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "function_call": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_response": "tool"}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
    source: str                     # where it came from, e.g. "data.jsonl:17" (for error messages)
    meta: dict[str, Any] | None = None  # JSON-serialisable extras (e.g. a reasoning-gym entry to score)


class _Bad(Exception):
    # A record problem: about the format's fields (the message then lists them) or the turns' order.
    def __init__(self, detail: str, fields: bool = True) -> None:
        super().__init__(detail)
        self.detail, self.fields = detail, fields


def read_conversations(path_or_name: str | os.PathLike, format: str = "auto", limit: int | None = None
                       ) -> list[Conversation]:
    """Read conversations from a file, a `datasets` directory, a cached HF dataset or a built-in
    (`sharegpt`, `chatterbot`, `reasoning-gym:TASK?size=N&seed=S`); at most `limit` of them."""
    if format not in FORMATS:
        raise UserError(f"unknown conversation format '{format}'; choose one of: {', '.join(FORMATS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit={limit!r} is not a positive whole number; pass e.g. limit=1000 or None for all")
    name, path = str(path_or_name), Path(path_or_name).expanduser()
    if not path.exists():
        from . import chat_corpora

        if chat_corpora.is_builtin(name):
            if format != "auto":
                raise UserError(f"'{name}' is a built-in corpus with its own format; drop format='{format}'")
            return chat_corpora.builtin_conversations(name, limit)
    records, unit = _open_records(name, path)
    return _convert_all(name, records, format, unit, limit)


def detect_format(record: dict) -> str:
    """The format of one record, from its keys (oasst rows are detected by message_id/parent_id/role)."""
    return _detect(record, "record")


def to_conversation(record: dict, format: str, source: str) -> Conversation:
    """Convert and check one record (`format` may be "auto"; oasst rows need a whole file)."""
    if format not in FORMATS:
        raise UserError(f"unknown conversation format '{format}'; choose one of: {', '.join(FORMATS)}")
    return _convert(record, format, source, "record")


def check_messages(messages: list[dict[str, str]]) -> str | None:
    """What is wrong with the order or content of these turns, or None when they are a valid conversation."""
    for index, message in enumerate(messages):
        role, before = message["role"], messages[index - 1]["role"] if index else None
        if role == "system" and index:
            return f"turn {index + 1} is a system turn, but a system turn is only allowed first"
        if role == "assistant" and before not in ("user", "tool"):
            return f"turn {index + 1} is an assistant turn with no user or tool turn right before it"
        if role == "tool" and before not in ("assistant", "tool"):
            return f"turn {index + 1} is a tool turn that does not follow an assistant turn"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "the conversation has no assistant turn with text"
    return None


# ---------------------------------------------------------------- detection and conversion

def _detect(record: Any, where: str) -> str:
    keys = set(record) if isinstance(record, dict) else set()
    if {"message_id", "parent_id"} <= keys and record.get("role") in ("prompter", "assistant"):
        return "oasst"
    for fmt, needs in (("messages", "messages"), ("sharegpt", "conversations"), ("sharegpt", "items"),
                       ("dolly", "response"), ("alpaca", "instruction"), ("prompt_completion", "prompt")):
        if needs in keys and (fmt != "dolly" or "instruction" in keys):
            return fmt
    found = ", ".join(sorted(map(str, keys))) if isinstance(record, dict) else _a(record)
    options = "; ".join(f"{fmt}: {EXPECTED[fmt]}" for fmt in FORMATS[1:])
    raise UserError(f"{where}: cannot tell the conversation format from the keys (found: {found}); "
                    f"pass format=NAME ({options})")


def _convert(record: Any, format: str, source: str, unit: str) -> Conversation:
    fmt = _detect(record, source) if format == "auto" else format
    if fmt == "oasst":
        raise UserError(f"{source}: oasst rows are single messages of a tree; read the whole file with "
                        "read_conversations(path, format='oasst')")
    try:
        if not isinstance(record, dict):
            raise _Bad(f"the record is {_a(record)}, not an object")
        messages = _CONVERTERS[fmt](record)
        problem = check_messages(messages)
        if problem:
            raise _Bad(problem, fields=False)
    except _Bad as bad:
        raise _record_error(bad, fmt, source, unit) from None
    return Conversation(messages, source)


def _record_error(bad: _Bad, fmt: str, source: str, unit: str) -> UserError:
    if not bad.fields:
        return UserError(f"{source}: {bad.detail}; fix that {unit}")
    article = "an" if fmt[0] in "aeiou" else "a"
    return UserError(f"{source}: {bad.detail}, but {article} {fmt} record needs {EXPECTED[fmt]}; "
                     f"fix that {unit} or pass format=NAME ({', '.join(FORMATS[1:])})")


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and required:
        raise _Bad(f"'{key}' is missing (keys: {', '.join(sorted(map(str, record)))})")
    if value is not None and not isinstance(value, str):
        raise _Bad(f"'{key}' is {_a(value)}, not a string")
    return value or ""


def _a(value: Any) -> str:
    kind = type(value).__name__
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _with_system(system: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [_message("system", system), *messages] if system.strip() else messages


def _alpaca(record: dict, answer_key: str = "output", extra_key: str = "input") -> list[dict[str, str]]:
    prompt, extra = _text(record, "instruction"), _text(record, extra_key, required=False)
    history = []
    for pair in record.get("history") or []:  # LLaMA-Factory's alpaca: earlier [user, assistant] turns
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise _Bad("'history' is not a list of [user, assistant] string pairs")
        history += [_message("user", pair[0]), _message("assistant", pair[1])]
    user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
    return _with_system(_text(record, "system", required=False),
                        [*history, _message("user", user), _message("assistant", _text(record, answer_key))])


def _sharegpt(record: dict) -> list[dict[str, str]]:
    turns = record.get("conversations") if record.get("conversations") is not None else record.get("items")
    if not isinstance(turns, list):
        raise _Bad(f"'conversations' is {'missing' if turns is None else _a(turns) + ', not a list'}")
    messages = []
    for index, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {index} is {_a(turn)}, not a {{'from', 'value'}} object")
        # Arrow fills keys a row lacks with None, so fall back on None, not only on a missing key.
        speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise _Bad(f"turn {index} has from={speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
        value = turn.get("value") if turn.get("value") is not None else turn.get("content")
        if not isinstance(value, str):
            raise _Bad(f"turn {index} has no string 'value'")
        messages.append(_message(role, value))
    return _with_system(_text(record, "system", required=False), messages)


def _openai_message(item: Any, index: int) -> dict[str, str]:
    if not isinstance(item, dict) or item.get("role") not in MESSAGE_ROLES:
        role = item.get("role") if isinstance(item, dict) else None
        raise _Bad(f"message {index} has role={role!r} (known: {', '.join(MESSAGE_ROLES)})")
    content = item.get("content")
    if isinstance(content, list):  # OpenAI content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _Bad(f"message {index} has content parts other than {{'type': 'text', 'text': ...}}")
        content = "".join(part["text"] for part in content)
    if content in (None, "") and (item.get("tool_calls") or item.get("function_call")):
        # Our turns are text, so a turn that only calls tools keeps the calls as their JSON.
        content = json.dumps(item.get("tool_calls") or item.get("function_call"), ensure_ascii=False)
    if not isinstance(content, str):
        raise _Bad(f"message {index} has no string 'content'")
    return _message(MESSAGE_ROLES[item["role"]], content)


def _message_list(items: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise _Bad(f"'{key}' is {'missing' if items is None else _a(items) + ', not a list'}")
    return [_openai_message(item, index) for index, item in enumerate(items, 1)]


def _prompt_completion(record: dict) -> list[dict[str, str]]:
    parts = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = record.get(key)
        parts += [_message(role, value)] if isinstance(value, str) else _message_list(value, key)
    return parts


_CONVERTERS = {"alpaca": _alpaca, "dolly": lambda record: _alpaca(record, "response", "context"),
               "sharegpt": _sharegpt, "messages": lambda record: _message_list(record.get("messages"), "messages"),
               "prompt_completion": _prompt_completion}


def _convert_all(name: str, records: Iterator[tuple[Any, str]], format: str, unit: str,
                 limit: int | None) -> list[Conversation]:
    first = next(records, None)
    if first is None:
        raise UserError(f"'{name}' has no records; give a file with at least one conversation")
    fmt = _detect(first[0], first[1]) if format == "auto" else format
    if fmt == "oasst":  # rows are messages: the trees need the whole file
        return oasst_threads(chain([first], records), unit)[:limit]
    pairs = islice(chain([first], records), limit)  # stop reading at the limit
    return [_convert(record, fmt, where, unit) for record, where in pairs]


# ---------------------------------------------------------------- OpenAssistant trees

def oasst_threads(rows: Iterable[tuple[Any, str]], unit: str = "record") -> list[Conversation]:
    """Every root-to-leaf thread of the oasst message trees in `rows` ((row, where) pairs), best
    (lowest `rank`) siblings first, identical threads once. Deleted rows (and what hangs off them)
    are dropped; a thread ending in a prompter turn is cut back to its last assistant reply."""
    nodes: dict[str, tuple[dict, str, int]] = {}
    for order, (row, where) in enumerate(rows):
        try:
            if not isinstance(row, dict) or row.get("role") not in ("prompter", "assistant"):
                raise _Bad(f"'role' is {row.get('role')!r}" if isinstance(row, dict) else "the row is not an object")
            _text(row, "text")
            if not _text(row, "message_id") or not isinstance(row.get("parent_id"), (str, type(None))):
                raise _Bad("'message_id' is empty or 'parent_id' is not a string or null")
        except _Bad as bad:
            raise _record_error(bad, "oasst", where, unit) from None
        if not row.get("deleted"):
            nodes[row["message_id"]] = (row, where, order)
    children: dict[str | None, list[str]] = {}
    for message_id, (row, _, _) in nodes.items():
        parent = row.get("parent_id")
        if parent is None or parent in nodes:  # an orphan's parent was deleted: skip its subtree
            children.setdefault(parent, []).append(message_id)

    def best_first(message_id: str) -> tuple:  # lowest rank first, unranked (None, NaN) last, then file order
        row, _, order = nodes[message_id]
        ranked = isinstance(row.get("rank"), (int, float)) and math.isfinite(row["rank"])
        return (not ranked, row["rank"] if ranked else 0, order)

    threads, seen = [], set()
    for root in children.get(None, []):
        stack, per_root = [[root]], 0  # per_root numbers this tree's threads: "file.jsonl:1#0", "#1", ...
        while stack:
            path = stack.pop()
            below = sorted(children.get(path[-1], []), key=best_first)
            if below:
                stack.extend(path + [child] for child in reversed(below))  # popped best first
                continue
            while path and nodes[path[-1]][0]["role"] == "prompter":
                path = path[:-1]
            messages = [_message({"prompter": "user"}.get(nodes[i][0]["role"], "assistant"), nodes[i][0]["text"])
                        for i in path]
            key = tuple((m["role"], m["content"]) for m in messages)
            if not messages or key in seen:
                continue
            seen.add(key)
            where, problem = nodes[root][1], check_messages(messages)
            if problem:
                raise UserError(f"{where}: the thread from this root message is not a conversation ({problem}); "
                                "fix the tree in that file")
            threads.append(Conversation(messages, f"{where}#{per_root}",
                                        {"message_ids": path, "lang": nodes[root][0].get("lang")}))
            per_root += 1
    return threads


# ---------------------------------------------------------------- sources

def _open_records(name: str, path: Path) -> tuple[Iterator[tuple[Any, str]], str]:
    """(record, where) pairs, and what to call one record in an error: a line, record or row."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return _json_records(name, path)
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl_records(name, path), "line"
        if suffix == ".parquet":
            return _parquet_records(name, path), "row"
        raise UserError(f"'{name}' has an unknown extension '{path.suffix}'; conversations are read from .json, "
                        ".jsonl or .parquet files, a `datasets` save_to_disk directory, a cached dataset name "
                        f"or a built-in ({', '.join(BUILTINS)})")
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise UserError(f"'{name}' is a directory but not a `datasets` save_to_disk directory; "
                            "give a .json, .jsonl or .parquet file, or a directory written by save_to_disk")
        return _dataset_records(name, from_disk=True), "row"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix.lower() in SUFFIXES:
        raise UserError(f"'{name}' does not exist; check the path (built-in corpora: {', '.join(BUILTINS)})")
    return _dataset_records(name, from_disk=False), "row"


def _json_records(name: str, path: Path) -> tuple[Iterator[tuple[Any, str]], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise _not_utf8(name, error) from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # many ".json" files are really JSON Lines
            return _jsonl_records(name, path), "line"
        raise UserError(f"'{name}' is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); fix "
                        "the file (a .json file holds a list of records; use .jsonl for one record per line)") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        try:
            _detect(data, name)
            data = [data]  # the whole file is one record
        except UserError:
            if len(lists) != 1:
                raise UserError(f"'{name}' holds an object with keys {', '.join(map(str, data))}, not a list of "
                                "records; give a list, or an object with one list (e.g. {\"data\": [...]})") from None
            name, data = f"{name}[{lists[0]!r}]", data[lists[0]]
    if not isinstance(data, list):
        raise UserError(f"'{name}' holds {_a(data)}, not a list of records; give a JSON list of objects")
    return ((record, f"{name}[{index}]") for index, record in enumerate(data)), "record"


def _jsonl_records(name: str, path: Path) -> Iterator[tuple[Any, str]]:
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{name}:{number}"
                except json.JSONDecodeError as error:
                    raise UserError(f"{name}:{number}: the line is not valid JSON ({error.msg} at column "
                                    f"{error.colno}); fix or delete that line (JSONL is one JSON object per line)"
                                    ) from None
        except UnicodeDecodeError as error:
            raise _not_utf8(name, error) from None


def _not_utf8(name: str, error: UnicodeDecodeError) -> UserError:
    return UserError(f"'{name}' is not UTF-8 text ({error.reason}); convert it with `iconv -t utf-8`")


def _parquet_records(name: str, path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"'{name}' is not a readable Parquet file ({error}); check the file") from None
    rows = (row for batch in parquet.iter_batches(batch_size=512) for row in batch.to_pylist())
    return ((row, f"{name}[{index}]") for index, row in enumerate(rows))


def _dataset_records(spec: str, from_disk: bool) -> Iterator[tuple[Any, str]]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read the cache, never the network
    import datasets

    if from_disk:
        loaded = datasets.load_from_disk(spec)
    else:
        try:
            loaded = datasets.load_dataset(spec, download_mode="reuse_cache_if_exists")
        except Exception as error:  # datasets raises many types here (offline, not found, bad config)
            raise UserError(f"'{spec}' is not a file, a directory, a built-in ({', '.join(BUILTINS)}) or a dataset "
                            f"in the local Hugging Face cache ({type(error).__name__}); check the name, or download "
                            "the dataset first (lmforge never downloads at run time)") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"dataset '{spec}' has no 'train' split (splits: {', '.join(loaded)}); "
                            "save the split you want with save_to_disk and read that directory")
        loaded = loaded["train"]
    label = Path(spec).name if from_disk else spec
    return ((record, f"{label}[{index}]") for index, record in enumerate(loaded))
