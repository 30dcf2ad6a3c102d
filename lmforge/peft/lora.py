"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024), written from scratch.

    from lmforge.peft import LoRAConfig, apply_lora, merge_lora, merged_state_dict
    apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    trainable = lora_parameters(model)        # the only parameters with requires_grad
    ...train...
    merge_lora(model)                         # W <- W + (alpha/r) B A: no extra cost at inference
    unmerge_lora(model)                       # and back
    state = merged_state_dict(model)          # the base model's keys, adapters folded in

A LoRA layer keeps the frozen weight W [out, in] and learns a low-rank update next to it:

    y = W x + b + s * B A dropout(x)          A [r, in] (Kaiming-uniform), B [out, r] (zeros), s = alpha / r

B = 0 makes the adapted model start exactly as the base. rsLoRA scales by alpha / sqrt(r) instead,
which keeps the update's size stable as r grows. DoRA splits the adapted weight into a direction
and a learned magnitude m (one per output row, initialised to the row norms of W):

    W' = m * (W + s B A) / ||W + s B A||      (row norms, treated as a constant: no gradient)

Fused layers. Our attention has one `qkv` Linear (rows: q, then k, then v) and SwiGLU one
`gate_up` Linear (rows: gate, then up), where Hugging Face models have q_proj/k_proj/v_proj and
gate_proj/up_proj. So that PEFT's names work unchanged (`target_modules=["q_proj", "v_proj"]`:
"q and v only"), a LoRA layer is split by the slices of its output rows, as litgpt does: each
targeted slice has its own A and B, and the fused output gets the per-slice updates concatenated,
zero for the slices not targeted. The slices are the Hugging Face modules our export writes
(lmforge/model/hf/), so an adapter here is exactly a PEFT adapter there (see adapter_format.py).

`target_modules` entries are matched like PEFT's: a list entry matches a module whose name equals
it or ends with "." + it, tried against both the Hugging Face name of each slice
(`model.layers.0.self_attn.q_proj`) and our module name (`transformer.blocks.0.attn.qkv`, which
targets all its slices); a single string other than "all-linear" is a regular expression that
must match a whole name. "all-linear" is every linear layer except the output head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .targets import Slice, linear_slices, parent_of, resolve_targets

# The parameters `lora_state_dict` holds, by their name inside a LoRA layer.
ADAPTER_MARK = ".lora."


