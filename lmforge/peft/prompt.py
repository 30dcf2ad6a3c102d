"""Prompt tuning, P-tuning and prefix tuning, written from scratch; saved in PEFT's format.

    from lmforge.peft.prompt import PromptConfig, apply_prompt_tuning, save_prompt_adapter
    model = apply_prompt_tuning(base, PromptConfig(method="prompt", num_virtual_tokens=20,
                                                   init="text", init_text="Solve the puzzle:"), tokenizer)
    model(input_ids)                       # [B, T, V]: the base model with a learned prompt before the input
    save_prompt_adapter(model, "out/adapter")            # loads in peft.PeftModel.from_pretrained
    model = load_prompt_adapter(base, "out/adapter")     # and back (also `lmforge generate --adapter`)

The three methods learn something placed *before* the input; the base model is frozen.

- Prompt tuning (Lester et al. 2021): n virtual-token embeddings P [n, d] are prepended to the
  input's token embeddings (GPT.forward's `inputs_embeds`). They start from the embeddings of a
  text (init="text", repeated or cut to n tokens, as PEFT does), of random vocabulary tokens
  (init="vocab") or from N(0, 1) (init="random", PEFT's default).
- P-tuning (Liu et al. 2021): the same prepended vectors, produced by a prompt encoder from an
  embedding E [n, d]: an MLP (d -> h -> h -> d, ReLU) or a bidirectional LSTM followed by an MLP.
- Prefix tuning (Li & Liang 2021, prefix.py): every layer gets n learned key and value vectors in
  front of the keys and values of the input, [L, 2, Hkv, n, D]; optionally reparametrised through
  an MLP (E [n, Hkv*D] -> tanh -> L*2*Hkv*D), which Li & Liang found stabler to train.

One mechanism at inference: a KV-cache prefix. Because attention is causal, the keys and values
of n prepended virtual tokens do not depend on what follows them, so prompt tuning and P-tuning
equal "run the n virtual embeddings once and keep their keys/values"; prefix tuning *is* a set of
keys/values. `PrefixKVCache` (prefix.py) writes that prefix into positions 0..n-1 of a cache row
whenever the row is reset, so the inference engine (continuous batching, the compiled decode step)
serves an adapted model unchanged, and the prompt's tokens sit at positions n, n+1, ... exactly as
in training and in PEFT (tests/test_peft_prompt.py checks cached generation against recomputing
the whole sequence without a cache, and logits against peft on our HF export).

Where things are: this module holds the config, the prompt-tuning and P-tuning encoders and the
model (`PromptTunedLM`, `apply_prompt_tuning`); prefix.py prefix tuning and the KV-cache prefix;
prompt_format.py PEFT's files (`save_prompt_adapter`, `load_prompt_adapter`, `is_prompt_adapter`).
Every name stays importable from here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError
from ..lazy import lazy_getattr
from ..model.gpt import CausalLMOutput
from ..model.kv_cache import KVCache
from .prefix import PrefixEncoder, PrefixKVCache, cache_with_prefix, prefix_pairs, rope_layout

# PEFT's file format (prompt_format.py) imports this module, so its names are re-exported lazily.
_FORMAT_NAMES = ("CONFIG_FILE", "WEIGHTS_FILE", "PEFT_TYPES", "METHODS", "prompt_adapter_config",
                 "save_prompt_adapter", "is_prompt_adapter", "load_prompt_adapter")
__getattr__ = lazy_getattr(__name__, {name: "lmforge.peft.prompt_format" for name in _FORMAT_NAMES})
__all__ = ["PromptConfig", "PromptEmbedding", "PromptEncoder", "PrefixEncoder", "FixedPrompt", "PrefixKVCache",
           "PromptTunedLM", "apply_prompt_tuning", "describe_prompt", "base_state_dict", "settings_dict",
           "check_base", "token_dim", *_FORMAT_NAMES]


@dataclass
class PromptConfig:
    """What `apply_prompt_tuning` learns (`lmforge sft peft=prompt|prefix|ptuning prompt.KEY=VALUE`)."""

    method: Literal["prompt", "prefix", "ptuning"] = "prompt"   # sft sets it from peft=
    num_virtual_tokens: int = 20
    init: Literal["random", "text", "vocab"] = "vocab"   # prompt tuning's start: N(0,1), a text, random tokens
    init_text: str | None = None                         # with init=text
    prefix_projection: bool = False                      # prefix: learn through an MLP reparametrisation
    encoder: Literal["mlp", "lstm"] = "mlp"              # P-tuning's prompt encoder
    encoder_hidden_size: int | None = None               # default: d_model (prefix: Hkv * head_dim)
    encoder_num_layers: int = 2                          # LSTM layers (the MLP always has 3 linears)
    encoder_dropout: float = 0.0
    seed: int = 0                                        # for init=vocab/random

    def validate(self) -> "PromptConfig":
        checks = [
            (type(self.num_virtual_tokens) is int and 1 <= self.num_virtual_tokens <= 4096,
             f"prompt num_virtual_tokens must be an integer in 1..4096, not {self.num_virtual_tokens!r}"),
            (self.init != "text" or bool(self.init_text), "prompt init=text needs prompt.init_text='some text'"),
            (self.encoder_hidden_size is None or type(self.encoder_hidden_size) is int and self.encoder_hidden_size > 0,
             f"prompt encoder_hidden_size must be a positive integer, not {self.encoder_hidden_size!r}"),
            (type(self.encoder_num_layers) is int and self.encoder_num_layers >= 1,
             "prompt encoder_num_layers must be at least 1"),
            (0 <= self.encoder_dropout < 1, f"prompt encoder_dropout must be in [0, 1), not {self.encoder_dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the prompt config")
        return self


# ----------------------------------------------------------------------------- the encoders (PEFT's modules)


class PromptEmbedding(nn.Module):
    """Prompt tuning: the virtual tokens' embeddings themselves. () -> [n, d]."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d)          # N(0, 1): PEFT's RANDOM init

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning: E [n, d] through an MLP, or a bidirectional LSTM then an MLP. () -> [n, d]."""

    def __init__(self, n: int, d: int, hidden: int, kind: str, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, d)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]                                  # [1, n, d]
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]                                     # [1, n, 2 * hidden]
        return self.mlp_head(x)[0]


class FixedPrompt(nn.Module):
    """A loaded adapter: the saved output of any of the above (PEFT's inference mode). () -> [n, k]."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*values.shape)
        with torch.no_grad():
            self.embedding.weight.copy_(values)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


# ----------------------------------------------------------------------------- the adapted model


class PromptTunedLM(nn.Module):
    """A frozen GPT with a learned prompt or prefix in front of every input.

    It is called like GPT (forward, hidden_states, new_kv_cache, lm_head, config), so the
    Trainer, the SFT objective and the inference engine use it unchanged."""

    def __init__(self, base: nn.Module, config: PromptConfig, encoder: nn.Module) -> None:
        super().__init__()
        self.base, self.prompt_config, self.prompt_encoder = base, config, encoder
        for param in base.parameters():
            param.requires_grad_(False)
        self._cached: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    # GPT's interface ------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    @property
    def transformer(self) -> nn.Module:
        return self.base.transformer

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_config.num_virtual_tokens

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, logits_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_output: bool = False) -> torch.Tensor | CausalLMOutput:
        """Like GPT.forward; the outputs cover the input's positions only (not the virtual ones).
        With a kv_cache, its rows already start with the prefix (new_kv_cache made it)."""
        extra = {} if labels is None else {"labels": labels}
        if kv_cache is not None:
            return self.base(input_ids, attention_mask, kv_cache, cache_rows, inputs_embeds=inputs_embeds,
                             logits_mask=logits_mask, return_output=return_output, **extra)
        if position_ids is not None or document_ids is not None:
            raise UserError("prompt and prefix tuning prepend to whole rows, so packed rows cannot share them; "
                            "train with packing=false")
        embeds = self.base.transformer.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = embeds.shape[:2]
        n = self.num_virtual_tokens
        if self.prompt_config.method == "prefix":
            # The learned keys/values go where a cache holds past tokens: the input then sits at
            # positions n.. and attends to them (what peft's past_key_values does).
            cache = cache_with_prefix(self.prefix_kv(), self.config, batch, length, embeds.dtype, embeds.device)
            return self.base(None, attention_mask, cache, inputs_embeds=embeds, logits_mask=logits_mask,
                             return_output=return_output, **extra)
        prompt = self.prompt_encoder().to(embeds.dtype)[None].expand(batch, -1, -1)    # [B, n, d]
        ones = torch.ones(batch, n, dtype=torch.bool, device=embeds.device)
        mask = None if attention_mask is None else torch.cat([ones.to(attention_mask.dtype), attention_mask], 1)
        keep = None if logits_mask is None else torch.cat([~ones, logits_mask.bool()], 1)
        if labels is not None:      # the virtual positions predict nothing (peft pads labels with -100)
            extra["labels"] = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device),
                                         labels], 1)
        out = self.base(inputs_embeds=torch.cat([prompt, embeds], 1), attention_mask=mask, logits_mask=keep,
                        return_output=True, **extra)
        if labels is not None:
            return out._replace(hidden_states=out.hidden_states[:, n:])
        logits = out.logits if logits_mask is not None else out.logits[:, n:]
        if not return_output:
            return logits
        return out._replace(logits=logits, hidden_states=out.hidden_states[:, n:])

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        if kv_cache is not None:
            return self.base.hidden_states(input_ids, attention_mask, kv_cache, cache_rows)
        return self.forward(input_ids, attention_mask, return_output=True).hidden_states

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None
                     ) -> PrefixKVCache:
        parameter = next(self.base.parameters())
        config = self.config
        return PrefixKVCache(self._inference_prefix, config.n_layers, batch_size, max_seq_len or config.max_seq_len,
                             config.n_kv_heads, config.head_dim, dtype or parameter.dtype, parameter.device)

    # the prefix ----------------------------------------------------------------------------
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [Hkv, n, D] of the prompt or prefix (with autograd)."""
        config, n = self.config, self.num_virtual_tokens
        if self.prompt_config.method == "prefix":
            return prefix_pairs(self.prompt_encoder(), config)
        # Prompt/P-tuning: run the virtual tokens once; their keys/values do not depend on the input.
        prompt = self.prompt_encoder()[None]
        parameter = next(self.base.parameters())
        cache = KVCache(config.n_layers, 1, n, config.n_kv_heads, config.head_dim, parameter.dtype, parameter.device)
        self.base.transformer(None, kv_cache=cache, inputs_embeds=prompt.to(parameter.dtype))
        return [(cache.keys[layer][0], cache.values[layer][0]) for layer in range(config.n_layers)]

    @torch.no_grad()
    def _inference_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prefix_kv without autograd, recomputed only when the encoder's weights changed (training)."""
        version = tuple(param._version for param in self.prompt_encoder.parameters())
        if self._cached is None or self._cached[0] != version:
            was_training = self.training
            self.eval()
            try:
                self._cached = (version, [(k.detach(), v.detach()) for k, v in self.prefix_kv()])
            finally:
                self.train(was_training)
        return self._cached[1]

    def prompt_values(self) -> torch.Tensor:
        """What PEFT's file stores: the encoder's output, [n, d] or [n, L*2*Hkv*D] (HF layout)."""
        with torch.no_grad():
            values = self.prompt_encoder().detach().float()
        if self.prompt_config.method == "prefix" and self.config.rope_interleaved:
            values = rope_layout(values, self.config, to_hf=True)
        return values.cpu().contiguous().clone()


