"""BERT (BertModel, BertForMaskedLM, BertForPreTraining): post-LayerNorm encoder with an MLM head."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import UserError
from ..config import ModelConfig
from .rules import COMMON_FIXED, Family, Rule, fused, gelu_activation, linear, norm, qkv_sizes, rule


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
        mlp=gelu_activation(hf, "hidden_act", "gelu"), norm="layernorm", norm_bias=True,
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
        rule("transformer.embed_tokens.weight", "bert.embeddings.word_embeddings.weight"),
        rule("transformer.embed_positions.weight", "bert.embeddings.position_embeddings.weight"),
        rule("transformer.embed_token_types.weight", "bert.embeddings.token_type_embeddings.weight"),
        *norm("transformer.embedding_norm", "bert.embeddings.LayerNorm", bias=True),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"bert.encoder.layer.{i}"
        attention = f"{theirs}.attention.self"
        rules += [
            *fused(f"{ours}.attn.qkv", [f"{attention}.query", f"{attention}.key", f"{attention}.value"],
                   qkv_sizes(config), bias=True),
            *linear(f"{ours}.attn.out", f"{theirs}.attention.output.dense", bias=True),
            # BERT is post-norm: norm(x + attn(x)) and norm(x + mlp(x)); HF names those norms
            # after the sublayer they follow.
            *norm(f"{ours}.attn_norm", f"{theirs}.attention.output.LayerNorm", bias=True),
            *linear(f"{ours}.mlp.up", f"{theirs}.intermediate.dense", bias=True),
            *linear(f"{ours}.mlp.down", f"{theirs}.output.dense", bias=True),
            *norm(f"{ours}.mlp_norm", f"{theirs}.output.LayerNorm", bias=True),
        ]
    # Heads: BertModel has the pooler only, BertForMaskedLM the MLM head only.
    rules += [
        *linear("pooler", "bert.pooler.dense", bias=True, optional=True),
        *linear("mlm_transform", "cls.predictions.transform.dense", bias=True, optional=True),
        *norm("mlm_norm", "cls.predictions.transform.LayerNorm", bias=True, optional=True),
        rule("mlm_decoder.bias", "cls.predictions.bias", optional=True),
    ]
    if not config.tie_embeddings:
        rules.append(rule("mlm_decoder.weight", "cls.predictions.decoder.weight", optional=True))
    return rules


def normalize_bert_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


BERT_FIXED: dict[str, Any] = dict(
    arch="bert", position="learned", norm="layernorm", norm_bias=True, norm_position="post", embedding_norm=True,
    final_norm=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True, sliding_window=None, **COMMON_FIXED)

# Our BERT's sequence classifier (used for fine-tuning and reward models) is not part of BertForMaskedLM.
BERT = Family(bert_config, bert_hf_config, bert_rules, "bert.", ("cls.",), "bert.encoder.layer.", BERT_FIXED,
              own_heads=("classifier.weight", "classifier.bias"), normalize_names=normalize_bert_names)
