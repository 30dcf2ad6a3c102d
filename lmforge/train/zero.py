"""ZeRO made visible: per-rank memory of the same model under DDP and FSDP2, beside the ZeRO paper's table.

    from lmforge.train.zero import ZeroConfig, measure
    rows = measure(ZeroConfig(model="small", world_size=2))     # spawns 2 gloo processes
    print(format_table(rows, ...))

Training one model with Adam keeps, per parameter: the weight, its gradient and two moments. ZeRO
(Rajbhandari et al. 2020) removes the copies data parallelism makes of them, stage by stage, on N
processes (Psi parameters; the paper's mixed-precision bytes 2 + 2 + K with K = 12, here fp32: 4 + 4 + 8):

    stage                       paper (fp16 + fp32 Adam)     fp32 training (this lab)
    0  DDP                      (2 + 2 + K) Psi              (4 + 4 + 8) Psi
    1  shard optimizer states   2 Psi + 2 Psi + K Psi / N    4 Psi + 4 Psi + 8 Psi / N
    2  ... and gradients        2 Psi + (2 + K) Psi / N      4 Psi + (4 + 8) Psi / N
    3  ... and parameters       (2 + 2 + K) Psi / N          (4 + 4 + 8) Psi / N

The strategies measured (torch's own implementations, one process group per run):
    ddp            DistributedDataParallel: everything replicated (ZeRO-0)
    zero2          FSDP2 fully_shard(reshard_after_forward=False): parameters stay gathered from the
                   forward to the backward, gradients and optimizer states sharded (ZeRO-2-like)
    zero3          FSDP2 fully_shard(reshard_after_forward=True): one block gathered at a time (ZeRO-3)
    zero3-offload  zero3 + CPUOffloadPolicy: shards, gradients and optimizer states live in host
                   memory; the device holds only the block being computed

Two measurements per rank:
  * tensor accounting: the bytes of the parameters, gradients and optimizer states alive (unique
    storages, this rank's local shards), sampled at every block boundary of the forward and the
    backward and after the optimizer step; the row is the sample with the most bytes;
  * peak RSS: the process's resident-set high-water mark (VmHWM, reset per strategy) above its RSS
    before the model was built, which adds activations, communication buffers and allocator slack.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError

Strategy = Literal["ddp", "zero2", "zero3", "zero3-offload"]
STRATEGIES: tuple[str, ...] = ("ddp", "zero2", "zero3", "zero3-offload")
STAGES = {"ddp": 0, "zero2": 2, "zero3": 3, "zero3-offload": 3}


@dataclass
class ZeroConfig:
    model: str = "small"                   # a preset (lmforge.model.presets), built with random weights
    world_size: int = 2                    # gloo processes on this machine
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    steps: int = 2                         # optimizer steps per strategy (the first creates Adam's state)
    batch_size: int = 2                    # sequences per rank
    seq_len: int = 64
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> "ZeroConfig":
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise UserError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        if self.world_size < 2:
            raise UserError(f"world_size must be at least 2 to shard anything, not {self.world_size}")
        if self.steps < 2:
            raise UserError("steps must be at least 2 (Adam's state exists from the first step on)")
        if min(self.batch_size, self.seq_len) < 1:
            raise UserError("batch_size and seq_len must be positive")
        return self


# ---------------------------------------------------------------- the prediction


def predicted_bytes(n_params: int, world_size: int, strategy: str, paper: bool = False) -> dict[str, float]:
    """Model-state bytes per rank that ZeRO predicts: {"params", "grads", "optimizer", "total"}.

    fp32 training (paper=False): 4 B weights, 4 B gradients, 8 B Adam moments per parameter. paper=True:
    the paper's mixed precision (2 B fp16 weights and gradients, K = 12 B of fp32 master weights and
    moments). zero2 keeps the full weights (they stay gathered from forward to backward)."""
    p, g, k = (2, 2, 12) if paper else (4, 4, 8)
    n, psi = world_size, float(n_params)
    stage = STAGES[strategy]
    params = psi * p / (n if stage >= 3 else 1)
    grads = psi * g / (n if stage >= 2 else 1)
    optimizer = psi * k / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


# ---------------------------------------------------------------- tensor accounting


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights, views and shards counted once)."""
    total = 0
    for tensor in tensors:
        local = _local(tensor)
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class StateMeter:
    """Samples the live bytes of the model's parameters, gradients and optimizer states; keeps the
    largest sample. Under FSDP2 the module's parameters are the gathered tensors while a block runs
    (and, without resharding, until its backward), and the local shards otherwise."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.peak = {"params": 0, "grads": 0, "optimizer": 0, "total": 0}
        self.where = ""

    def sample(self, where: str) -> None:
        seen: set[int] = set()
        parameters = list(self.model.parameters())
        params = _storage_bytes(parameters, seen)
        grads = _storage_bytes([p.grad for p in parameters if p.grad is not None], seen)
        states = [value for state in self.optimizer.state.values() for value in state.values()
                  if isinstance(value, torch.Tensor)]
        optimizer = _storage_bytes(states, seen)
        total = params + grads + optimizer
        if total > self.peak["total"]:
            self.peak = {"params": params, "grads": grads, "optimizer": optimizer, "total": total}
            self.where = where

    def attach(self, blocks: list[nn.Module]) -> None:
        """Sample before and after each block's forward (FSDP2 has gathered its weights before, and
        may have freed them after), and in backward when the gradient reaches the block's output."""
        for index, block in enumerate(blocks):
            def after_forward(module: nn.Module, args: Any, output: Any, index: int = index) -> None:
                self.sample(f"forward block {index}")
                first = output[0] if isinstance(output, tuple) else output
                if isinstance(first, torch.Tensor) and first.requires_grad:
                    first.register_hook(lambda grad: self.sample(f"backward block {index}"))
            block.register_forward_pre_hook(lambda module, args, index=index: self.sample(f"block {index} gathered"))
            block.register_forward_hook(after_forward)


