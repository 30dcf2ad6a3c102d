"""Preference pairs: the JSONL format every `lmforge align` command reads, tokenized into batches.

One pair per line, in TRL's formats:

    {"prompt": "2 + 3 =", "chosen": "5", "rejected": "6"}                         # standard
    {"prompt": [{"role": "user", "content": "2 + 3 ="}],                           # conversational
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}

A plain-text prompt is the user's message and plain-text answers are the assistant's reply, all
rendered with the model's chat template (`render_chat_ids`). Optional fields: "margin" (a float,
for reward models), "meta" (what a scorer needs, e.g. reasoning-gym's {"task", "entry"}), kept as is.

    pairs = read_pairs("pairs.jsonl")                       # UserError naming the bad line
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, seq_len=256)
    batches = PairBatches(tokenized, batch_size=4, seed=0, pad_id=tok.pad_id)
    batch = batches.next_batch()

A batch holds chosen and rejected in one tensor, so one forward scores both (TRL's concatenated
forward): rows [0, B) are the chosen sequences, rows [B, 2B) the rejected ones, right-padded:
    input_ids, attention_mask, labels [2B, T]   labels = next token on the response only, else -100
    pair_index [B]                               the pair's position in the file (reference cache key)
    margin [B]                                   (reward models; 0 when the file has none)
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import UserError
from ..train.losses import IGNORE_INDEX

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    prompt: list[dict[str, str]]       # the conversation before the reply (user turn(s), maybe a system turn)
    chosen: str
    rejected: str
    margin: float = 0.0
    meta: dict[str, Any] | None = None
    source: str = ""                    # "file.jsonl:LINE", for error messages


def _messages(value: Any, role: str, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in value)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"{where}: '{name}' must be a string or a list of {{'role', 'content'}} messages; fix that line")


def _reply(value: Any, where: str, name: str) -> str:
    messages = _messages(value, "assistant", where, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise UserError(f"{where}: '{name}' must be one assistant message (or a string); fix that line")
    return messages[0]["content"]


def parse_pair(record: Any, where: str) -> Pair:
    """One JSON record -> Pair, or a UserError saying which field of which line is wrong."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a pair must be a JSON object with {', '.join(FIELDS)}; fix that line")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise UserError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(a pair needs {', '.join(FIELDS)}); fix that line")
    prompt = _messages(record["prompt"], "user", where, "prompt")
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user message; fix that line")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise UserError(f"{where}: 'margin' must be a number; fix that line")
    meta = record.get("meta")
    return Pair(prompt, _reply(record["chosen"], where, "chosen"), _reply(record["rejected"], where, "rejected"),
                float(margin), meta if isinstance(meta, dict) else None, where)


def read_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Every pair of a JSONL file (blank lines skipped); a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pair file '{path}' does not exist; make one with `lmforge align pairs` or give a "
                        "JSONL file of prompt/chosen/rejected records")
    pairs = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{where}: not valid JSON ({error.msg}); fix that line") from None
                pairs.append(parse_pair(record, where))
                if limit is not None and len(pairs) >= limit:
                    break
        except UnicodeDecodeError:
            raise UserError(f"pair file '{path}' is not UTF-8 text; save it as UTF-8 JSONL") from None
    if not pairs:
        raise UserError(f"pair file '{path}' holds no pairs; add prompt/chosen/rejected lines")
    return pairs


def pair_record(pair: Pair) -> dict[str, Any]:
    """A Pair as the JSON line it is written as (conversational form)."""
    record: dict[str, Any] = {"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                              "rejected": [{"role": "assistant", "content": pair.rejected}]}
    if pair.margin:
        record["margin"] = pair.margin
    if pair.meta is not None:
        record["meta"] = pair.meta
    return record


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    """Write pairs as JSONL atomically (a crash leaves the old file or none, never half a file)."""
    from ..io import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair_record(pair), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- tokenized pairs and batches

@dataclass
class TokenizedPair:
    index: int                     # position in the pair file
    chosen: list[int]              # prompt + chosen reply ids
    chosen_mask: list[int]         # 1 on the reply's tokens (its end-of-turn token included)
    rejected: list[int]
    rejected_mask: list[int]
    margin: float = 0.0


def tokenize_pairs(pairs: list[Pair], tokenizer: Any, seq_len: int) -> tuple[list[TokenizedPair], int]:
    """Render each side with the chat template; pairs whose longer side exceeds seq_len are dropped
    (returned count), since cutting a reply would teach the model to prefer a cut-off answer."""
    from ..tokenizer.chat_template import render_chat_ids

    tokenized, dropped = [], 0
    for index, pair in enumerate(pairs):
        try:
            chosen, chosen_mask = render_chat_ids(tokenizer, pair.prompt + [{"role": "assistant", "content": pair.chosen}],
                                                  train_on="last_assistant")
            rejected, rejected_mask = render_chat_ids(
                tokenizer, pair.prompt + [{"role": "assistant", "content": pair.rejected}], train_on="last_assistant")
        except UserError as error:
            raise UserError(f"{pair.source}: {error}") from None
        if max(len(chosen), len(rejected)) > seq_len:
            dropped += 1
            continue
        tokenized.append(TokenizedPair(index, chosen, chosen_mask, rejected, rejected_mask, pair.margin))
    return tokenized, dropped


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> one right-padded [2B, T] batch: chosen rows first, then rejected (see the module doc)."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, masks)):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention[row, :n] = 1
        target = torch.tensor(ids[1:])
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        labels[row, :n - 1] = torch.where(trained, target, torch.full_like(target, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
            "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}


@dataclass
class PairBatches:
    """Seeded, resumable, rank-aware batches of pairs (the Trainer's BatchSource).

    Epoch e's order is a permutation seeded by (seed, e); a global batch is batch_size x world_size
    pairs and rank r takes its r-th slice, so every process gets the same number of pairs.
    State: (epoch, position) -> resuming gives exactly the same next batches.
    """

    pairs: list[TokenizedPair]
    batch_size: int
    pad_id: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self.pairs) < self.batch_size * self.world_size:
            raise UserError(f"{len(self.pairs)} training pairs are fewer than one global batch "
                            f"({self.batch_size} x {self.world_size} processes); lower batch_size or add pairs")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world_size
        if self.position + step > len(self._order):       # drop the ragged tail of an epoch
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        chosen = [self.pairs[i] for i in self._order[start:start + self.batch_size]]
        self.position += step
        return collate_pairs(chosen, self.pad_id)

    def iter_fixed(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of every pair once, in file order (evaluation); the last batch may be short."""
        mine = self.pairs[self.rank::self.world_size]
        for start in range(0, len(mine), self.batch_size):
            yield collate_pairs(mine[start:start + self.batch_size], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def pad_id_of(tokenizer: Any) -> int:
    return next((t for t in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eot_id", None))
                 if isinstance(t, int)), 0)
