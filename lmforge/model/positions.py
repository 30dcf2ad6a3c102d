"""Position information: learned, sinusoidal, RoPE and ALiBi.

- learned / sinusoidal: a vector per position added to the token embedding (GPT-2 / the original
  Transformer). They encode *absolute* position.
- RoPE rotates each (query, key) channel pair by an angle proportional to the position, so the
  dot product q_m . k_n depends only on m - n: *relative* position, with no extra parameters.
- ALiBi adds -slope_h * distance to the attention scores: a per-head linear recency bias.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """[n_positions, dim]: sin on even channels, cos on odd ones (Vaswani et al. 2017)."""
    positions = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return table


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE, extended on demand for longer positions.

    interleaved=False rotates channel i with channel i + d/2 (HF Llama's "rotate_half").
    interleaved=True rotates channel 2i with 2i+1 (the RoFormer paper, GGUF/llama.cpp, Meta's code).
    Both give the same attention scores up to a fixed permutation of the q/k projection rows.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, interleaved: bool = False, max_positions: int = 2048) -> None:
        super().__init__()
        self.head_dim, self.theta, self.interleaved = head_dim, theta, interleaved
        inverse_frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inverse_frequencies", inverse_frequencies, persistent=False)
        self._build(max_positions)

    def _build(self, n_positions: int) -> None:
        angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), self.inverse_frequencies.float())
        self.register_buffer("cos", angles.cos(), persistent=False)  # [n_positions, head_dim/2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    def extend(self, n_positions: int) -> None:
        """Make the tables cover positions < n_positions (called once per forward, with a Python
        int, so the hot path never syncs on a tensor value; that also keeps torch.compile graphs whole)."""
        if n_positions > self.cos.shape[0]:
            device = self.cos.device
            self._build(max(n_positions, 2 * self.cos.shape[0]))
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)

    def tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] (or [1, T]), below the tables' length (see extend) -> (cos, sin), each
        [B, 1, T, head_dim/2], broadcastable over heads. Computed once per forward, shared by all layers."""
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, head_dim]; position_ids: [B, T] or [1, T] -> rotated x, same shape and dtype."""
        return apply_rotary(x, *self.tables(position_ids), self.interleaved)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate channel pairs (a, b) -> (a cos - b sin, a sin + b cos), computed in fp32."""
    dtype = x.dtype
    x = x.float()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(dtype)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """[n_heads] geometric slopes 2^(-8/n), 2^(-16/n), ... (Press et al. 2022), with the paper's
    interleaving rule when n_heads is not a power of two."""
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)
