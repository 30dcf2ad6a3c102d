"""Our models -> HF directories that `transformers.AutoModelFor*.from_pretrained` loads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...io import write_json_atomic
from ...errors import UserError
from ..config import ModelConfig
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLAMA, interleaved_to_half_split, llama_architecture
from .rules import Family, qkv_sizes


def _mismatches(config: ModelConfig, fixed: dict[str, Any]) -> list[str]:
    return [f"{key}={getattr(config, key)!r} (needs {value!r})" for key, value in fixed.items()
            if getattr(config, key) != value]


def hf_family_for(config: ModelConfig) -> tuple[str, Family]:
    """The HF architecture our config exports to, or a UserError naming every option it cannot express."""
    if config.arch == "bert":
        architecture, family = "BertForMaskedLM", BERT
    elif config.position == "learned":
        architecture, family = "GPT2LMHeadModel", GPT2
    else:
        architecture, family = llama_architecture(config), LLAMA
    problems = _mismatches(config, family.fixed)
    if family is not LLAMA:
        if config.mlp not in ("gelu", "gelu_tanh"):
            problems.append(f"mlp={config.mlp!r} (needs 'gelu' or 'gelu_tanh')")
        if config.n_kv_heads != config.n_heads:
            problems.append(f"n_kv_heads={config.n_kv_heads} (needs n_heads, {config.n_heads})")
        if config.head_dim * config.n_heads != config.d_model:
            problems.append(f"head_dim={config.head_dim} (needs d_model / n_heads)")
    elif architecture == "MistralForCausalLM" and (config.qkv_bias or config.attn_out_bias or config.mlp_bias):
        problems.append("sliding_window with biases (Mistral has no biases)")
    elif architecture == "LlamaForCausalLM" and config.qkv_bias != config.attn_out_bias:
        problems.append(f"qkv_bias={config.qkv_bias} with attn_out_bias={config.attn_out_bias} "
                        "(Llama has both or neither; Qwen2 has q/k/v biases only and no MLP bias)")
    if problems:
        raise UserError(f"this model cannot be exported as {architecture}: {'; '.join(problems)} "
                        "have no Hugging Face equivalent; use --format lmforge")
    return architecture, family


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights renamed (and split, transposed) to the HF architecture `hf_family_for` picks."""
    config = model.config
    _, family = hf_family_for(config)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if config.position == "rope" and config.rope_interleaved:
        # HF rotates pairs (i, i + D/2); reorder our q and k rows once so the model is identical.
        for i in range(config.n_layers):
            for kind in ("weight", "bias"):
                name = f"transformer.blocks.{i}.attn.qkv.{kind}"
                if name in state:
                    q, k, v = state[name].split(qkv_sizes(config))
                    state[name] = torch.cat([interleaved_to_half_split(q, config.n_heads),
                                             interleaved_to_half_split(k, config.n_kv_heads), v])
    theirs: dict[str, torch.Tensor] = {}
    for rule in family.rules(config):
        tensor = state[rule.ours]
        parts = tensor.split(list(rule.split)) if rule.split is not None else (tensor,)
        for name, part in zip(rule.theirs, parts):
            theirs[name] = (part.t() if rule.conv1d else part).contiguous().clone()
    return theirs


def export_hf(model: nn.Module, tokenizer: Any, directory: str | os.PathLike) -> None:
    """Write config.json, generation_config.json (GPT), model.safetensors and the tokenizer files
    into `directory` (the caller makes it atomic) so `transformers.AutoModelFor*` loads it."""
    from safetensors.torch import save_file

    config = model.config
    _, family = hf_family_for(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = family.hf_config(config)
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    special = _special_ids(config, tokenizer)
    hf.update(special)
    write_json_atomic(directory / "config.json", hf)
    if config.arch == "gpt" and special:
        write_json_atomic(directory / "generation_config.json", special)
    save_file(export_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)


def _special_ids(config: ModelConfig, tokenizer: Any) -> dict[str, int]:
    """Token ids for config.json: pad, and for GPT the bos/eos that generation uses."""
    if tokenizer is None:
        return {}
    ids = {"pad_token_id": getattr(tokenizer, "pad_id", None)}
    if config.arch == "gpt":
        eos = getattr(tokenizer, "eos_id", None)
        ids["bos_token_id"] = getattr(tokenizer, "bos_id", None)
        ids["eos_token_id"] = eos if eos is not None else getattr(tokenizer, "eot_id", None)
    return {key: value for key, value in ids.items() if value is not None}
