"""Tokenized chat examples -> training batches for SFT: packing or padding, seeded and resumable.

    examples, report = fit_examples(tokenized, seq_len=512)      # truncation, with counts
    batches = SFTBatches(examples, batch_size=8, seq_len=512, packing=True, seed=0)
    batch = batches.next_batch()

An example is a token sequence with a train mask (1 = learn to predict this token: the assistant
replies and their end-of-turn token). Its labels are the next token where the mask is set:
labels[t] = ids[t + 1] if mask[t + 1] else -100, and the last token predicts nothing, so packed
examples never learn to predict the start of their neighbour.

Packing (best-fit decreasing): examples are placed, longest first, into the row with the least
room left that still fits them, so rows are nearly full and no example is split. A packed row
carries position_ids (restarting at 0 for each example) and document_ids, from which the model
builds a block-diagonal causal mask: an example never attends to what is packed before it.
Padding puts one example per row, padded to the longest in the batch (attention_mask 0 = pad).

Batches are deterministic: epoch e's order is a permutation seeded by (seed, e); with several
processes each takes every world_size-th row of that order (the same number each, so no process
waits for another). The state is (epoch, position): resuming gives exactly the same next batches.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import UserError

IGNORE_INDEX = -100


@dataclass
class ChatExample:
    ids: list[int]
    mask: list[int]          # 1 = trained on (same length as ids)


@dataclass
class FitReport:
    """What fitting the examples into seq_len did to them (reported to the user, never silent)."""

    kept: int = 0            # unchanged
    truncated: int = 0       # later turns dropped; every kept assistant turn still ends in its stop token
    dropped: int = 0         # even the first assistant turn (with its stop token) did not fit

    def describe(self) -> str:
        total = self.kept + self.truncated + self.dropped
        return (f"{total} examples: {self.kept} whole, {self.truncated} truncated after their last complete "
                f"assistant turn, {self.dropped} dropped (first assistant turn longer than seq_len)")


def fit_examples(examples: Sequence[ChatExample], seq_len: int) -> tuple[list[ChatExample], FitReport]:
    """Cut examples longer than seq_len after the last trained span that ends inside it.

    A trained span (an assistant reply) ends with its stop token; cutting inside one would teach
    the model to stop mid-reply or never, so an example is cut only at a span's end, and dropped
    when not even its first span fits.
    """
    report, fitted = FitReport(), []
    for example in examples:
        if len(example.ids) <= seq_len:
            fitted.append(example)
            report.kept += 1
            continue
        # span ends: positions t with mask[t] = 1 and (t is last or mask[t + 1] = 0)
        ends = [t for t in range(min(len(example.mask), seq_len))
                if example.mask[t] and (t + 1 == len(example.mask) or not example.mask[t + 1])]
        if not ends:
            report.dropped += 1
            continue
        cut = ends[-1] + 1
        fitted.append(ChatExample(example.ids[:cut], example.mask[:cut]))
        report.truncated += 1
    if not fitted:
        raise UserError(f"no example fits in seq_len={seq_len} tokens ({report.describe()}); raise seq_len")
    return fitted, report


def example_labels(example: ChatExample) -> list[int]:
    """labels[t] = ids[t + 1] where mask[t + 1] is set, else IGNORE_INDEX; the last predicts nothing."""
    labels = [ids if keep else IGNORE_INDEX for ids, keep in zip(example.ids[1:], example.mask[1:])]
    return labels + [IGNORE_INDEX]


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: lists of example indices per row, each summing to <= capacity.

    Deterministic: ties go to the lower index. O(n log n) with a sorted list of rooms left.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []          # (room left, row index), sorted
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than the row's {capacity}")
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot < len(rooms):
            room, row = rooms.pop(slot)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - length > 0:
            bisect.insort(rooms, (room - length, row))
    return rows


class SFTBatches:
    """A resumable batch source over chat examples (lmforge.train's BatchSource protocol).

    Batches: input_ids, labels, attention_mask [B, T]; packed ones also position_ids and
    document_ids [B, T] (-1 on padding). T is the batch's longest row (<= seq_len).
    """

    def __init__(self, examples: Sequence[ChatExample], batch_size: int, seq_len: int, *, packing: bool = True,
                 pad_id: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if not examples:
            raise UserError("there are no training examples; check the data")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.packing, self.pad_id, self.seed, self.shuffle = packing, pad_id, seed, shuffle
        self.rank, self.world_size = rank, world_size
        lengths = [len(example.ids) for example in self.examples]
        # Rows are fixed once; only their order changes between epochs.
        self.rows = pack_best_fit(lengths, seq_len) if packing else [[i] for i in range(len(self.examples))]
        if len(self.rows) < world_size:
            raise UserError(f"{len(self.rows)} rows of data cannot be shared by {world_size} processes; add data")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    # -- the BatchSource protocol ---------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            rows.append(self.rows[self._order[self.position]])
            self.position += 1
        return self.collate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)

    # -- helpers --------------------------------------------------------------------------

    @property
    def rows_per_epoch(self) -> int:
        """Rows this process sees per epoch (every process the same number)."""
        return len(self.rows) // self.world_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.rows), generator=generator).tolist()
        else:
            order = list(range(len(self.rows)))
        usable = self.rows_per_epoch * self.world_size         # equal shares: drop the remainder
        return order[:usable][self.rank::self.world_size]

    def collate(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Rows of example indices -> a batch of [B, T] LongTensors, T = the longest row's tokens
        (never more than seq_len): padding costs as much compute as real tokens."""
        width = max(sum(len(self.examples[index].ids) for index in row) for row in rows)
        shape = (len(rows), width)
        batch = {"input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
                 "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long)}
        if self.packing:
            batch["position_ids"] = torch.zeros(shape, dtype=torch.long)
            batch["document_ids"] = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for document, index in enumerate(row):
                example = self.examples[index]
                end = start + len(example.ids)
                batch["input_ids"][r, start:end] = torch.tensor(example.ids)
                batch["labels"][r, start:end] = torch.tensor(example_labels(example))
                batch["attention_mask"][r, start:end] = 1
                if self.packing:
                    batch["position_ids"][r, start:end] = torch.arange(len(example.ids))
                    batch["document_ids"][r, start:end] = document
                start = end
        return batch

    def iter_fixed(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row of this process's share once, in a fixed order (for evaluation)."""
        # Equal shares: under FSDP every process must run the same number of forwards.
        order = list(range(self.rows_per_epoch * self.world_size))[self.rank::self.world_size]
        for start in range(0, len(order), self.batch_size):
            yield self.collate([self.rows[i] for i in order[start:start + self.batch_size]])
