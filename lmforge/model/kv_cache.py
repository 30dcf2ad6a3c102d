"""The KV cache: keys and values of past tokens, so decoding a new token costs O(S), not O(S^2).

Memory per layer: 2 x [B_max, Hkv, T_max, D]. Each cache row has its own length, so rows can hold
sequences of different lengths, and a forward may touch any subset of rows (`rows`): that is
what the inference engine's continuous batching uses to add and remove requests between steps.
"""
from __future__ import annotations

import torch

from ..errors import UserError


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens stored per row
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self._row_slice: slice | None = None     # the current forward's rows, when they are a contiguous range

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        config = model.config
        parameter = next(model.parameters())
        return cls(config.n_layers, batch_size, max_seq_len or config.max_seq_len, config.n_kv_heads,
                   config.head_dim, dtype or parameter.dtype, parameter.device)

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the cached tokens of `rows` (all rows by default). Stale values are overwritten later."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Make rows `target` [n] hold what rows `source` [n] hold (keys, values, lengths): one prompt
        prefilled once serves several sequences (the engine's prefix sharing)."""
        used = int(self.lengths[source].max()) if len(source) else 0    # positions past it are stale anyway
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :used] = keys[source, :, :used]
            values[target, :, :used] = values[source, :, :used]
        self.lengths[target] = self.lengths[source]

    def plan(self, rows: torch.Tensor | None, length: int, attention_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Positions for `length` new tokens per row. Returns (positions [B, T], new lengths [B], S)."""
        # Rows r0, r0+1, ... (a full engine batch, the usual decode step) are read as a slice: a view of
        # the cache instead of a gathered copy of every row's keys and values in every layer.
        self._row_slice = None
        if rows is not None:
            row_list = rows.tolist()
            if row_list == list(range(row_list[0], row_list[0] + len(row_list))):
                self._row_slice = slice(row_list[0], row_list[0] + len(row_list))
        start = self.lengths if rows is None else self.lengths[rows]
        if rows is None and attention_mask is not None:
            start = start[: attention_mask.shape[0]]
        positions = start[:, None] + torch.arange(length, device=start.device)
        key_length = int(start.max()) + length
        if key_length > self.max_seq_len:
            raise UserError(f"the sequence needs {key_length} positions but the KV cache holds {self.max_seq_len}; "
                            "shorten the prompt or max_new_tokens, or raise the context length")
        added = length if attention_mask is None else attention_mask.sum(dim=1)
        return positions, start + added, key_length

    def commit(self, rows: torch.Tensor | None, new_lengths: torch.Tensor) -> None:
        if rows is None:
            self.lengths[: new_lengths.shape[0]] = new_lengths
        else:
            self.lengths[rows] = new_lengths

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None,
               positions: torch.Tensor, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at `positions` and return all keys/values [B, Hkv, S, D]."""
        keys, values = self.keys[layer], self.values[layer]
        batch, length = positions.shape
        k, v = k.to(keys.dtype), v.to(values.dtype)
        if rows is None and bool((positions[:, 0] == positions[0, 0]).all()):
            # Every row starts at the same position: a plain slice write/read, no gather.
            start = int(positions[0, 0])
            keys[:batch, :, start:start + length] = k
            values[:batch, :, start:start + length] = v
            return keys[:batch, :, :key_length], values[:batch, :, :key_length]
        if rows is None or self._row_slice is not None:
            rows_view = slice(0, batch) if rows is None else self._row_slice
            keys, values = keys[rows_view], values[rows_view]                 # views of those rows
            row_index = torch.arange(batch, device=keys.device)
            keys[row_index[:, None], :, positions] = k.transpose(1, 2)
            values[row_index[:, None], :, positions] = v.transpose(1, 2)
            return keys[:, :, :key_length], values[:, :, :key_length]
        # Advanced indices on dims 0 and 2 (separated by a slice) put the indexed dims first: [B, T, Hkv, D].
        keys[rows[:, None], :, positions] = k.transpose(1, 2)
        values[rows[:, None], :, positions] = v.transpose(1, 2)
        return keys[rows, :, :key_length], values[rows, :, :key_length]
