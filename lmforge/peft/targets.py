"""Which linear layers LoRA adapts, and how our fused layers split into Hugging Face's modules.

`linear_slices(model)` lists every linear layer by our module name with its slices: a Llama
`attn.qkv` is q_proj, k_proj and v_proj (rows q, then k, then v), a SwiGLU `gate_up` is gate_proj
and up_proj; the names are those our HF export writes (lmforge/model/hf/), so an adapter here is
exactly a PEFT adapter there. `resolve_targets` turns `target_modules` (PEFT-style names, ours, a
regular expression, or "all-linear") into the slices to adapt, with a clear error for a name
that matches nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError

ALL_LINEAR = "all-linear"
# Our output heads: "all-linear" leaves them out, as PEFT leaves out the output embedding.
OUTPUT_HEADS = ("lm_head", "mlm_decoder", "classifier")


@dataclass(frozen=True)
class Slice:
    """A run of a linear layer's output rows that is one module in Hugging Face's model."""

    name: str        # ours: "q", "k", "v" (attn.qkv), "gate", "up" (SwiGLU gate_up), or "all"
    start: int
    size: int
    hf_name: str     # the module it is in the HF model our export writes, e.g. model.layers.0.self_attn.q_proj

    @property
    def stop(self) -> int:
        return self.start + self.size


_STRUCTURE = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
# Llama-style names for models without a Hugging Face export (MoE, qk_norm, ...): ours -> theirs.
_FALLBACK_LEAF = {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                  "down": ("down_proj",), "up": ("up_proj",)}
_FALLBACK_SEGMENT = {"transformer": "model", "blocks": "layers", "attn": "self_attn"}


def _structural_sizes(parent: nn.Module, attribute: str, linear: nn.Module) -> tuple[int, ...]:
    """The slice row counts of our fused layers (qkv: q, k, v; gate_up: gate, up), else one slice."""
    from ..model.attention import Attention
    from ..model.mlp import SwiGLU

    if isinstance(parent, Attention) and attribute == "qkv":
        kv = parent.n_kv_heads * parent.head_dim
        return parent.n_heads * parent.head_dim, kv, kv
    if isinstance(parent, SwiGLU) and attribute == "gate_up":
        half = linear.out_features // 2
        return half, half
    return (linear.out_features,)


def _fallback_names(path: str, sizes: tuple[int, ...]) -> list[str]:
    segments = path.split(".")
    leaf = segments[-1]
    prefix = ".".join(_FALLBACK_SEGMENT.get(segment, segment) for segment in segments[:-1])
    leaves = _FALLBACK_LEAF.get(leaf, (leaf,))
    if len(leaves) != len(sizes):
        leaves = (leaf,)
    return [f"{prefix}.{name}" if prefix else name for name in leaves]


def _hf_rules(model: nn.Module) -> dict[str, Any] | None:
    """Our tensor name -> HF rule for the architecture our export writes, or None (not exportable)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "arch"):
        return None
    from ..model.hf.export import hf_family_for

    try:
        _, family = hf_family_for(config)
    except UserError:
        return None
    return {rule.ours: rule for rule in family.rules(config)}


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attribute = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attribute


def linear_slices(model: nn.Module) -> dict[str, list[Slice]]:
    """Every linear layer of `model` (by our module name) and its slices, with their HF names.

    The slices are the Hugging Face modules our export makes of the layer (a Llama `qkv` is
    q_proj, k_proj and v_proj; GPT-2's is the one c_attn); for a model without an HF export, our
    fused layers are split into their parts under Llama-style names.
    """
    from .lora import LoRALinear      # an already adapted layer keeps its slices

    rules = _hf_rules(model)
    layers: dict[str, list[Slice]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, LoRALinear)):
            continue
        parent, attribute = parent_of(model, path)
        sizes = _structural_sizes(parent, attribute, module)
        names = None
        rule = rules.get(f"{path}.weight") if rules is not None else None
        if rule is not None:
            names = [name.removesuffix(".weight") for name in rule.theirs]
            sizes = tuple(rule.split) if rule.split is not None else (module.out_features,)
        if names is None:
            names = _fallback_names(path, sizes)
            if len(names) != len(sizes):
                sizes = (module.out_features,)
        parts = _STRUCTURE.get(attribute) if len(sizes) > 1 else None
        if parts is None or len(parts) != len(sizes):
            parts = ("all",) if len(sizes) == 1 else tuple(f"part{i}" for i in range(len(sizes)))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        layers[path] = [Slice(part, start, size, name) for part, start, size, name in zip(parts, starts, sizes, names)]
    return layers


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _tied_paths(model: nn.Module) -> set[str]:
    """Linear layers whose weight is also another module's (a tied output head)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


def resolve_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...]
                    ) -> dict[str, list[Slice]]:
    """Our layer name -> the slices `target_modules` selects (see the module docstring)."""
    layers = linear_slices(model)
    tied = _tied_paths(model)
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: dict[str, list[Slice]] = {}
    if ALL_LINEAR in entries:
        if len(entries) > 1:
            raise UserError(f"lora target_modules lists '{ALL_LINEAR}' with other names ({entries}); give one or "
                            "the other")
        for path, slices in layers.items():
            if path.split(".")[0] not in OUTPUT_HEADS and path not in tied:
                chosen[path] = list(slices)
        return chosen
    regex = isinstance(target_modules, str)
    unmatched = []
    for entry in entries:
        if regex:
            try:
                pattern = re.compile(entry)
            except re.error as error:
                raise UserError(f"lora target_modules '{entry}' is not a valid regular expression ({error}); "
                                "fix it or give a list of module names") from None
            hit = lambda name, pattern=pattern: pattern.fullmatch(name) is not None   # noqa: E731
        else:
            hit = lambda name, entry=entry: _name_matches(name, entry)              # noqa: E731
        found = False
        for path, slices in layers.items():
            selected = slices if hit(path) else [piece for piece in slices if hit(piece.hf_name)]
            if not selected:
                continue
            found = True
            if path in tied:
                raise UserError(f"lora target '{entry}' selects '{path}', whose weight is tied to the input "
                                "embedding; adapting it would change the embedding too, so leave it out")
            have = chosen.setdefault(path, [])
            have.extend(piece for piece in selected if piece not in have)
        if not found:
            unmatched.append(entry)
    if unmatched:
        raise UserError(f"lora target_modules {', '.join(map(repr, unmatched))} match no linear layer of this model; "
                        f"its layers are {available_names(layers)} (or '{ALL_LINEAR}')")
    for path in chosen:
        chosen[path].sort(key=lambda piece: piece.start)
    return chosen


def available_names(layers: dict[str, list[Slice]]) -> str:
    """The short names a user can target: HF leaf names and ours."""
    hf = sorted({piece.hf_name.rsplit(".", 1)[-1] for slices in layers.values() for piece in slices})
    ours = sorted({path.rsplit(".", 1)[-1] for path in layers})
    return f"{', '.join(hf)} (Hugging Face names) or {', '.join(ours)} (lmforge names)"


# ----------------------------------------------------------------------------- the API
