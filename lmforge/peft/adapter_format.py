"""LoRA adapters in PEFT's format: what `peft.PeftModel.from_pretrained` reads, and back.

    save_adapter(model, "out/adapter", base_model_name_or_path="path/to/hf-export")
    load_adapter(model, "out/adapter")            # also adapters that PEFT trained

    DIR/adapter_config.json        PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules, ...
    DIR/adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight   [r, in]
                                   base_model.model.<HF module>.lora_B.weight   [out, r]
                                   base_model.model.<HF module>.lora_magnitude_vector  [out] (DoRA)

The HF module names are those of the model our export writes (lmforge/model/hf/): for the Llama
family `model.layers.0.self_attn.q_proj`, for GPT-2 `transformer.h.0.attn.c_attn`. One of our
fused layers is several HF modules (qkv = q_proj, k_proj, v_proj), and each of its adapted
slices is one HF module's adapter, so nothing is converted but the names. Where our export
reorders q/k rows (interleaved RoPE), the same reordering is applied to the adapters' rows.
GPT-2's Conv1D layers (fan_in_fan_out) keep lora_A [r, in] and lora_B [out, r] in PEFT too.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from .lora import LoRAConfig, has_lora, install_lora, lora_layers
from .targets import Slice, linear_slices

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude",
             ".lora_magnitude_vector.weight": "magnitude"}
# PEFT options that change what an adapter computes and that we do not implement: (key, harmless values).
_UNSUPPORTED = {
    "bias": ("none", None), "lora_bias": (False, None), "modules_to_save": (None, []),
    "layer_replication": (None, []), "use_qalora": (False, None), "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, []), "alora_invocation_tokens": (None, []), "use_bdlora": (None, False),
    "megatron_config": (None,), "arrow_config": (None,), "monteclora_config": (None,), "kasa_config": (None,),
}


def _hf_family(model: nn.Module, doing: str):
    from ..model.hf.export import hf_family_for

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "arch"):
        raise UserError(f"cannot {doing}: the model is not an lmforge GPT or BERT (it has no ModelConfig)")
    try:
        return hf_family_for(config)
    except UserError as error:
        raise UserError(f"cannot {doing} in PEFT's format, whose names are the Hugging Face model's, because the "
                        f"base model has no Hugging Face equivalent ({error}); keep lmforge.peft.lora_state_dict(model) "
                        "with the model instead") from None


# ----------------------------------------------------------------------------- RoPE row order


def _half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of lmforge.model.hf.llama.interleaved_to_half_split (rows of each head)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _rope_heads(model: nn.Module, path: str, piece: Slice) -> int | None:
    """Heads whose rows our HF export reorders in this slice (interleaved RoPE q and k), else None."""
    config = model.config
    if not (config.position == "rope" and config.rope_interleaved and path.endswith("attn.qkv")):
        return None
    return {"q": config.n_heads, "k": config.n_kv_heads}.get(piece.name)


# ----------------------------------------------------------------------------- saving


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names for the HF model our export writes."""
    from ..model.hf.llama import interleaved_to_half_split

    _hf_family(model, "save the adapter")
    if not has_lora(model):
        raise UserError("the model has no LoRA adapters to save; apply_lora(model, config) or load_adapter first")
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        for piece, adapter in layer.adapted():
            key = f"{PREFIX}{piece.hf_name}"
            B = adapter.B.detach()
            magnitude = adapter.magnitude.detach() if adapter.use_dora else None
            heads = _rope_heads(model, path, piece)
            if heads is not None:
                B = interleaved_to_half_split(B, heads)
                magnitude = interleaved_to_half_split(magnitude, heads) if magnitude is not None else None
            state[f"{key}.lora_A.weight"] = adapter.A.detach()
            state[f"{key}.lora_B.weight"] = B
            if magnitude is not None:
                state[f"{key}.lora_magnitude_vector"] = magnitude
    return {name: tensor.cpu().contiguous().clone() for name, tensor in state.items()}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's adapter_config.json for the model's adapters."""
    architecture, _ = _hf_family(model, "save the adapter")
    config: LoRAConfig = getattr(model, "lora_config", None) or LoRAConfig()
    adapted = [(piece, adapter) for _, layer in lora_layers(model) for piece, adapter in layer.adapted()]
    if not adapted:
        raise UserError("the model has no LoRA adapters to save; apply_lora(model, config) or load_adapter first")
    ranks = Counter(adapter.r for _, adapter in adapted)
    alphas = Counter(adapter.alpha for _, adapter in adapted)
    r = config.r if config.r in ranks else ranks.most_common(1)[0][0]
    alpha = config.alpha if config.alpha in alphas else alphas.most_common(1)[0][0]
    # Short names (q_proj, v_proj) when they select exactly the adapted modules, else full names.
    names = {piece.hf_name for piece, _ in adapted}
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    everywhere = {piece.hf_name for slices in linear_slices(model).values() for piece in slices
                  if piece.hf_name.rsplit(".", 1)[-1] in leaves}
    targets = sorted(leaves) if everywhere == names else sorted(names)
    dora = {adapter.use_dora for _, adapter in adapted}
    rslora = {adapter.use_rslora for _, adapter in adapted}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model.config.arch == "gpt" else None,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": targets,
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": rslora == {True},
        "use_dora": dora == {True},
        "fan_in_fan_out": architecture == "GPT2LMHeadModel",     # GPT-2's Conv1D layers store [in, out]
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(piece.hf_name): adapter.r for piece, adapter in adapted if adapter.r != r},
        "alpha_pattern": {re.escape(piece.hf_name): _number(adapter.alpha) for piece, adapter in adapted
                          if adapter.alpha != alpha},
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter directory; returns it.

    base_model_name_or_path: recorded in adapter_config.json (what PEFT loads the base from when
    asked to; use the HF export of the base model or its hub name).
    """
    from safetensors.torch import save_file

    config = adapter_config(model, base_model_name_or_path)
    if len({adapter.use_dora for _, layer in lora_layers(model) for _, adapter in layer.adapted()}) > 1 or \
            len({adapter.use_rslora for _, layer in lora_layers(model) for _, adapter in layer.adapted()}) > 1:
        raise UserError("the adapters mix DoRA/rsLoRA and plain LoRA layers, which one PEFT config cannot express")
    state = adapter_state_dict(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"'{directory}' exists and is not a directory; choose another adapter directory")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


