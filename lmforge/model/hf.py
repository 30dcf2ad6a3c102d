"""Hugging Face interoperability: HF checkpoints -> our GPT/BERT, and our models -> HF directories.

    model, missing = load_hf_model("path/to/hf-dir")        # GPT-2, BERT, Llama, Mistral, Qwen2
    export_hf(model, tokenizer, "out/")                     # AutoModelFor*.from_pretrained("out/")

Each supported family has three readable pieces below:
- `<family>_config(hf)`      HF config.json -> ModelConfig (with a clear error for options we lack);
- `<family>_hf_config(cfg)`  ModelConfig -> HF config.json;
- `<family>_rules(cfg)`      the tensor name table: which HF tensors make each of our tensors.

Our layout differs from HF's in three places, all handled by `Rule`:
- attention uses one fused `qkv` Linear (rows: all q heads, then k heads, then v heads), so
  HF's q_proj/k_proj/v_proj (or BERT's query/key/value) are concatenated along the rows;
- SwiGLU uses one fused `gate_up` Linear (gate rows first, then up);
- GPT-2 stores its Linear layers as `Conv1D`, whose weight is [in, out]: the transpose of ours.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..io import read_json, write_json_atomic
from .builders import tied_names
from .config import ModelConfig

# ----------------------------------------------------------------------------- name tables


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensor(s) it is made of.

    Several HF tensors are concatenated along dim 0 in the order given (`split` holds their row
    counts, so export can cut ours back apart). `conv1d` marks GPT-2 weights stored as [in, out].
    `optional` marks head weights that some HF classes lack (BertModel has no MLM head); when
    absent, our freshly initialised weights stay and the loader reports them as missing.
    """

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] | None = None
    conv1d: bool = False
    optional: bool = False


def _rule(ours: str, theirs: str, **options: Any) -> Rule:
    return Rule(ours, (theirs,), **options)


def _linear(ours: str, theirs: str, bias: bool, **options: Any) -> list[Rule]:
    """weight (and bias) of one Linear layer."""
    rules = [_rule(f"{ours}.weight", f"{theirs}.weight", **options)]
    if bias:
        rules.append(_rule(f"{ours}.bias", f"{theirs}.bias", **options))
    return rules


def _fused(ours: str, theirs: list[str], sizes: tuple[int, ...], bias: bool) -> list[Rule]:
    """A fused Linear made of several HF Linears stacked along the output rows."""
    rules = [Rule(f"{ours}.weight", tuple(f"{name}.weight" for name in theirs), split=sizes)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), split=sizes))
    return rules


def _norm(ours: str, theirs: str, bias: bool, **options: Any) -> list[Rule]:
    """weight (and bias) of a LayerNorm or RMSNorm."""
    return _linear(ours, theirs, bias, **options)


def _qkv_sizes(config: ModelConfig) -> tuple[int, int, int]:
    kv = config.n_kv_heads * config.head_dim
    return (config.n_heads * config.head_dim, kv, kv)


# ----------------------------------------------------------------------------- GPT-2

# GPT-2's activation names -> our MLP names. "gelu_new" is GPT-2's tanh approximation.
_GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in _GELU_NAMES:
        raise UserError(f"{key}='{name}' is not supported; supported activations: {', '.join(_GELU_NAMES)}")
    return _GELU_NAMES[name]


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UserError("scale_attn_by_inverse_layer_idx=true (Mistral-style GPT-2 variants) is not supported")
    if hf.get("scale_attn_weights") is False:
        raise UserError("scale_attn_weights=false (unscaled attention) is not supported")
    d_model = hf.get("n_embd", 768)
    return ModelConfig(
        arch="gpt", vocab_size=hf.get("vocab_size", 50257), max_seq_len=hf.get("n_positions", 1024),
        d_model=d_model, n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12),
        d_ff=hf.get("n_inner") or 4 * d_model, mlp=_activation(hf, "activation_function", "gelu_new"),
        norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        pad_id=hf.get("pad_token_id"),
    ).validate()


