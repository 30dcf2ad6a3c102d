"""Reading an HF directory's tensors: model.safetensors or pytorch_model.bin, one file or shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import UserError
from ...io import read_json


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of an HF directory (one file or shards; safetensors preferred over .bin).

    Returns (name -> tensor, name -> the file it came from) so errors can name the file.
    """
    single = [("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch_bin)]
    for file_name, reader in single:
        if (directory / file_name).is_file():
            return _read_files([directory / file_name], reader)
        index = directory / f"{file_name}.index.json"
        if index.is_file():
            return _read_files(_shard_files(index, directory), reader)
    raise UserError(f"'{directory}' has no model.safetensors or pytorch_model.bin (nor a sharded index); "
                    "point to a directory with Hugging Face weights")


def _shard_files(index: Path, directory: Path) -> list[Path]:
    """The weight files a shard index lists (its weight_map: tensor name -> file name)."""
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) and name and Path(name).name == name
                                                   for name in weight_map.values()):
        raise UserError(f"shard index '{index}' has no weight_map of tensor name -> file name in this directory; "
                        "re-download it")
    return [directory / name for name in sorted(set(weight_map.values()))]


def _read_files(files: list[Path], reader: Callable[[Path], dict[str, torch.Tensor]]
                ) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"weight file '{file}' (listed in the shard index) does not exist; re-download it")
        tensors = reader(file)
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return state, origin


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        # RuntimeError/TypeError: a header whose shapes and dtypes torch cannot build a tensor from.
        raise UserError(f"'{file}' is not a valid safetensors file ({error}); re-download or re-export it") from None


def read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only=True: a checkpoint can only hold tensors and containers, never code.
        state: Any = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError,
            AttributeError, TypeError, MemoryError, OverflowError) as error:
        # A damaged pickle fails inside the unpickler with whatever error its bytes happen to
        # trigger (a KeyError for a bad memo index, EOFError for a truncation, ...): the same
        # list `train.checkpoint.load_trainer_state` catches.
        raise UserError(f"'{file}' is not a loadable PyTorch weights file ({type(error).__name__}: {error}); "
                        "re-download it or convert it to safetensors") from None
    if not isinstance(state, dict):
        raise UserError(f"'{file}' does not hold a state dict; point to a Hugging Face model directory")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"'{file}' holds {type(value).__name__} under {name!r}, not a tensor: it is not a state "
                            "dict of weights; point to a Hugging Face model directory")
    return state