# ---------------------------------------------------------------- peak RSS (Linux /proc)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    """Return freed memory to the OS, then reset the high-water mark (writing 5 to clear_refs)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                  # not glibc: the baseline is just less tight
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass                  # no /proc: the peak then covers the process's whole life


# ---------------------------------------------------------------- one strategy in one process


def _wrap(model: nn.Module, strategy: str) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from .distributed import broadcast_weights, transformer_blocks

    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    broadcast_weights(model)
    options: dict[str, Any] = {"reshard_after_forward": strategy != "zero2",
                               "offload_policy": (CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
                                                  if strategy == "zero3-offload" else OffloadPolicy())}
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def run_strategy(config: ZeroConfig, strategy: str, rank: int) -> dict[str, Any]:
    """Train config.steps steps of `strategy` in this process (the process group is up); measure."""
    import torch.nn.functional as F

    from ..model import build_model, get_preset
    from .distributed import transformer_blocks

    _reset_peak_rss()
    baseline = _rss_kib("VmRSS")
    torch.manual_seed(config.seed)
    raw = build_model(get_preset(config.model))
    n_params = sum(p.numel() for p in {id(p): p for p in raw.parameters()}.values())
    model = _wrap(raw, strategy)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=config.lr, foreach=False)
    meter = StateMeter(raw, optimizer)
    meter.attach(transformer_blocks(raw))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    vocab = raw.config.vocab_size
    for _ in range(config.steps):
        tokens = torch.randint(0, vocab, (config.batch_size, config.seq_len + 1), generator=generator)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        meter.sample("after backward")
        optimizer.step()
        meter.sample("after the optimizer step")
        optimizer.zero_grad(set_to_none=True)
    peak_rss = (_rss_kib("VmHWM") - baseline) * 1024
    result = {"strategy": strategy, "stage": STAGES[strategy], "rank": rank, "n_params": n_params,
              "measured": meter.peak, "peak_at": meter.where, "peak_rss_bytes": peak_rss,
              "loss": loss.item()}
    del model, raw, optimizer, meter
    return result