def gpt2_hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.d_model,
        "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": config.d_ff,
        "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": None, "eos_token_id": None,   # GPT2Config's 50256 default is wrong for other vocabularies
    }


def gpt2_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        _rule("transformer.embed_tokens.weight", "transformer.wte.weight"),
        _rule("transformer.embed_positions.weight", "transformer.wpe.weight"),
        *_norm("transformer.final_norm", "transformer.ln_f", bias=True),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"transformer.h.{i}"
        rules += [
            *_norm(f"{ours}.attn_norm", f"{theirs}.ln_1", bias=True),
            # c_attn is already fused [q | k | v]; only the Conv1D transpose differs.
            *_linear(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", bias=True, conv1d=True),
            *_linear(f"{ours}.attn.out", f"{theirs}.attn.c_proj", bias=True, conv1d=True),
            *_norm(f"{ours}.mlp_norm", f"{theirs}.ln_2", bias=True),
            *_linear(f"{ours}.mlp.up", f"{theirs}.mlp.c_fc", bias=True, conv1d=True),
            *_linear(f"{ours}.mlp.down", f"{theirs}.mlp.c_proj", bias=True, conv1d=True),
        ]
    if not config.tie_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head.weight"))
    return rules


# ----------------------------------------------------------------------------- BERT


def bert_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"position_embedding_type='{hf['position_embedding_type']}' is not supported; "
                        "only 'absolute' (learned) positions are")
    if hf.get("is_decoder"):
        raise UserError("is_decoder=true (a causal BERT) is not supported; use a GPT architecture")
    return ModelConfig(
        arch="bert", vocab_size=hf.get("vocab_size", 30522), max_seq_len=hf.get("max_position_embeddings", 512),
        d_model=hf.get("hidden_size", 768), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12), d_ff=hf.get("intermediate_size", 3072),
        mlp=_activation(hf, "hidden_act", "gelu"), norm="layernorm", norm_bias=True,
        norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", embedding_norm=True, final_norm=False,
        position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), type_vocab_size=hf.get("type_vocab_size", 2),
        pad_id=hf.get("pad_token_id", 0),
    ).validate()


def bert_hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "intermediate_size": config.d_ff,
        "hidden_act": "gelu_pytorch_tanh" if config.mlp == "gelu_tanh" else "gelu",
        "layer_norm_eps": config.norm_eps, "type_vocab_size": config.type_vocab_size,
        "position_embedding_type": "absolute", "tie_word_embeddings": config.tie_embeddings,
        "pad_token_id": config.pad_id if config.pad_id is not None else 0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }


def bert_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        _rule("transformer.embed_tokens.weight", "bert.embeddings.word_embeddings.weight"),
        _rule("transformer.embed_positions.weight", "bert.embeddings.position_embeddings.weight"),
        _rule("transformer.embed_token_types.weight", "bert.embeddings.token_type_embeddings.weight"),
        *_norm("transformer.embedding_norm", "bert.embeddings.LayerNorm", bias=True),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"bert.encoder.layer.{i}"
        attention = f"{theirs}.attention.self"
        rules += [
            *_fused(f"{ours}.attn.qkv", [f"{attention}.query", f"{attention}.key", f"{attention}.value"],
                    _qkv_sizes(config), bias=True),
            *_linear(f"{ours}.attn.out", f"{theirs}.attention.output.dense", bias=True),
            # BERT is post-norm: norm(x + attn(x)) and norm(x + mlp(x)); HF names those norms
            # after the sublayer they follow.
            *_norm(f"{ours}.attn_norm", f"{theirs}.attention.output.LayerNorm", bias=True),
            *_linear(f"{ours}.mlp.up", f"{theirs}.intermediate.dense", bias=True),
            *_linear(f"{ours}.mlp.down", f"{theirs}.output.dense", bias=True),
            *_norm(f"{ours}.mlp_norm", f"{theirs}.output.LayerNorm", bias=True),
        ]
    # Heads: BertModel has the pooler only, BertForMaskedLM the MLM head only.
    rules += [
        *_linear("pooler", "bert.pooler.dense", bias=True, optional=True),
        *_linear("mlm_transform", "cls.predictions.transform.dense", bias=True, optional=True),
        *_norm("mlm_norm", "cls.predictions.transform.LayerNorm", bias=True, optional=True),
        _rule("mlm_decoder.bias", "cls.predictions.bias", optional=True),
    ]
    if not config.tie_embeddings:
        rules.append(_rule("mlm_decoder.weight", "cls.predictions.decoder.weight", optional=True))
    return rules


