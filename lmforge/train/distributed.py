"""Data parallelism: DDP or FSDP2, over gloo (CPU) or NCCL (GPU).

`torchrun --nproc_per_node=N -m lmforge pretrain ...` starts N processes and sets RANK,
WORLD_SIZE and LOCAL_RANK. Each process holds the model (DDP) or a shard of it (FSDP2),
trains on different data, and gradients are averaged across processes in backward.
Only rank 0 logs and writes files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..device import pick_device


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False     # this context created the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over every process (the tensor itself when there is one process)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (pickled; use for small state such as RNG states)."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed(device_request: str = "auto") -> DistributedContext:
    """Join the process group torchrun set up (if any); a single process needs nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(device=pick_device(device_request))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                              owns_process_group=owns)


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group if `context` joined it (a caller's own group is left alone)."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):     # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: the children of the model's outermost nn.ModuleLists."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():      # pre-order: an outer list comes before anything in it
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            blocks.extend(module)
            inside.update(id(sub) for child in module for sub in child.modules())
    return blocks


@torch.no_grad()
def broadcast_weights(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (DDP does this itself)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor, src=0)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: shard each block's parameters across processes, then the rest (embeddings, head).

    Each block's weights are gathered just before it runs and freed after, so a process holds only
    its shard plus one block at a time; gradients are reduce-scattered (averaged) back to shards.
    """
    from torch.distributed.fsdp import fully_shard

    broadcast_weights(model)       # every shard must come from the same initial weights
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def wrap_data_parallel(model: nn.Module, context: DistributedContext) -> nn.Module:
    """DDP: gradients are all-reduced (averaged) in buckets while backward is still running."""
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, raw_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(raw_model, "set_requires_gradient_sync"):      # an FSDP2-sharded model
        raw_model.set_requires_gradient_sync(enabled)
    yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered into the full tensor (a collective); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