def _worker(rank: int, config: ZeroConfig, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=config.world_size,
                            timeout=datetime.timedelta(minutes=10))
    try:
        # One-time costs (gloo buffers, autograd and FSDP set-up, allocator arenas) would land on
        # whichever strategy ran first: pay them on a tiny model before measuring anything.
        warm_up = ZeroConfig(model="nano", world_size=config.world_size, steps=2, batch_size=1, seq_len=8)
        for strategy in ("ddp", "zero3"):
            run_strategy(warm_up, strategy, rank)
        results = []
        for strategy in config.strategies:
            results.append(run_strategy(config, strategy, rank))
            dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: ZeroConfig) -> list[list[dict[str, Any]]]:
    """Run every strategy on config.world_size gloo processes; results[strategy][rank]."""
    import torch.multiprocessing as mp

    from ..model import get_preset

    config.validate()
    try:
        get_preset(config.model)
    except (KeyError, ValueError, UserError) as error:
        raise UserError(f"model '{config.model}' is not a preset ({error}); pass e.g. --model small") from None
    with tempfile.TemporaryDirectory(prefix="lmforge-zero-") as out_dir:
        mp.spawn(_worker, args=(config, _free_port(), out_dir), nprocs=config.world_size, join=True)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(config.world_size)]
    return [[per_rank[r][s] for r in range(config.world_size)] for s in range(len(config.strategies))]


# ---------------------------------------------------------------- the table


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def format_table(results: list[list[dict[str, Any]]], world_size: int) -> str:
    """Markdown: per strategy, ZeRO's prediction (fp32 and the paper's mixed precision) beside the
    largest per-rank measurement (MiB)."""
    lines = ["| strategy | ZeRO stage | predicted fp32 P + G + O = total | measured P + G + O = total | "
             "measured / predicted | peak RSS above start | paper (2+2+K, K=12) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for ranks in results:
        first = ranks[0]
        strategy, n_params = first["strategy"], first["n_params"]
        worst = max(ranks, key=lambda r: r["measured"]["total"])["measured"]
        predicted = predicted_bytes(n_params, world_size, strategy)
        paper = predicted_bytes(n_params, world_size, strategy, paper=True)
        rss = max(r["peak_rss_bytes"] for r in ranks)

        def parts(d: dict[str, float]) -> str:
            return f"{_mb(d['params'])} + {_mb(d['grads'])} + {_mb(d['optimizer'])} = **{_mb(d['total'])}**"

        lines.append(f"| {strategy} | {first['stage']} | {parts(predicted)} | {parts(worst)} | "
                     f"{worst['total'] / predicted['total']:.2f} | {_mb(rss)} | {_mb(paper['total'])} |")
    return "\n".join(lines)


def summary(results: list[list[dict[str, Any]]], config: ZeroConfig) -> dict[str, Any]:
    """One JSON-able record: per strategy the per-rank measurements and the predictions."""
    return {"config": asdict(config), "strategies": [
        {"strategy": ranks[0]["strategy"], "n_params": ranks[0]["n_params"],
         "predicted": predicted_bytes(ranks[0]["n_params"], config.world_size, ranks[0]["strategy"]),
         "ranks": ranks} for ranks in results]}


# ---------------------------------------------------------------- DeepSpeed (GPU users)


def deepspeed_config(config: Any, stage: Literal[2, 3], world_size: int = 1, offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed `ds_config.json` equivalent to a TrainConfig (lmforge's loop settings), ZeRO stage 2 or 3.

    Key names follow DeepSpeed's configuration reference: the batch sizes, AdamW with our betas,
    eps and weight decay, warmup then cosine decay (WarmupCosineLR), gradient clipping, bf16/fp16 as
    the run's precision, and `zero_optimization` (stage 3 also gathers the 16-bit weights on save;
    offload puts the optimizer (and at stage 3 the parameters) in CPU memory)."""
    if stage not in (2, 3):
        raise UserError(f"DeepSpeed stage must be 2 or 3, not {stage}")
    precision = getattr(config, "precision", "fp32")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=5e8, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size=5e8, stage3_param_persistence_threshold=1e5,
                    stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    max_steps = getattr(config, "max_steps", None) or 1000
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.batch_size * config.grad_accum * world_size,
        "gradient_clipping": config.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": config.lr, "betas": [config.beta1, config.beta2],
                                                  "eps": config.eps, "weight_decay": config.weight_decay}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": max_steps,
                                                           "warmup_num_steps": config.warmup_steps,
                                                           "cos_min_ratio": config.min_lr / config.lr}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": config.log_interval,
        "wall_clock_breakdown": False,
    }
