"""lmforge.peft: parameter-efficient fine-tuning, written from scratch (LoRA, rsLoRA, DoRA).

    from lmforge.peft import LoRAConfig, apply_lora, save_adapter, load_adapter
    apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    ...train: only the adapters require grad...
    save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    # peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_export), "out/adapter")
    load_adapter(base_model, "out/adapter")        # a PEFT LoRA adapter -> our model
    state = merged_state_dict(model)               # the base's keys with the adapters folded in

Names are imported on first use, so light imports (`lmforge --help`) do not load torch.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "LoRAConfig": "lmforge.peft.lora",
    "LoRALinear": "lmforge.peft.lora",
    "LoRAAdapter": "lmforge.peft.lora",
    "apply_lora": "lmforge.peft.lora",
    "has_lora": "lmforge.peft.lora",
    "lora_layers": "lmforge.peft.lora",
    "lora_parameters": "lmforge.peft.lora",
    "lora_state_dict": "lmforge.peft.lora",
    "load_lora_state_dict": "lmforge.peft.lora",
    "merge_lora": "lmforge.peft.lora",
    "unmerge_lora": "lmforge.peft.lora",
    "merged_state_dict": "lmforge.peft.lora",
    "unload_lora": "lmforge.peft.lora",
    "describe_lora": "lmforge.peft.lora",
    "linear_slices": "lmforge.peft.targets",
    "save_adapter": "lmforge.peft.adapter_format",
    "load_adapter": "lmforge.peft.adapter_format",
    "read_adapter_config": "lmforge.peft.adapter_format",
    "adapter_state_dict": "lmforge.peft.adapter_format",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