def _normalize_bert_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older BERT checkpoints name LayerNorm parameters gamma/beta and store the MLM bias as
    `cls.predictions.decoder.bias`; rename them to today's names."""
    renamed = {}
    for name, tensor in state.items():
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        renamed[name] = tensor
    if "cls.predictions.bias" not in renamed and "cls.predictions.decoder.bias" in renamed:
        renamed["cls.predictions.bias"] = renamed.pop("cls.predictions.decoder.bias")
    return renamed


# ----------------------------------------------------------------------------- Llama, Mistral, Qwen2


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    """LlamaForCausalLM and the architectures that share its layout (Mistral, Qwen2)."""
    model_type = hf.get("model_type", "llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act='{hf['hidden_act']}' is not supported for {model_type}; only 'silu' (SwiGLU) is")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"RoPE scaling '{rope_type}' is not supported; only plain RoPE (rope_type 'default') is")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    layer_types = set(hf.get("layer_types") or [])
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise UserError(f"per-layer sliding-window attention ({model_type} use_sliding_window) is not supported")
    n_heads = hf.get("num_attention_heads", 32)
    d_model = hf.get("hidden_size", 4096)
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False            # Qwen2: biases on q, k, v only
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        arch="gpt", vocab_size=hf.get("vocab_size", 32000), max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=d_model, n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=hf.get("intermediate_size", 11008), mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_interleaved=False, qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        # MistralConfig's default window is 4096 when config.json does not say (null means none).
        sliding_window=hf.get("sliding_window", 4096) if model_type == "mistral" else None,
        tie_embeddings=hf.get("tie_word_embeddings", False), pad_id=hf.get("pad_token_id"),
    ).validate()


def llama_hf_config(config: ModelConfig) -> dict[str, Any]:
    architecture = _llama_architecture(config)
    hf = {
        "architectures": [architecture], "model_type": _MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.d_ff, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
    }
    if architecture == "LlamaForCausalLM":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if architecture == "MistralForCausalLM":
        hf.update(sliding_window=config.sliding_window)
    return hf


