"""Which torch device a command runs on: one rule for training, inference and serving."""
from __future__ import annotations

import torch

from .errors import UserError


def pick_device(request: str, local_rank: int = 0, supported: tuple[str, ...] = ("cpu", "cuda")) -> torch.device:
    """`auto` is the process's GPU when CUDA is available, else the CPU.

    A device that is misspelt, absent on this machine, or not in `supported` is a UserError.
    """
    if request == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(request)
    except RuntimeError:
        raise UserError(f"device '{request}' is not a device name; use auto, {', '.join(supported)}") from None
    if device.type not in supported:
        raise UserError(f"device '{request}' is not supported here; use auto, {', '.join(supported)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{request}' was asked for but CUDA is not available; use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{request}' was asked for but MPS is not available; use cpu")
    return device
