"""Throughput figures: model FLOPs utilisation (MFU) and memory.

MFU = (tokens/s x training FLOPs per token) / (peak FLOP/s of the hardware). FLOPs per token come
from the model (about 6N plus attention; see lmforge.model.info). The peak is `peak_flops` from the
config, or a quick measurement of a large matmul on this device in the training dtype, cached in
~/.cache/lmforge/peak.json so it is measured once per machine.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import write_json_atomic

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores-{torch.get_num_threads()}threads"


def measure_matmul_flops(device: torch.device, precision: str, seconds: float = 0.4) -> float:
    """FLOP/s of square matmuls on this device and dtype (< 1 s): the best of several short rounds,
    so that a moment of contention from other processes does not lower the peak."""
    dtype = _DTYPES[precision]
    size = 4096 if device.type == "cuda" else _cpu_matrix_size(dtype)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    # F.linear (x @ w.T) is the call nn.Linear makes; on CPUs it can take a different kernel than
    # torch.matmul (oneDNN vs a generic BLAS fallback for bf16), so measure what models run.
    F.linear(a, b)        # warm up kernels and caches
    # GPU matmuls are queued asynchronously: time batches of them between synchronisations.
    per_round = 10 if device.type == "cuda" else 2
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        round_start = time.perf_counter()
        for _ in range(per_round):
            F.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size ** 3 * per_round / (time.perf_counter() - round_start))
    return best


def _cpu_matrix_size(dtype: torch.dtype, max_size: int = 2048, target_seconds: float = 0.02) -> int:
    """The largest power-of-two size whose matmul still takes under ~20 ms: small matrices
    under-report a fast CPU's peak (overheads dominate), while big ones take seconds in a dtype
    the CPU only emulates (bf16 without AVX512-BF16/AMX)."""
    size = 256
    while size < max_size:
        a = torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        F.linear(a, a)
        if time.perf_counter() - start > target_seconds:
            break
        size *= 2
    return size


def peak_flops(device: torch.device, precision: str, configured: float | None = None) -> float:
    """The configured peak, else the cached (or freshly measured) matmul FLOP/s of this device."""
    if configured is not None:
        return configured
    key = f"{_device_name(device)}|{precision}"
    path = cache_dir() / "peak.json"
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache.get(key), (int, float)):
        cache[key] = measure_matmul_flops(device, precision)
        try:
            write_json_atomic(path, cache)
        except OSError:
            pass   # an unwritable cache only means measuring again next time
    return float(cache[key])


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> the fastest sensible training precision on this device; anything else unchanged.

    bf16 is the GPU default (fp16 only where bf16 is missing). On CPU it depends on the chip: with
    AMX or AVX512-BF16, bf16 matmuls run several times faster than fp32; on AVX2-only CPUs they are
    emulated and run many times slower. So measure (once, cached) rather than guess.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    faster = peak_flops(device, "bf16") > 1.2 * peak_flops(device, "fp32")
    return "bf16" if faster else "fp32"


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or this process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class ThroughputWindow:
    """Tokens and training seconds since the last log (evaluation and checkpoint time excluded)."""

    def __init__(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0
