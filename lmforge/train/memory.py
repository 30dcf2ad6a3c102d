"""The training switches that trade speed for memory: activation checkpointing, and handing freed
host memory back to the operating system (glibc's `malloc_trim`).

    apply_memory_options(model, config)   # what the Trainer does with the two TrainConfig fields
    trim_host_memory(model, every=3)      # TrainConfig(trim_host_memory=3)

Why. On CPU every tensor comes from glibc's malloc. A training step allocates and frees hundreds
of 1-30 MB activations whose lifetimes interleave (a block's recompute in backward, the
gradients, the next block's), and glibc keeps freed heap pages resident for reuse. For a
SmolLM2-135M QLoRA step the live tensors peak at ~0.5 GB while the resident set reaches 1.3-1.5 GB,
and by how much varies from run to run. `malloc_trim(0)` hands every whole free page back
(madvise), so the resident set follows what is live. Calling it after the model's forward and
after every `every`-th block's forward (which, with activation checkpointing, includes each
recompute in backward) took that QLoRA peak from 1.25 to 1.02-1.05 GB (every=3), at 10-15% of the
tokens/s: pages handed back are faulted in again when reused. Hence off by default.

A no-op where the C library has no malloc_trim (macOS, musl): nothing else changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any

from torch import nn

from ..errors import UserError


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def malloc_trim() -> bool:
    """Return freed heap pages to the OS; False where the C library cannot (then nothing happens)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on the model's own switch (lmforge's Transformer has `gradient_checkpointing`)."""
    switches = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    if not switches:
        raise UserError(f"{type(model).__name__} has no gradient_checkpointing switch; "
                        "set activation_checkpointing=false")
    for module in switches:
        module.gradient_checkpointing = True


def apply_memory_options(model: nn.Module, config: Any) -> None:
    """TrainConfig's activation_checkpointing and trim_host_memory, applied to the trained module."""
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    if config.trim_host_memory:
        trim_host_memory(model, config.trim_host_memory)


def trim_host_memory(model: nn.Module, every: int) -> list[Any]:
    """Call malloc_trim after `model`'s forward and after every `every`-th transformer block's
    forward (recomputes included). Returns the hook handles (`.remove()` undoes it)."""
    if every < 1:
        raise UserError(f"trim_host_memory={every}: give the number of blocks between trims (>= 1), or 0 for off")
    if _libc() is None:
        return []

    def trim(*_: Any) -> None:            # a forward hook must return None (a value replaces the output)
        malloc_trim()

    blocks = [block for module in model.modules() if isinstance(getattr(module, "blocks", None), nn.ModuleList)
              for block in module.blocks]
    handles = [model.register_forward_hook(trim)]
    handles += [block.register_forward_hook(trim) for index, block in enumerate(blocks) if (index + 1) % every == 0]
    return handles
