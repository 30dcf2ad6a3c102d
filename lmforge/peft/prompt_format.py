"""Prompt adapters in PEFT's file format: adapter_config.json + adapter_model.safetensors.

    save_prompt_adapter(model, "out/adapter")            # loads in peft.PeftModel.from_pretrained
    model = load_prompt_adapter(base, "out/adapter")     # and back (also `lmforge generate --adapter`)

The file stores the *result* of the reparametrisation, as PEFT's own save_pretrained does:
adapter_model.safetensors holds one tensor `prompt_embeddings`, [n, d] for prompt tuning and
P-tuning and [n, L*2*Hkv*D] for prefix tuning (prefix keys in HF's RoPE layout, prefix.rope_layout).
A loaded adapter is therefore a fixed prompt (PEFT's inference mode); training continues from an
sft checkpoint, which keeps the encoder. The model itself is in prompt.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from .prefix import rope_layout
from .prompt import FixedPrompt, PromptConfig, PromptTunedLM, check_base, token_dim

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
METHODS = {value: key for key, value in PEFT_TYPES.items()}


def prompt_adapter_config(model: PromptTunedLM, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's adapter_config.json for the model's prompt (inference mode: the stored output)."""
    config, settings = model.config, model.prompt_config
    method = settings.method
    dim = token_dim(model.base, method)
    out: dict[str, Any] = {
        "peft_type": PEFT_TYPES[method], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None, "inference_mode": True, "auto_mapping": None, "modules_to_save": None,
        "num_virtual_tokens": settings.num_virtual_tokens, "token_dim": dim,
        "num_transformer_submodules": 1, "num_layers": config.n_layers,
        "num_attention_heads": config.n_kv_heads if method == "prefix" else config.n_heads,
    }
    if method == "prompt":
        out.update(prompt_tuning_init="TEXT" if settings.init == "text" else
                   "SAMPLE_VOCAB" if settings.init == "vocab" else "RANDOM",
                   prompt_tuning_init_text=settings.init_text, tokenizer_name_or_path=None, tokenizer_kwargs=None)
    elif method == "ptuning":
        out.update(encoder_reparameterization_type=settings.encoder.upper(),
                   encoder_hidden_size=settings.encoder_hidden_size or dim,
                   encoder_num_layers=settings.encoder_num_layers, encoder_dropout=settings.encoder_dropout)
    else:
        out.update(prefix_projection=settings.prefix_projection, init_weights=None,
                   encoder_hidden_size=settings.encoder_hidden_size or dim)
    return out


def save_prompt_adapter(model: nn.Module, directory: str | os.PathLike,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write the prompt as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    if not isinstance(model, PromptTunedLM):
        raise UserError("the model has no prompt adapter to save; apply_prompt_tuning first")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"'{directory}' exists and is not a directory; choose another adapter directory")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as temporary:
        save_file({"prompt_embeddings": model.prompt_values()}, str(temporary), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_FILE, prompt_adapter_config(model, base_model_name_or_path))
    return directory


def is_prompt_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a PEFT prompt-learning adapter (a LoRA one, or nothing, is False)."""
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        data = read_json(file, "adapter config")
    except UserError:
        return False
    return isinstance(data, dict) and data.get("peft_type") in METHODS


def load_prompt_adapter(model: nn.Module, directory: str | os.PathLike) -> PromptTunedLM:
    """`model` (frozen) with the PEFT PROMPT_TUNING / P_TUNING / PREFIX_TUNING adapter in `directory`."""
    from ..model.hf.weights import read_safetensors

    directory = Path(directory)
    file = directory / CONFIG_FILE
    if not directory.is_dir() or not file.is_file():
        raise UserError(f"'{directory}' is not a PEFT adapter directory (no {CONFIG_FILE}); give the directory "
                        "that save_prompt_adapter or peft's save_pretrained wrote")
    data = read_json(file, "adapter config")
    if not isinstance(data, dict) or data.get("peft_type") not in METHODS:
        raise UserError(f"'{file}' is not a prompt-learning adapter (peft_type {data.get('peft_type')!r} "
                        f"if isinstance(data, dict) else None); expected one of {', '.join(METHODS)}")
    check_base(model)
    method = METHODS[data["peft_type"]]
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"'{file}' is for task_type {data['task_type']}; lmforge loads CAUSAL_LM adapters")
    n = data.get("num_virtual_tokens")
    if type(n) is not int or n < 1:
        raise UserError(f"'{file}' gives num_virtual_tokens={n!r}, which is not a positive integer; re-save it")
    if (data.get("num_transformer_submodules") or 1) != 1:
        raise UserError(f"'{file}' is for an encoder-decoder model (num_transformer_submodules=2); "
                        "lmforge's models are decoder-only")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"'{directory}' has no {WEIGHTS_FILE}; the adapter directory is incomplete, re-save it")
    tensors = read_safetensors(weights)
    if "prompt_embeddings" not in tensors:
        raise UserError(f"'{weights}' has no 'prompt_embeddings' tensor (it has {sorted(tensors)[:3]}); "
                        "it is not a PEFT prompt-learning adapter")
    values = tensors["prompt_embeddings"].float()
    config = model.config
    width = config.n_layers * 2 * token_dim(model, "prefix") if method == "prefix" else config.d_model
    if tuple(values.shape) != (n, width):
        what = (f"{config.n_layers} layers x 2 x {config.n_kv_heads} kv heads x {config.head_dim}"
                if method == "prefix" else f"d_model {config.d_model}")
        raise UserError(f"'{weights}' holds prompt_embeddings of shape {list(values.shape)} but this base model "
                        f"needs [{n}, {width}] ({what}); the adapter was trained on another base model")
    if method == "prefix" and config.rope_interleaved:
        values = rope_layout(values, config, to_hf=False)
    settings = PromptConfig(method=method, num_virtual_tokens=n)
    parameter = next(model.parameters())
    return PromptTunedLM(model, settings, FixedPrompt(values).to(device=parameter.device, dtype=parameter.dtype))