# ----------------------------------------------------------------------------- building


def token_dim(model: nn.Module, method: str) -> int:
    """The width of one virtual token: d_model, or Hkv * head_dim for a prefix (per layer, key or value)."""
    config = model.config
    return config.n_kv_heads * config.head_dim if method == "prefix" else config.d_model


def check_base(model: nn.Module) -> None:
    """A UserError unless `model` is a plain GPT that prompt learning can wrap."""
    if getattr(model.config, "arch", "gpt") != "gpt" or not hasattr(model, "transformer"):
        raise UserError("prompt and prefix tuning need a causal LM (a GPT); this model is not one")
    if isinstance(model, PromptTunedLM):
        raise UserError("this model already has a prompt adapter; start from the base model")
    if model.config.n_experts:
        raise UserError("prompt and prefix tuning are not supported on mixture-of-experts models here")


def apply_prompt_tuning(model: nn.Module, config: PromptConfig, tokenizer: Any = None) -> PromptTunedLM:
    """Freeze `model` and return it wrapped with a new prompt (method and size from `config`)."""
    config = config.validate()
    check_base(model)
    n, d, method = config.num_virtual_tokens, model.config.d_model, config.method
    generator = torch.Generator().manual_seed(config.seed)
    parameter = next(model.parameters())
    if method == "prefix":
        kv_dim = token_dim(model, "prefix")
        encoder: nn.Module = PrefixEncoder(n, kv_dim, model.config.n_layers, config.prefix_projection,
                                           config.encoder_hidden_size or kv_dim)
    elif method == "ptuning":
        encoder = PromptEncoder(n, d, config.encoder_hidden_size or d, config.encoder, config.encoder_num_layers,
                                config.encoder_dropout)
    else:
        encoder = PromptEmbedding(n, d)
        table = model.transformer.embed_tokens.weight
        if config.init == "text":
            if tokenizer is None:
                raise UserError("prompt init=text needs the model's tokenizer")
            ids = tokenizer.encode(config.init_text)
            if not ids:
                raise UserError(f"prompt.init_text={config.init_text!r} has no tokens; give some text")
            ids = (ids * math.ceil(n / len(ids)))[:n]       # repeated or cut to n tokens, as PEFT does
            start = table[torch.tensor(ids, device=table.device)]
        elif config.init == "vocab":
            start = table[torch.randint(0, table.shape[0], (n,), generator=generator).to(table.device)]
        else:
            start = torch.randn(n, d, generator=generator)
        with torch.no_grad():
            encoder.embedding.weight.copy_(start.float())
    return PromptTunedLM(model, config, encoder.to(device=parameter.device))


def describe_prompt(model: PromptTunedLM) -> str:
    trainable = sum(p.numel() for p in model.prompt_encoder.parameters())
    total = trainable + sum(p.numel() for p in model.base.parameters())
    return (f"{model.prompt_config.method} with {model.num_virtual_tokens} virtual tokens: {trainable:,} trainable "
            f"of {total:,} parameters ({trainable / total:.3%})")


def base_state_dict(model: PromptTunedLM) -> dict[str, torch.Tensor]:
    """The base model's own state dict (what the run exports: a prompt is not part of the weights),
    tied aliases (an output head sharing the embedding) left out as the export expects."""
    from ..model.builders import tied_names

    aliases = tied_names(model.base)
    return {name: tensor for name, tensor in model.base.state_dict().items() if name not in aliases}


def settings_dict(config: PromptConfig) -> dict[str, Any]:
    return asdict(config)