@dataclass
class LoRAConfig:
    """What `apply_lora` adds. The defaults are PEFT's LoraConfig defaults (r=8, lora_alpha=8)."""

    r: int = 8                                   # the rank of each update B A
    alpha: float = 8.0                           # the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))
    dropout: float = 0.0                         # dropout on the adapters' input only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"                           # biases stay frozen (the only mode supported)

    def validate(self) -> "LoRAConfig":
        targets = self.target_modules
        checks = [
            (type(self.r) is int and self.r >= 1, f"lora r must be a positive integer, not {self.r!r}"),
            (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
             and math.isfinite(self.alpha) and self.alpha > 0, f"lora alpha must be a positive number, not {self.alpha!r}"),
            (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
             f"lora dropout must be in [0, 1), not {self.dropout!r}"),
            (self.bias == "none", f"lora bias='{self.bias}' is not supported; only 'none' (biases stay frozen) is"),
            (isinstance(targets, str) and targets != "" or isinstance(targets, (list, tuple)) and len(targets) > 0
             and all(isinstance(t, str) and t for t in targets),
             f"lora target_modules must be module names (e.g. q_proj,v_proj) or all-linear, not {targets!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the LoRA config")
        return self

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        return lora_scaling(self.r if r is None else r, self.alpha if alpha is None else alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ----------------------------------------------------------------------------- the layers


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row (output unit) of a weight [out, in] -> [out] (DoRA's ||W||_c)."""
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class LoRAAdapter(nn.Module):
    """One slice's update: A [r, in], B [rows, r], and with DoRA a magnitude [rows]."""

    def __init__(self, in_features: int, rows: int, r: int, alpha: float, use_rslora: bool,
                 weight_rows: torch.Tensor | None, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device))
        # As PEFT initialises lora_A (nn.Linear's own default): uniform(+-1/sqrt(in)).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.magnitude = (nn.Parameter(row_norm(weight_rows.detach().to(dtype)).clone())
                          if weight_rows is not None else None)
        self._merge_norm: torch.Tensor | None = None   # DoRA: the row norms the merge divided by

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    def delta_weight(self) -> torch.Tensor:
        """s * B A: [rows, in]."""
        return (self.B @ self.A) * self.scaling

    def dora_scale(self, weight_rows: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A|| per row [rows], the norm detached (DoRA section 4.3; PEFT does the same)."""
        norm = row_norm(weight_rows.detach() + self.delta_weight().detach().to(weight_rows.dtype))
        return self.magnitude / norm.detach().to(self.magnitude.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4g}"
                + (", rslora" if self.use_rslora else "") + (", dora" if self.use_dora else ""))


class LoRALinear(nn.Module):
    """A frozen nn.Linear with LoRA updates on some slices of its output rows.

    `weight` and `bias` are the original layer's parameters (the same tensors, same names), so the
    model's state dict keeps every base key; the adapters add `<layer>.lora.<slice>.A`/`.B`
    (and `.magnitude` for DoRA).
    """

    def __init__(self, base: nn.Linear, slices: list[Slice], adapters: dict[str, tuple[int, float]],
                 dropout: float, use_rslora: bool, use_dora: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                    # the same Parameter objects: nothing is copied
        self.register_parameter("bias", base.bias)
        self.slices = tuple(slices)
        # Adapters train in fp32 even on a bf16/fp16 base (PEFT's autocast_adapter_dtype does the same).
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora = nn.ModuleDict()
        for piece in slices:
            if piece.name in adapters:
                r, alpha = adapters[piece.name]
                rows = base.weight[piece.start:piece.stop] if use_dora else None
                self.lora[piece.name] = LoRAAdapter(self.in_features, piece.size, r, alpha, use_rslora, rows,
                                                    dtype, base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def adapted(self) -> Iterator[tuple[Slice, LoRAAdapter]]:
        for piece in self.slices:
            if piece.name in self.lora:
                yield piece, self.lora[piece.name]

    def base_weight(self) -> torch.Tensor:
        """The frozen weight [out, in] (QLoRA's layer dequantizes its 4-bit copy here)."""
        return self.weight

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x without bias (QLoRA's layer dequantizes on the fly, in forward and backward)."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        base = self.base_linear(x)
        dropout_active = self.training and not isinstance(self.dropout, nn.Identity)
        pieces = []
        for piece in self.slices:
            base_piece = base[..., piece.start:piece.stop] if len(self.slices) > 1 else base
            adapter = self.lora[piece.name] if piece.name in self.lora else None
            if adapter is None:
                pieces.append(base_piece)
                continue
            # Each slice draws its own dropout mask, as PEFT's separate q_proj, k_proj, v_proj do.
            inputs = self.dropout(x).to(adapter.A.dtype)
            update = F.linear(F.linear(inputs, adapter.A), adapter.B)        # B A x: [..., rows]
            if adapter.use_dora:
                # PEFT's formula: (m/||.|| - 1) W x' + m/||.|| s B A x', where x' is the dropped input
                # (then W x' is recomputed) or, without active dropout, x itself (W x is reused).
                weight_rows = self.base_weight()[piece.start:piece.stop]
                scale = adapter.dora_scale(weight_rows.to(adapter.A.dtype))
                base_part = F.linear(inputs, weight_rows.to(inputs.dtype)) if dropout_active else base_piece
                update = (scale - 1) * base_part.to(scale.dtype) + scale * update * adapter.scaling
            else:
                update = update * adapter.scaling
            pieces.append(base_piece + update.to(base_piece.dtype))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight with the updates folded in (a new tensor; the layer is unchanged)."""
        if self.merged:
            return self.weight.detach().clone()
        weight = self.base_weight().detach().clone()
        for piece, adapter in self.adapted():
            rows = weight[piece.start:piece.stop]
            updated = rows + adapter.delta_weight().to(rows.dtype)
            if adapter.use_dora:
                updated = adapter.dora_scale(rows).to(rows.dtype)[:, None] * updated
            rows.copy_(updated)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A per slice (DoRA: m/||W + s B A|| * (W + s B A)); forward is then one matmul."""
        if self.merged:
            return
        for piece, adapter in self.adapted():
            rows = self.weight.data[piece.start:piece.stop]
            updated = rows + adapter.delta_weight().to(rows.dtype)
            if adapter.use_dora:
                norm = row_norm(updated)
                adapter._merge_norm = norm
                updated = (adapter.magnitude.to(rows.dtype) / norm)[:, None] * updated
            rows.copy_(updated)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (the adapters must not have changed in between)."""
        if not self.merged:
            return
        for piece, adapter in self.adapted():
            rows = self.weight.data[piece.start:piece.stop]
            if adapter.use_dora:
                rows.copy_(rows / (adapter.magnitude.to(rows.dtype) / adapter._merge_norm)[:, None])
                adapter._merge_norm = None
            rows.sub_(adapter.delta_weight().to(rows.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        targeted = ", ".join(piece.name for piece, _ in self.adapted())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"adapted slices: {targeted}" + (", merged" if self.merged else ""))


# ----------------------------------------------------------------------------- finding the layers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Add LoRA adapters to `model` in place and freeze everything else; returns `model`.

    Afterwards only the adapters require grad, so lmforge's optimizer (which takes the parameters
    that do) trains them alone. `model.lora_config` records the config.
    """
    config = (config or LoRAConfig()).validate()
    targets = resolve_targets(model, config.target_modules)
    install_lora(model, {path: {piece.name: (config.r, float(config.alpha)) for piece in slices}
                         for path, slices in targets.items()}, config)
    return model


def install_lora(model: nn.Module, adapters: dict[str, dict[str, tuple[int, float]]], config: LoRAConfig) -> None:
    """Wrap each named layer with adapters on the named slices, each with its own (r, alpha)."""
    if has_lora(model):
        raise UserError("this model already has LoRA adapters; unload_lora(model) first, or start from the base model")
    layers = linear_slices(model)
    model._lora_requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for path, wanted in adapters.items():
        base = model.get_submodule(path)
        parent, attribute = parent_of(model, path)
        setattr(parent, attribute, LoRALinear(base, layers[path], wanted, config.dropout, config.use_rslora,
                                              config.use_dora))
    model.lora_config = config


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A, B and DoRA magnitudes): what fine-tuning trains."""
    return [param for _, layer in lora_layers(model) for param in layer.lora.parameters()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only, by our names (`transformer.blocks.0.attn.qkv.lora.q.A`, ...)."""
    return {f"{path}.lora.{name}": param.detach() for path, layer in lora_layers(model)
            for name, param in layer.lora.named_parameters()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `lora_state_dict` output back into a model with the same adapters (shapes checked)."""
    own = {f"{path}.lora.{name}": param for path, layer in lora_layers(model)
           for name, param in layer.lora.named_parameters()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"the LoRA weights do not fit this model's adapters (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); apply the same LoRA config first")
    for name, param in own.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise UserError(f"LoRA tensor '{name}' has shape {list(state[name].shape)} but this model's adapter "
                            f"has {list(param.shape)}; apply the same LoRA config first")
        param.copy_(state[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take the adapters back out of the base weights (in place)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (same keys as before `apply_lora`) with the adapters folded in:
    what `save_pretrained`, the HF export or `lmforge.load` need. The model is unchanged."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ADAPTER_MARK not in name}
    for path, layer in lora_layers(model):
        state[f"{path}.weight"] = layer.merged_weight()
    return state


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear (merged by default, else the base weight),
    restore the parameters' requires_grad flags as they were, and return the plain model."""
    for path, layer in list(lora_layers(model)):
        weight = layer.merged_weight() if merge else _base_weight(layer)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, attribute = parent_of(model, path)
        setattr(parent, attribute, linear)
    flags = getattr(model, "_lora_requires_grad", {})
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, True))
    for attribute in ("_lora_requires_grad", "lora_config"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return model


@torch.no_grad()
def _base_weight(layer: LoRALinear) -> torch.Tensor:
    if not layer.merged:
        return layer.base_weight().detach().clone()
    layer.unmerge()
    weight = layer.weight.detach().clone()
    layer.merge()
    return weight


def describe_lora(model: nn.Module) -> str:
    """'N adapter tensors, T trainable of P parameters (x%)' for logs and plans."""
    trainable = sum(param.numel() for param in lora_parameters(model))
    total = sum(param.numel() for param in model.parameters())
    layers = sum(len(layer.lora) for _, layer in lora_layers(model))
    return f"LoRA on {layers} slices: {trainable:,} trainable of {total:,} parameters ({trainable / max(total, 1):.2%})"
