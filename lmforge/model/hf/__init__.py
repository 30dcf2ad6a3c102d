"""Hugging Face interoperability: HF checkpoints -> our GPT/BERT, and our models -> HF directories.

    model, missing = load_hf_model("path/to/hf-dir")        # GPT-2, BERT, Llama, Mistral, Qwen2
    export_hf(model, tokenizer, "out/")                     # AutoModelFor*.from_pretrained("out/")

One module per family, each with three readable pieces (`gpt2`, `bert`, `llama`):
- `<family>_config(hf)`      HF config.json -> ModelConfig (with a clear error for options we lack);
- `<family>_hf_config(cfg)`  ModelConfig -> HF config.json;
- `<family>_rules(cfg)`      the tensor name table: which HF tensors make each of our tensors.
The shared core: `rules` (Rule, Family), `families` (the registry, config.json -> ModelConfig),
`weights` (reading safetensors / .bin files), `importing` (HF tensors -> our state dict) and
`export` (our state dict -> HF's).
"""
from __future__ import annotations

from .bert import BERT, bert_config, bert_hf_config, bert_rules
from .export import export_hf, export_state_dict, hf_family_for
from .families import DEFAULT_ARCHITECTURE, SUPPORTED_ARCHITECTURES, config_from_hf, hf_architecture
from .gpt2 import GPT2, gpt2_config, gpt2_hf_config, gpt2_rules
from .importing import expected_shapes, import_state_dict, load_hf_model
from .llama import LLAMA, interleaved_to_half_split, llama_config, llama_hf_config, llama_rules
from .rules import Family, Rule
from .weights import read_hf_weights, read_safetensors, read_torch_bin

__all__ = [
    "BERT", "GPT2", "LLAMA", "DEFAULT_ARCHITECTURE", "SUPPORTED_ARCHITECTURES", "Family", "Rule",
    "bert_config", "bert_hf_config", "bert_rules", "gpt2_config", "gpt2_hf_config", "gpt2_rules",
    "llama_config", "llama_hf_config", "llama_rules", "interleaved_to_half_split",
    "config_from_hf", "hf_architecture", "expected_shapes", "import_state_dict", "load_hf_model",
    "read_hf_weights", "read_safetensors", "read_torch_bin", "export_hf", "export_state_dict", "hf_family_for",
]
