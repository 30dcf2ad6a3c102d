"""Batches of token windows read from a memory-mapped shard.

    loader = CausalLMLoader("data/shakespeare", "train", batch_size=16, seq_len=256, seed=0)
    batch = loader.next_batch()          # {"input_ids": [B, T], "labels": [B, T]} LongTensors
    saved = loader.state_dict()          # {"seed": 0, "step": 1}: put it in the checkpoint
    loader.load_state_dict(saved)        # a restored loader yields exactly the same next batches

Batch k of rank r is drawn from its own random generator, seeded by (seed, r, k). That makes
resuming trivial (the state is just the step), and gives every distributed rank a different
stream of windows without any coordination: rank 0 and rank 1 never share a generator.

Masked LM follows BERT (Devlin et al. 2018): choose 15% of the tokens as prediction targets; of
those, 80% become [MASK], 10% a random token and 10% stay unchanged (so the model cannot learn
that only [MASK] positions matter). Special tokens such as <|endoftext|> are never chosen.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from .shards import ShardMeta, open_tokens, read_meta

IGNORE_INDEX = -100  # the label cross-entropy skips (torch's default ignore_index)


def resolve_split(path_or_dir: str | os.PathLike, split: str) -> tuple[Path, str]:
    """A shard directory plus split, or the path of a .bin inside one (its name is the split)."""
    path = Path(path_or_dir)
    if path.suffix == ".bin":
        return path.parent, path.stem
    return path, split


@dataclass(frozen=True)
class Masking:
    """BERT's masking scheme over a vocabulary; `apply` turns token windows into an MLM batch."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    replace_with_mask: float = 0.8  # of the chosen tokens; then half of the rest random, half unchanged

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"mask_prob {self.mask_prob} is outside (0, 1); BERT uses 0.15")
        if not 0 <= self.mask_id < self.vocab_size:
            raise UserError(f"mask token id {self.mask_id} is outside the vocabulary of {self.vocab_size}; "
                            "pass the mask id of the shards' tokenizer (or leave it to the shards' meta.json)")

    @classmethod
    def from_meta(cls, meta: ShardMeta, mask_prob: float = 0.15) -> Masking:
        """The mask token, vocabulary and specials the shards were prepared with."""
        if meta.mask_id is None:
            raise UserError(f"the shards' tokenizer '{meta.tokenizer}' has no mask token, which masked-LM training "
                            "needs; prepare the shards with a tokenizer that has one (e.g. trained with the default "
                            "special tokens, which include <|mask|>)")
        return cls(meta.mask_id, meta.vocab_size, tuple(sorted(meta.special_tokens.values())), mask_prob)

    def apply(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B, T] int64 -> (input_ids [B, T], labels [B, T]; IGNORE_INDEX where not chosen)."""
        special = np.isin(tokens, self.special_ids)
        chosen = (rng.random(tokens.shape) < self.mask_prob) & ~special
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        # One uniform draw per token splits the chosen ones 80/10/10.
        roll = rng.random(tokens.shape)
        to_mask = chosen & (roll < self.replace_with_mask)
        to_random = chosen & (roll >= (1.0 + self.replace_with_mask) / 2)
        inputs = tokens.copy()
        inputs[to_mask] = self.mask_id
        ordinary = self.ordinary_ids
        inputs[to_random] = ordinary[rng.integers(0, len(ordinary), size=int(to_random.sum()))]
        return inputs, labels

    @functools.cached_property
    def ordinary_ids(self) -> np.ndarray:
        """Random replacements are ordinary tokens: a random special token would be a give-away."""
        return np.setdiff1d(np.arange(self.vocab_size), self.special_ids)


class _RandomWindowLoader:
    """Random windows of `window` tokens from one split; batch k uses the generator (seed, rank, k)."""

    window_extra = 0  # tokens beyond seq_len each window needs (1 for the shifted labels)

    def __init__(self, path_or_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        directory, split = resolve_split(path_or_dir, split)
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be at least 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise UserError(f"seed {seed} is negative; use a seed >= 0")
        self.meta = read_meta(directory)
        self.tokens = open_tokens(directory, split, self.meta)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self.n_starts = len(self.tokens) - (seq_len + self.window_extra) + 1
        if self.n_starts < 1:
            raise UserError(f"the {split} split of '{directory}' has {len(self.tokens)} tokens, fewer than one "
                            f"window of {seq_len + self.window_extra}; lower seq_len or prepare a larger corpus")

    def _next_windows(self) -> tuple[np.ndarray, np.random.Generator]:
        """[B, seq_len + window_extra] int64 token windows, and this batch's generator for more draws."""
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        self.step += 1
        starts = rng.integers(0, self.n_starts, size=self.batch_size)
        offsets = np.arange(self.seq_len + self.window_extra)
        return self.tokens[starts[:, None] + offsets].astype(np.int64), rng

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue the stream. Rank is not saved: every rank restores the same
        state (e.g. rank 0's) and continues its own stream, since all ranks advance in lockstep."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


class CausalLMLoader(_RandomWindowLoader):
    """Random windows for next-token prediction: labels are the inputs shifted left by one."""

    window_extra = 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids": [B, T], "labels": [B, T]} with labels[:, t] == the token after input_ids[:, t]."""
        windows, _ = self._next_windows()
        return {"input_ids": torch.from_numpy(windows[:, :-1].copy()),
                "labels": torch.from_numpy(windows[:, 1:].copy())}


class MaskedLMLoader(_RandomWindowLoader):
    """Random windows with BERT masking. mask_id, vocab_size and special_ids default to the shards'."""

    def __init__(self, path_or_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, seed: int,
                 mask_id: int | None = None, vocab_size: int | None = None,
                 special_ids: Sequence[int] | None = None, mask_prob: float = 0.15,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(path_or_dir, split, batch_size, seq_len, seed, rank, world_size)
        if mask_id is None:
            mask_id = Masking.from_meta(self.meta).mask_id
        self.masking = Masking(
            mask_id=mask_id,
            vocab_size=self.meta.vocab_size if vocab_size is None else vocab_size,
            special_ids=tuple(sorted(self.meta.special_tokens.values() if special_ids is None else special_ids)),
            mask_prob=mask_prob,
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "attention_mask"}, each [B, T]; labels are -100 where not chosen."""
        windows, rng = self._next_windows()
        inputs, labels = self.masking.apply(windows, rng)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "attention_mask": torch.ones(windows.shape, dtype=torch.long)}


def iter_eval_batches(path_or_dir: str | os.PathLike, split: str = "val", batch_size: int = 8,
                      seq_len: int = 256, max_batches: int | None = None, masking: Masking | None = None,
                      seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches covering a split in consecutive, non-overlapping windows.

    Causal LM (masking=None): window i is inputs tokens[i*T : i*T+T], labels one further on, so every
    token after the first is predicted exactly once. Masked LM: window i is tokens[i*T : i*T+T],
    masked with a generator seeded by (seed, rank, batch index), the same on every call.
    Ranks take every world_size-th window; the last batch may be smaller; max_batches caps the count.
    """
    directory, split = resolve_split(path_or_dir, split)
    tokens = open_tokens(directory, split)
    extra = 0 if masking else 1
    n_windows = (len(tokens) - extra) // seq_len
    if n_windows < 1:
        raise UserError(f"the {split} split of '{directory}' has {len(tokens)} tokens, fewer than one window of "
                        f"{seq_len + extra}; lower seq_len or hold out more data with --val-fraction")
    window_ids = np.arange(rank, n_windows, world_size)
    offsets = np.arange(seq_len + extra)
    for batch_index, start in enumerate(range(0, len(window_ids), batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            return
        starts = window_ids[start:start + batch_size] * seq_len
        windows = tokens[starts[:, None] + offsets].astype(np.int64)
        if masking is None:
            yield {"input_ids": torch.from_numpy(windows[:, :-1].copy()),
                   "labels": torch.from_numpy(windows[:, 1:].copy())}
        else:
            inputs, labels = masking.apply(windows, np.random.default_rng([seed, rank, batch_index]))
            yield {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                   "attention_mask": torch.ones(windows.shape, dtype=torch.long)}
