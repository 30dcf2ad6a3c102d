"""BERT: a bidirectional encoder trained by masked-language modelling.

Every position sees every (non-padding) position. Heads on the shared trunk:
- MLM head: transform (dense + GELU + LayerNorm) then the tied vocabulary projection -> [B, T, V];
- pooler: tanh(dense(hidden of [CLS])) -> [B, d];
- sequence classifier on the pooled vector -> [B, n_labels] (reward models use n_labels=1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norms import build_norm
from .transformer import Transformer, init_weights


class BERT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = Transformer(config)
        self.mlm_transform = nn.Linear(config.d_model, config.d_model)
        self.mlm_norm = build_norm("layernorm", config.d_model, config.norm_eps, True)
        self.mlm_decoder = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.pooler = nn.Linear(config.d_model, config.d_model)
        self.classifier = nn.Linear(config.d_model, config.n_labels)
        self.classifier_dropout = nn.Dropout(config.dropout)
        init_weights(self, config)
        if config.tie_embeddings:
            self.mlm_decoder.weight = self.transformer.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids: [B, T] -> masked-LM logits [B, T, vocab_size] (with return_aux: (logits, MoE aux loss))."""
        hidden, aux_loss = self.transformer(input_ids, attention_mask, token_type_ids)
        logits = self.mlm_logits(hidden)
        return (logits, aux_loss) if return_aux else logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> contextual embeddings [B, T, d_model] (HF's `last_hidden_state`)."""
        return self.transformer(input_ids, attention_mask, token_type_ids)[0]

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d] (or [N, d] for the masked positions only) -> [..., vocab_size]."""
        # The transform uses the trunk's GELU variant, as HF's BertPredictionHeadTransform does.
        approximate = "tanh" if self.config.mlp == "gelu_tanh" else "none"
        return self.mlm_decoder(self.mlm_norm(F.gelu(self.mlm_transform(hidden), approximate=approximate)))

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d] -> [B, d]: tanh(dense(h_[CLS]))."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> sequence logits [B, n_labels]."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.classifier_dropout(self.pooled(hidden)))
