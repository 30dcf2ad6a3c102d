"""`ModelConfig`: every architectural choice of a GPT or BERT, in one dataclass.

Components are picked by name (`position="rope"`, `mlp="swiglu"`, ...), so a GPT-2, a Llama and
a BERT are the same code with different configs. Presets live in `presets.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

ARCHS = ("gpt", "bert")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu2")


@dataclass
class ModelConfig:
    arch: str = "gpt"                    # "gpt" (decoder-only causal LM) or "bert" (bidirectional encoder)
    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None        # None = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None          # None = d_model // n_heads
    d_ff: int | None = None              # None = 4*d_model (gelu/relu2) or ~8/3*d_model (swiglu)
    mlp: str = "swiglu"                  # gelu | gelu_tanh | swiglu | relu2
    norm: str = "rmsnorm"                # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = False              # LayerNorm bias (RMSNorm never has one)
    norm_position: str = "pre"           # pre (GPT-2, Llama) | post (original BERT)
    embedding_norm: bool = False         # LayerNorm right after the embeddings (BERT)
    final_norm: bool = True              # norm after the last block (pre-norm models need it)
    position: str = "rope"               # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    rope_interleaved: bool = False       # False: HF-Llama half-split pairs (i, i+d/2); True: (2i, 2i+1)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                # RMSNorm on queries and keys per head (stabilises training)
    sliding_window: int | None = None    # attend only to the last W positions
    tie_embeddings: bool = True          # lm_head shares the token-embedding matrix
    dropout: float = 0.0
    init_std: float = 0.02
    scaled_residual_init: bool = True    # GPT-2: residual projections get std / sqrt(2 * n_layers)
    # Mixture of experts (0 experts = dense MLP)
    n_experts: int = 0
    experts_top_k: int = 2
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.0
    # BERT-only
    type_vocab_size: int = 2
    n_labels: int = 1                    # sequence-classification head outputs (reward models use 1)
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            if self.mlp == "swiglu":
                # ~8/3 d keeps SwiGLU's 3 matrices at the parameter count of a 4d two-matrix MLP.
                self.d_ff = _round_up(int(8 * self.d_model / 3), 64)
            else:
                self.d_ff = 4 * self.d_model

    def validate(self) -> "ModelConfig":
        # Checks are lazy and ordered: sizes are proven positive before any of them is used as a
        # divisor (n_heads=0 used to raise ZeroDivisionError instead of a UserError).
        checks: list[tuple[Callable[[], bool], str]] = [
            (lambda: self.arch in ARCHS, f"model.arch must be one of {ARCHS}, not '{self.arch}'"),
            (lambda: self.position in POSITIONS, f"model.position must be one of {POSITIONS}, not '{self.position}'"),
            (lambda: self.norm in NORMS, f"model.norm must be one of {NORMS}, not '{self.norm}'"),
            (lambda: self.mlp in MLPS, f"model.mlp must be one of {MLPS}, not '{self.mlp}'"),
            (lambda: self.norm_position in ("pre", "post"), "model.norm_position must be 'pre' or 'post'"),
            (lambda: min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.max_seq_len) > 0,
             "model sizes (vocab_size, d_model, n_layers, n_heads, max_seq_len) must be positive"),
            (lambda: self.n_kv_heads >= 1,
             f"model.n_kv_heads must be at least 1, not {self.n_kv_heads}; leave it unset to use n_heads"),
            # None means "derive a default" (head_dim, d_ff) or "off" (sliding_window); 0 is never valid.
            (lambda: self.head_dim is None or self.head_dim >= 1,
             f"model.head_dim must be at least 1, not {self.head_dim}; leave it unset for d_model // n_heads"),
            (lambda: self.d_ff is None or self.d_ff >= 1,
             f"model.d_ff must be at least 1, not {self.d_ff}; leave it unset for the default width"),
            (lambda: self.sliding_window is None or self.sliding_window >= 1,
             f"model.sliding_window must be at least 1, not {self.sliding_window}; leave it unset for full attention"),
            (lambda: self.norm_eps > 0, f"model.norm_eps must be positive, not {self.norm_eps}"),
            (lambda: self.init_std >= 0, f"model.init_std must be zero or positive, not {self.init_std}"),
            (lambda: self.d_model % self.n_heads == 0 or self.head_dim != self.d_model // self.n_heads,
             f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), or set head_dim"),
            (lambda: self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"),
            (lambda: self.position != "rope" or self.head_dim % 2 == 0, "RoPE needs an even head_dim"),
            (lambda: self.n_experts == 0 or 0 < self.experts_top_k <= self.n_experts,
             "model.experts_top_k must be between 1 and model.n_experts"),
            (lambda: 0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok():
                raise UserError(message)
        return self

    @property
    def is_causal(self) -> bool:
        return self.arch == "gpt"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"model config has unknown keys {unknown}; valid keys are: {', '.join(sorted(known))}")
        return cls(**data).validate()


def _round_up(value: int, multiple: int) -> int:
    return ((value + multiple - 1) // multiple) * multiple