# ----------------------------------------------------------------------------- loading


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, checked (a UserError names what is wrong)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"adapter directory '{directory}' does not exist; give a PEFT adapter directory "
                        f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"'{directory}' has no {CONFIG_FILE}, so it is not a PEFT adapter directory; give the "
                        f"directory that save_adapter or peft's save_pretrained wrote")
    config = read_json(file, "adapter config")
    if not isinstance(config, dict):
        raise UserError(f"'{file}' is a JSON {type(config).__name__}, not an object; re-save the adapter")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UserError(f"'{file}' is a {peft_type or 'untyped'} adapter (peft_type); lmforge loads LoRA adapters "
                        "only (peft_type LORA)")
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    if type(r) is not int or r < 1:
        raise UserError(f"'{file}' gives r={r!r}, which is not a positive integer; re-save the adapter")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"'{file}' gives lora_alpha={alpha!r}, which is not a positive number; re-save the adapter")
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"'{file}' gives lora_dropout={dropout!r}, which is not in [0, 1); re-save the adapter")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise UserError(f"'{file}' gives {key}={config[key]!r}, which is not true or false; re-save the adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise UserError(f"'{file}' gives {key}={config[key]!r}, which is not a mapping; re-save the adapter")
    for key, harmless in _UNSUPPORTED.items():
        if key in config and config[key] not in harmless:
            raise UserError(f"'{file}' sets {key}={config[key]!r}, which lmforge's LoRA does not support; "
                            f"use an adapter without it")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"'{file}' gives target_modules={targets!r}, which is neither a list of module names nor a "
                        "regular expression; re-save the adapter")
    return config


