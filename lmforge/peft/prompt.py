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
- Prefix tuning (Li & Liang 2021): every layer gets n learned key and value vectors in front of
  the keys and values of the input, [L, 2, Hkv, n, D]; optionally reparametrised through an MLP
  (E [n, Hkv*D] -> tanh -> L*2*Hkv*D), which Li & Liang found stabler to train.

One mechanism at inference: a KV-cache prefix. Because attention is causal, the keys and values
of n prepended virtual tokens do not depend on what follows them, so prompt tuning and P-tuning
equal "run the n virtual embeddings once and keep their keys/values"; prefix tuning *is* a set of
keys/values. `PrefixKVCache` writes that prefix into positions 0..n-1 of a cache row whenever the
row is reset, so the inference engine (continuous batching, the compiled decode step) serves an
adapted model unchanged, and the prompt's tokens sit at positions n, n+1, ... exactly as in
training and in PEFT (tests/test_peft_prompt.py checks cached generation against recomputing
the whole sequence without a cache, and logits against peft on our HF export).

PEFT's file format stores the *result* of the reparametrisation, as PEFT's own save_pretrained
does: adapter_model.safetensors holds one tensor `prompt_embeddings`, [n, d] for prompt tuning
and P-tuning and [n, L*2*Hkv*D] for prefix tuning (per virtual token: layer, key|value, head,
dim, the order peft's get_prompt views it in). A loaded adapter is therefore a fixed prompt
(PEFT's inference mode); training continues from an sft checkpoint, which keeps the encoder.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from ..model.gpt import CausalLMOutput
from ..model.kv_cache import KVCache

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
METHODS = {value: key for key, value in PEFT_TYPES.items()}


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


class PrefixEncoder(nn.Module):
    """Prefix tuning: () -> [n, L * 2 * Hkv * D], directly or through E [n, Hkv*D] -> MLP (tanh)."""

    def __init__(self, n: int, kv_dim: int, n_layers: int, projection: bool, hidden: int) -> None:
        super().__init__()
        self.projection = projection
        out = n_layers * 2 * kv_dim
        self.embedding = nn.Embedding(n, kv_dim if projection else out)
        if projection:
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return self.transform(weight) if self.projection else weight


class FixedPrompt(nn.Module):
    """A loaded adapter: the saved output of any of the above (PEFT's inference mode). () -> [n, k]."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*values.shape)
        with torch.no_grad():
            self.embedding.weight.copy_(values)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


# ----------------------------------------------------------------------------- the KV-cache prefix


class PrefixKVCache(KVCache):
    """A KV cache whose rows start with a prefix: `reset(rows)` writes it at positions 0..n-1.

    prefix: called at each reset, returns one (keys, values) pair [Hkv, n, D] per layer."""

    def __init__(self, prefix: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix
        self.reset()

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        pairs = self.prefix()
        n = pairs[0][0].shape[1]
        index = (slice(None) if rows is None
                 else torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device))
        for layer, (k, v) in enumerate(pairs):
            self.keys[layer][index, :, :n] = k.to(self.keys[layer].dtype)
            self.values[layer][index, :, :n] = v.to(self.values[layer].dtype)
        self.lengths[index] = n


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
            cache = KVCache(self.config.n_layers, batch, n + length, self.config.n_kv_heads, self.config.head_dim,
                            embeds.dtype, embeds.device)
            for layer, (k, v) in enumerate(self.prefix_kv()):
                cache.keys[layer][:, :, :n] = k
                cache.values[layer][:, :, :n] = v
            cache.lengths.fill_(n)
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
            # [n, L*2*Hkv*D] -> [n, 2L, Hkv, D] -> [2L, Hkv, n, D]: layer l's keys at 2l, values at 2l+1
            kv = self.prompt_encoder().view(n, 2 * config.n_layers, config.n_kv_heads, config.head_dim)
            kv = kv.permute(1, 2, 0, 3)
            return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(config.n_layers)]
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
            values = _rope_layout(values, self.config, to_hf=True)
        return values.cpu().contiguous().clone()


def _rope_layout(values: torch.Tensor, config: Any, to_hf: bool) -> torch.Tensor:
    """Prefix keys between our interleaved RoPE pairs (2i, 2i+1) and HF's halves (i, i + D/2)."""
    n, L, H, D = values.shape[0], config.n_layers, config.n_kv_heads, config.head_dim
    kv = values.view(n, L, 2, H, D).clone()
    keys = kv[:, :, 0]
    order = (keys.reshape(n, L, H, D // 2, 2).transpose(-1, -2) if to_hf
             else keys.reshape(n, L, H, 2, D // 2).transpose(-1, -2))
    kv[:, :, 0] = order.reshape(n, L, H, D)
    return kv.reshape(values.shape)


# ----------------------------------------------------------------------------- building and saving


def _token_dim(model: nn.Module, method: str) -> int:
    config = model.config
    return config.n_kv_heads * config.head_dim if method == "prefix" else config.d_model


def _check_base(model: nn.Module) -> None:
    if getattr(model.config, "arch", "gpt") != "gpt" or not hasattr(model, "transformer"):
        raise UserError("prompt and prefix tuning need a causal LM (a GPT); this model is not one")
    if isinstance(model, PromptTunedLM):
        raise UserError("this model already has a prompt adapter; start from the base model")
    if model.config.n_experts:
        raise UserError("prompt and prefix tuning are not supported on mixture-of-experts models here")


def apply_prompt_tuning(model: nn.Module, config: PromptConfig, tokenizer: Any = None) -> PromptTunedLM:
    """Freeze `model` and return it wrapped with a new prompt (method and size from `config`)."""
    config = config.validate()
    _check_base(model)
    n, d, method = config.num_virtual_tokens, model.config.d_model, config.method
    generator = torch.Generator().manual_seed(config.seed)
    parameter = next(model.parameters())
    if method == "prefix":
        kv_dim = _token_dim(model, "prefix")
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


def prompt_adapter_config(model: PromptTunedLM, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's adapter_config.json for the model's prompt (inference mode: the stored output)."""
    config, settings = model.config, model.prompt_config
    method = settings.method
    token_dim = _token_dim(model.base, method)
    out: dict[str, Any] = {
        "peft_type": PEFT_TYPES[method], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None, "inference_mode": True, "auto_mapping": None, "modules_to_save": None,
        "num_virtual_tokens": settings.num_virtual_tokens, "token_dim": token_dim,
        "num_transformer_submodules": 1, "num_layers": config.n_layers,
        "num_attention_heads": config.n_kv_heads if method == "prefix" else config.n_heads,
    }
    if method == "prompt":
        out.update(prompt_tuning_init="TEXT" if settings.init == "text" else
                   "SAMPLE_VOCAB" if settings.init == "vocab" else "RANDOM",
                   prompt_tuning_init_text=settings.init_text, tokenizer_name_or_path=None, tokenizer_kwargs=None)
    elif method == "ptuning":
        out.update(encoder_reparameterization_type=settings.encoder.upper(),
                   encoder_hidden_size=settings.encoder_hidden_size or token_dim,
                   encoder_num_layers=settings.encoder_num_layers, encoder_dropout=settings.encoder_dropout)
    else:
        out.update(prefix_projection=settings.prefix_projection, init_weights=None,
                   encoder_hidden_size=settings.encoder_hidden_size or token_dim)
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
    _check_base(model)
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
    width = config.n_layers * 2 * _token_dim(model, "prefix") if method == "prefix" else config.d_model
    if tuple(values.shape) != (n, width):
        what = (f"{config.n_layers} layers x 2 x {config.n_kv_heads} kv heads x {config.head_dim}"
                if method == "prefix" else f"d_model {config.d_model}")
        raise UserError(f"'{weights}' holds prompt_embeddings of shape {list(values.shape)} but this base model "
                        f"needs [{n}, {width}] ({what}); the adapter was trained on another base model")
    if method == "prefix" and config.rope_interleaved:
        values = _rope_layout(values, config, to_hf=False)
    settings = PromptConfig(method=method, num_virtual_tokens=n)
    parameter = next(model.parameters())
    return PromptTunedLM(model, settings, FixedPrompt(values).to(device=parameter.device, dtype=parameter.dtype))


def base_state_dict(model: PromptTunedLM) -> dict[str, torch.Tensor]:
    """The base model's own state dict (what the run exports: a prompt is not part of the weights),
    tied aliases (an output head sharing the embedding) left out as the export expects."""
    from ..model.builders import tied_names

    aliases = tied_names(model.base)
    return {name: tensor for name, tensor in model.base.state_dict().items() if name not in aliases}


def settings_dict(config: PromptConfig) -> dict[str, Any]:
    return asdict(config)