def llama_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        _rule("transformer.embed_tokens.weight", "model.embed_tokens.weight"),
        _rule("transformer.final_norm.weight", "model.norm.weight"),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"model.layers.{i}"
        attention, mlp = f"{theirs}.self_attn", f"{theirs}.mlp"
        rules += [
            _rule(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
            *_fused(f"{ours}.attn.qkv", [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"],
                    _qkv_sizes(config), bias=config.qkv_bias),
            *_linear(f"{ours}.attn.out", f"{attention}.o_proj", bias=config.attn_out_bias),
            _rule(f"{ours}.mlp_norm.weight", f"{theirs}.post_attention_layernorm.weight"),
            *_fused(f"{ours}.mlp.gate_up", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], (config.d_ff, config.d_ff),
                    bias=config.mlp_bias),
            *_linear(f"{ours}.mlp.down", f"{mlp}.down_proj", bias=config.mlp_bias),
        ]
    if not config.tie_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head.weight"))
    return rules


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the q or k projection rows of every head from RoPE pairs (2i, 2i+1) to (i, i + D/2).

    Rotating channel pairs (2i, 2i+1) of W x equals rotating pairs (i, i+D/2) of P W x, where P
    moves row 2i to i and row 2i+1 to i + D/2 within each head. Scores q.k are unchanged since
    P is applied to both q and k. (This undoes llama.cpp's `permute` of GGUF q/k weights.)
    weight: [n_heads * D, ...] -> same shape.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# ----------------------------------------------------------------------------- architecture registry


@dataclass(frozen=True)
class Family:
    """The three functions that describe one family of HF architectures."""

    config: Callable[[dict[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    base_prefix: str            # the prefix of the trunk's tensor names in the task model
    head_prefixes: tuple[str, ...]
    own_heads: tuple[str, ...] = ()  # our tensors without an HF counterpart: they keep their init


GPT2 = Family(gpt2_config, gpt2_hf_config, gpt2_rules, "transformer.", ("lm_head.",))
# Our BERT's sequence classifier (used for fine-tuning and reward models) is not part of BertForMaskedLM.
BERT = Family(bert_config, bert_hf_config, bert_rules, "bert.", ("cls.",), ("classifier.weight", "classifier.bias"))
LLAMA = Family(llama_config, llama_hf_config, llama_rules, "model.", ("lm_head.",))

SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "GPT2LMHeadModel": GPT2,
    "BertModel": BERT,
    "BertForMaskedLM": BERT,
    "BertForPreTraining": BERT,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
}
_MODEL_TYPES = {"GPT2LMHeadModel": "gpt2", "BertForMaskedLM": "bert", "LlamaForCausalLM": "llama",
                "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# When config.json lists no architecture, its model_type picks the default one.
_DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM",
                         "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# HF tensors that carry no weights of their own (buffers, tied copies, heads we do not model).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids",
                     "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def hf_architecture(hf: dict[str, Any], where: str) -> str:
    """The supported architecture named by an HF config.json, or a clear error listing them."""
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in _DEFAULT_ARCHITECTURE:
        names = [_DEFAULT_ARCHITECTURE[hf["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type '{hf.get('model_type')}'"
    raise UserError(f"{where} is {found}, which lmforge cannot import; supported architectures: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """HF config.json contents -> ModelConfig (nothing but the config is read)."""
    family = SUPPORTED_ARCHITECTURES[hf_architecture(hf, where)]
    try:
        return family.config(hf)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{where} has an invalid or missing value ({error!r}); fix config.json") from None


# ----------------------------------------------------------------------------- reading weights


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of an HF directory (one file or shards; safetensors preferred over .bin).

    Returns (name -> tensor, name -> the file it came from) so errors can name the file.
    """
    single = [("model.safetensors", read_safetensors), ("pytorch_model.bin", _read_torch_bin)]
    for file_name, reader in single:
        if (directory / file_name).is_file():
            return _read_files([directory / file_name], reader)
        index = directory / f"{file_name}.index.json"
        if index.is_file():
            weight_map = read_json(index, "shard index").get("weight_map", {})
            files = [directory / name for name in sorted(set(weight_map.values()))]
            return _read_files(files, reader)
    raise UserError(f"'{directory}' has no model.safetensors or pytorch_model.bin (nor a sharded index); "
                    "point to a directory with Hugging Face weights")


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
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"'{file}' is not a valid safetensors file ({error}); re-download or re-export it") from None


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only=True: a checkpoint can only hold tensors and containers, never code.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UserError(f"'{file}' is not a loadable PyTorch weights file ({error}); "
                        "re-download it or convert it to safetensors") from None
    if not isinstance(state, dict):
        raise UserError(f"'{file}' does not hold a state dict; point to a Hugging Face model directory")
    return state


# ----------------------------------------------------------------------------- import


def _with_base_prefix(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Base-model checkpoints (BertModel, GPT2Model, the original GPT-2 files) name the trunk's
    tensors without the task model's prefix ("h.0..." instead of "transformer.h.0..."): add it."""
    if any(name.startswith(family.base_prefix) for name in state):
        return state
    return {(name if name.startswith(family.head_prefixes) else family.base_prefix + name): tensor
            for name, tensor in state.items()}


def import_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, family: Family,
                      expected: dict[str, torch.Size], origin: dict[str, Path] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> our state dict. `expected` holds our tensors' shapes (from the built model).

    Returns (our state dict, names of our optional tensors the checkpoint does not have).
    Raises UserError naming the file and tensor for a missing tensor or a shape mismatch.
    """
    origin = origin or {}
    state = _with_base_prefix(state, family)
    if family is BERT:
        state = _normalize_bert_names(state)
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
    unexpected = sorted(name for name in unused if name not in tied_copies and not name.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        warnings.warn(f"ignored {len(unexpected)} checkpoint tensor(s) lmforge has no place for: {shown}",
                      stacklevel=3)


def load_hf_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32
                  ) -> tuple[nn.Module, list[str]]:
    """An HF model directory -> (our GPT or BERT in eval mode, missing optional tensors)."""
    from .builders import build_model

    directory = Path(directory)
    hf = read_json(directory / "config.json", "Hugging Face config")
    where = f"'{directory / 'config.json'}'"
    family = SUPPORTED_ARCHITECTURES[hf_architecture(hf, where)]
    config = config_from_hf(hf, where)
    state, origin = read_hf_weights(directory)
    model = build_model(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    ours, missing = import_state_dict(state, config, family, expected, origin)
    _load_into(model, ours, allowed_missing=set(missing) | set(family.own_heads) | tied_names(model))
    return model.to(dtype).eval(), missing


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], allowed_missing: set[str]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if name not in allowed_missing]
    if missing or result.unexpected_keys:
        # The rules cover every parameter, so this is a bug in a rule table, not user input.
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {result.unexpected_keys}")


# ----------------------------------------------------------------------------- export

# Options every family fixes: any other value has no HF config field to express it.
_COMMON_FIXED = dict(qk_norm=False, n_experts=0)
_GPT2_FIXED = dict(arch="gpt", position="learned", norm="layernorm", norm_bias=True, norm_position="pre",
                   embedding_norm=False, final_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                   sliding_window=None, **_COMMON_FIXED)
_BERT_FIXED = dict(arch="bert", position="learned", norm="layernorm", norm_bias=True, norm_position="post",
                   embedding_norm=True, final_norm=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                   sliding_window=None, **_COMMON_FIXED)
_LLAMA_FIXED = dict(arch="gpt", position="rope", norm="rmsnorm", norm_position="pre", embedding_norm=False,
                    final_norm=True, mlp="swiglu", **_COMMON_FIXED)


def _mismatches(config: ModelConfig, fixed: dict[str, Any]) -> list[str]:
    return [f"{key}={getattr(config, key)!r} (needs {value!r})" for key, value in fixed.items()
            if getattr(config, key) != value]


def _llama_architecture(config: ModelConfig) -> str:
    """Llama covers q/k/v/o biases together; Qwen2 q/k/v biases only; Mistral a sliding window."""
    if config.sliding_window is not None:
        return "MistralForCausalLM"
    if config.qkv_bias and not config.attn_out_bias and not config.mlp_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def hf_family_for(config: ModelConfig) -> tuple[str, Family]:
    """The HF architecture our config exports to, or a UserError naming every option it cannot express."""
    if config.arch == "bert":
        architecture, family, fixed = "BertForMaskedLM", BERT, _BERT_FIXED
    elif config.position == "learned":
        architecture, family, fixed = "GPT2LMHeadModel", GPT2, _GPT2_FIXED
    else:
        architecture, family, fixed = _llama_architecture(config), LLAMA, _LLAMA_FIXED
    problems = _mismatches(config, fixed)
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
                    q, k, v = state[name].split(_qkv_sizes(config))
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
    architecture, family = hf_family_for(config)
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