def _adapter_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from ..model.hf.weights import read_safetensors, read_torch_bin

    for name, reader in ((WEIGHTS_FILE, read_safetensors), (LEGACY_WEIGHTS_FILE, read_torch_bin)):
        file = directory / name
        if file.is_file():
            return reader(file), file
    raise UserError(f"'{directory}' has no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}); the adapter directory is "
                    "incomplete, re-save it")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targets_match(targets: str | list[str], hf_names: list[str]) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return any(re.fullmatch(targets, name) for name in hf_names)
    return any(name == target or name.endswith("." + target) for target in targets for name in hf_names)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the PEFT LoRA adapter in `directory` to `model` (in place, base frozen); returns it.

    The adapter's modules must be the HF modules of the model's export (the model it was trained
    on); slices of our fused layers get their own adapters. A UserError says what does not fit.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    architecture, _ = _hf_family(model, "load the adapter")
    if has_lora(model):
        raise UserError("the model already has LoRA adapters; load the adapter into the base model "
                        "(or unload_lora(model) first)")
    state, file = _adapter_weights(directory)
    layers = linear_slices(model)
    by_hf = {piece.hf_name: (path, piece) for path, slices in layers.items() for piece in slices}
    targets = config.get("target_modules")
    if targets is not None and not _targets_match(targets, list(by_hf)):
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        raise UserError(f"the adapter in '{directory}' targets {shown}, which this base model ({architecture}) "
                        f"does not have (its linear layers: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in by_hf}))}); "
                        "load it into the model it was trained for")
    use_dora, use_rslora = bool(config.get("use_dora", False)), bool(config.get("use_rslora", False))

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        part = next((kind for suffix, kind in _SUFFIXES.items() if key.endswith(suffix)), None)
        if not key.startswith(PREFIX) or part is None:
            raise UserError(f"'{file}' has a tensor '{key}' that is not a LoRA weight of a linear layer (lora_A, "
                            "lora_B, lora_magnitude_vector); the adapter uses PEFT options lmforge does not support")
        if part == "magnitude" and not use_dora:
            raise UserError(f"'{file}' has a DoRA magnitude '{key}' but '{CONFIG_FILE}' says use_dora=false; "
                            "re-save the adapter")
        module = key[len(PREFIX):-len(next(s for s in _SUFFIXES if key.endswith(s)))]
        if module not in by_hf:
            raise UserError(f"the adapter in '{directory}' has weights for '{module}', which this base model "
                            f"({architecture}) does not have; load it into the model it was trained for")
        tensors.setdefault(module, {})[part] = tensor
    if not tensors:
        raise UserError(f"'{file}' holds no LoRA weights; re-save the adapter")

    needed = ("A", "B", "magnitude") if use_dora else ("A", "B")
    adapters: dict[str, dict[str, tuple[int, float]]] = {}
    for module, parts in tensors.items():
        path, piece = by_hf[module]
        absent = [part for part in needed if part not in parts]
        if absent:
            names = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
            raise UserError(f"'{file}' lacks {PREFIX}{module}.{names[absent[0]]}; the adapter is incomplete, re-save it")
        in_features = model.get_submodule(path).in_features
        A = parts["A"]
        rank = A.shape[0] if A.ndim == 2 else -1
        expected = {"A": (rank, in_features), "B": (piece.size, rank), "magnitude": (piece.size,)}
        for part in needed:
            if A.ndim != 2 or tuple(parts[part].shape) != expected[part]:
                raise UserError(
                    f"the adapter in '{directory}' does not fit this base model: '{module}' has {part} of shape "
                    f"{list(parts[part].shape)}, but the base model's layer takes {in_features} inputs to "
                    f"{piece.size} outputs (so lora_A [r, {in_features}], lora_B [{piece.size}, r]); load it into "
                    "the model it was trained for")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        adapters.setdefault(path, {})[piece.name] = (rank, float(alpha))

    lora_config = LoRAConfig(r=config["r"], alpha=float(config.get("lora_alpha", 8)),
                             dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                             target_modules=targets if targets is not None else sorted(tensors),
                             use_rslora=use_rslora, use_dora=use_dora)
    install_lora(model, adapters, lora_config)
    with torch.no_grad():
        for module, parts in tensors.items():
            path, piece = by_hf[module]
            adapter = model.get_submodule(path).lora[piece.name]
            heads = _rope_heads(model, path, piece)
            for part, tensor in parts.items():
                if heads is not None and part in ("B", "magnitude"):
                    tensor = _half_split_to_interleaved(tensor, heads)
                getattr(adapter, part).copy_(tensor.to(getattr(adapter, part).dtype))
    return model
