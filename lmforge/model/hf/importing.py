"""HF tensors -> our state dict, checked name by name and shape by shape; `load_hf_model`."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...io import read_json
from ..builders import tied_names
from ..config import ModelConfig
from .families import SUPPORTED_ARCHITECTURES, config_from_hf, hf_architecture
from .rules import Family, Rule
from .weights import read_hf_weights

# HF tensors that carry no weights of their own (buffers, tied copies, heads we do not model).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids",
                    "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def _with_base_prefix(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Base-model checkpoints (BertModel, GPT2Model, the original GPT-2 files) name the trunk's
    tensors without the task model's prefix ("h.0..." instead of "transformer.h.0..."): add it."""
    if any(name.startswith(family.base_prefix) for name in state):
        return state
    return {(name if name.startswith(family.head_prefixes) else family.base_prefix + name): tensor
            for name, tensor in state.items()}


def hf_names(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names the family's rules use."""
    state = _with_base_prefix(state, family)
    return family.normalize_names(state) if family.normalize_names is not None else state


def check_layer_count(state: dict[str, torch.Tensor], config: ModelConfig, family: Family, where: str) -> None:
    """Refuse a config that claims more layers than the weights hold, before anything is built
    (a damaged n_layers of a billion would otherwise allocate a billion layers)."""
    pattern = re.compile(rf"{re.escape(family.layer_prefix)}(\d+)\.")
    layers = {int(match.group(1)) for match in map(pattern.match, state) if match}
    if config.n_layers > len(layers):
        raise UserError(f"{where} says {config.n_layers} layers but the weights hold {len(layers)}; "
                        "the weights do not match config.json or the files are incomplete")


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our state dict's tensor shapes for `config`, from a model built on the meta device: no
    memory is allocated, so a config that does not match the weights costs nothing to refuse."""
    from ..builders import build_model

    with torch.device("meta"):
        model = build_model(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def import_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, family: Family,
                      expected: dict[str, torch.Size], origin: dict[str, Path] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> our state dict. `expected` holds our tensors' shapes (see `expected_shapes`).

    Returns (our state dict, names of our optional tensors the checkpoint does not have).
    Raises UserError naming the file and tensor for a missing tensor or a shape mismatch.
    """
    origin = origin or {}
    state = hf_names(state, family)
    ours: dict[str, torch.Tensor] = {}
    missing_optional: list[str] = []
    used: set[str] = set()
    for rule in family.rules(config):
        absent = [name for name in rule.theirs if name not in state]
        if absent:
            if rule.optional:
                missing_optional.append(rule.ours)
                continue
            raise UserError(f"the checkpoint has no tensor '{absent[0]}' (needed for {rule.ours}); "
                            "the weights do not match config.json or the files are incomplete")
        parts = []
        for index, name in enumerate(rule.theirs):
            tensor = state[name]
            want = _hf_shape(expected[rule.ours], rule, index)
            if tuple(tensor.shape) != want:
                where = f" in '{origin[name]}'" if name in origin else ""
                raise UserError(f"tensor '{name}'{where} has shape {list(tensor.shape)} but config.json implies "
                                f"{list(want)}; the weights and config.json do not match")
            if not tensor.is_floating_point():
                where = f" in '{origin[name]}'" if name in origin else ""
                raise UserError(f"tensor '{name}'{where} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                                "not floating-point weights; the file is damaged -- re-download it")
            parts.append(tensor.t() if rule.conv1d else tensor)
            used.add(name)
        ours[rule.ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    _warn_unused(set(state) - used, config)
    return ours, missing_optional


def _hf_shape(our_shape: torch.Size, rule: Rule, index: int) -> tuple[int, ...]:
    shape = list(our_shape)
    if rule.split is not None:
        shape[0] = rule.split[index]
    return tuple(reversed(shape)) if rule.conv1d else tuple(shape)


def _warn_unused(unused: set[str], config: ModelConfig) -> None:
    tied_copies = {"lm_head.weight", "cls.predictions.decoder.weight"} if config.tie_embeddings else set()
    unexpected = sorted(name for name in unused if name not in tied_copies and not name.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        warnings.warn(f"ignored {len(unexpected)} checkpoint tensor(s) lmforge has no place for: {shown}",
                      stacklevel=3)


def load_hf_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32
                  ) -> tuple[nn.Module, list[str]]:
    """An HF model directory -> (our GPT or BERT in eval mode, missing optional tensors).

    Every name and shape is checked against config.json before the model is built, so a mismatch
    is a UserError and never a huge allocation."""
    from ..builders import build_model

    directory = Path(directory)
    hf = read_json(directory / "config.json", "Hugging Face config")
    where = f"'{directory / 'config.json'}'"
    family = SUPPORTED_ARCHITECTURES[hf_architecture(hf, where)]
    config = config_from_hf(hf, where)
    state, origin = read_hf_weights(directory)
    check_layer_count(hf_names(state, family), config, family, where)
    ours, missing = import_state_dict(state, config, family, expected_shapes(config), origin)
    model = build_model(config)
    load_into(model, ours, allowed_missing=set(missing) | set(family.own_heads) | tied_names(model))
    return model.to(dtype).eval(), missing


def load_into(model: nn.Module, state: dict[str, torch.Tensor], allowed_missing: set[str]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if name not in allowed_missing]
    if missing or result.unexpected_keys:
        # The rules cover every parameter, so this is a bug in a rule table, not user input.
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {result.unexpected_keys}")
