"""`quantize_model`: swap every nn.Linear of a model for a quantized one (in place).

    from lmforge.quant import quantize_model
    model = quantize_model(model, "q4_0")        # int8 | llm-int8 | nf4 | q4_0

Methods:
- "int8":     weight-only int8, one scale per output channel (weight_only.Int8WeightLinear)
- "llm-int8": LLM.int8(), int8 weights *and* activations, outlier columns in fp (int8.Int8Linear)
- "nf4":      QLoRA's NF4, blocks of 64, double-quantized absmax, dequantized per forward (nf4.NF4Linear)
- "q4_0":     llama.cpp's Q4_0, blocks of 32, one scale (weight_only.Q4Linear)
- "q4_1":     llama.cpp's Q4_1, blocks of 32, scale and min: the bundled SmolLM2 GGUF is Q4_1, so
              this gives back its exact 4-bit weights (its "packed GGUF" path, with no GGUF plumbing)

Activation-aware rounding (nf4, q4_0): `quantize_model(model, "q4_0", calibration_ids=ids)` picks
each block's scale by the rounding error weighted by the inputs' mean square on `ids` (the CLI's
`--calibrate N` uses N Wikipedia tokens, or others with `--calibration-text`); same format,
lmforge.quant.calibrate explains it. Scale tuning (q4_0, nf4; `--tune-steps K`, lmforge.quant.tune)
then trains the block scales against the float model on the same tokens, codes fixed.

A quantized model saves in the lmforge format (`save_pretrained`, `lmforge convert --quantize`):
model.safetensors holds the codes and scales as the layers do, and config.json's "quantization"
({"method", "head_bits", "recipe"}, `saved_quantization`) tells `lmforge.load` how to rebuild the
layers (`quantized_skeleton`), so calibration and tuning are paid once, not at every load.

The output layer is quantized too (with tied embeddings it gets its own quantized copy; the input
embedding stays in float, since a lookup reads one row per token). With a 4-bit method it gets
int8 unless head_bits=4: the logits are the most sensitive matmul, as in llama.cpp, which keeps
`output.weight` at 6-8 bits in its 4-bit files. Layers whose in_features the
4-bit block does not divide stay in float and are counted in the summary.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch
from torch import nn

from ..errors import UserError

Method = Literal["int8", "llm-int8", "nf4", "q4_0", "q4_1"]
METHODS: tuple[str, ...] = get_args(Method)
CLI_METHODS = ("int8", "nf4", "q4_0", "q4_1")         # the --quantize choices (llm-int8 is for the lab)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QuantSummary:
    method: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)     # left in float (shape not supported)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    calibration_tokens: int = 0                       # 0 = round to nearest


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown quantization method '{method}'; choose one of {', '.join(METHODS)}")
    return method


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def quantize_linear(linear: nn.Linear, method: str, threshold: float = 6.0, fast: bool = True,
                    importance: Optional[torch.Tensor] = None) -> nn.Module:
    """The quantized replacement of one nn.Linear. `importance` [in] (E[x^2] per input feature)
    makes nf4 and q4_0 pick their block scales activation-aware (lmforge.quant.calibrate)."""
    from .calibrate import nf4_block_scales, q4_0_weighted
    from .int8 import Int8Linear
    from .nf4 import NF4Linear
    from .weight_only import Q4_GROUP, Int8WeightLinear, Q4Linear

    if method == "int8":
        return Int8WeightLinear.from_linear(linear, fast=fast)
    if method == "llm-int8":
        return Int8Linear.from_linear(linear, threshold=threshold)
    if method == "nf4":
        scale = None if importance is None else nf4_block_scales(linear.weight, importance)
        return NF4Linear.from_linear(linear, scale=scale)
    if linear.in_features % Q4_GROUP:
        raise UserError(f"in_features {linear.in_features} is not a multiple of {Q4_GROUP}")
    if method == "q4_1":
        return Q4Linear.from_linear_q4_1(linear, fast=fast)
    if importance is not None:
        codes, scales = q4_0_weighted(linear.weight, importance, Q4_GROUP)
        return Q4Linear(codes, scales, None, linear.bias, fast)
    return Q4Linear.from_linear(linear, fast=fast)


def _stored_bytes(module: nn.Module) -> int:
    """Bytes of the saved weight and its scales (not the bias, not the kernel's own packed copy)."""
    return sum(t.numel() * t.element_size() for key, t in module.state_dict().items() if key != "bias")


FOUR_BIT = ("nf4", "q4_0", "q4_1")
CALIBRATED = ("nf4", "q4_0")                          # the methods activation-aware rounding applies to


def quantize_model(model: nn.Module, method: Method, threshold: float = 6.0, fast: bool = True,
                   return_summary: bool = False, head_bits: Literal[4, 8] = 8,
                   calibration_ids: Optional[list[int]] = None):
    """Replace each nn.Linear of `model` (in place) by its `method` version; returns the model
    (and a QuantSummary when return_summary). The model should be in float32 or bfloat16.
    `calibration_ids` (nf4, q4_0): token ids whose activations weight each block's rounding error
    (`calibrate.calibration_ids(tokenizer)` gives Wikipedia text); None = round to nearest. For
    nf4 they also choose AWQ channel scales, folded into the model's norms and rows (scaling.py)."""
    check_method(method)
    summary = QuantSummary(method)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise UserError("the model has no nn.Linear layers to quantize; pass an lmforge model")
    importance: dict[str, torch.Tensor] = {}
    if calibration_ids is not None:
        if method not in CALIBRATED:
            raise UserError(f"calibration applies to {' and '.join(CALIBRATED)}, not '{method}'; "
                            "leave the calibration out for it")
        from .calibrate import input_importance

        summary.calibration_tokens = len(calibration_ids)
        if method == "nf4":   # AWQ scales folded into the norms and rows before the Linears (scaling.py)
            from .calibrate import nf4_weighted_fake_quant
            from .scaling import fold_input_scales

            moments = input_importance(model, calibration_ids, second_moment=True)
            importance = fold_input_scales(model, moments, nf4_weighted_fake_quant)
        else:
            importance = input_importance(model, calibration_ids)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        before = linear.weight.numel() * linear.weight.element_size()
        try:
            head_int8 = name == "lm_head" and method in FOUR_BIT and head_bits == 8
            replacement = quantize_linear(linear, "int8" if head_int8 else method, threshold, fast,
                                          None if head_int8 else importance.get(name))
        except UserError:
            summary.kept.append(name)
            continue
        replacement.to(linear.weight.device)
        setattr(parent, child, replacement)
        summary.quantized.append(name)
        summary.weight_bytes_before += before
        summary.weight_bytes_after += _stored_bytes(replacement)
    model.quantization = method          # recorded for `lmforge` commands that print what they run
    return (model, summary) if return_summary else model


def saved_quantization(model: nn.Module) -> dict | None:
    """What config.json records of a quantized model (lmforge.model.loading), None if it is not one:
    {"method", "head_bits"} rebuild its layers; "recipe" (calibration, tuning) says how it was made."""
    method = getattr(model, "quantization", None)
    if method is None:
        return None
    if method not in CLI_METHODS:
        raise UserError(f"a model quantized with '{method}' cannot be saved; save one quantized with "
                        f"{', '.join(CLI_METHODS)}")
    from .weight_only import Int8WeightLinear

    head = getattr(model, "lm_head", None)
    head_bits = 8 if method == "int8" or isinstance(head, Int8WeightLinear) else 4
    return {"method": method, "head_bits": head_bits, "recipe": dict(getattr(model, "quantization_recipe", {}))}


def quantized_skeleton(model: nn.Module, saved: dict, where: str) -> nn.Module:
    """`model` (just built, any weights) given the quantized layers that `saved` (config.json's
    "quantization", from saved_quantization) describes, ready for the saved state dict."""
    method = saved.get("method") if isinstance(saved, dict) else None
    if method not in CLI_METHODS:
        raise UserError(f"{where} has quantization method {method!r}; expected one of {', '.join(CLI_METHODS)} "
                        "(re-save the model with lmforge convert --quantize)")
    head_bits = saved.get("head_bits", 8)
    if head_bits not in (4, 8):
        raise UserError(f"{where} has quantization head_bits {head_bits!r}; expected 4 or 8")
    with torch.no_grad():
        for module in model.modules():      # the values are overwritten by the load: skip the random init's
            if isinstance(module, nn.Linear):  # outliers, which take no longer than zeros to quantize
                module.weight.zero_()
        quantize_model(model, method, head_bits=head_bits)
    model.quantization_recipe = dict(saved.get("recipe") or {})
    return model


def load_quantized(model: nn.Module, saved: dict, state: dict[str, torch.Tensor], where: str,
                   weights: str) -> nn.Module:
    """`model` (just built from config.json at `where`) as the quantized model whose tensors `state`
    (read from `weights`) holds: layers rebuilt as `saved` says, every tensor checked, then loaded."""
    model = quantized_skeleton(model, saved, where)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{weights} has a tensor '{name}' that the quantized model in {where} does not have; "
                            "the weights and config.json do not match")
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UserError(f"tensor '{name}' in {weights} is {list(tensor.shape)} {tensor.dtype} but {where} "
                            f"implies {list(expected[name].shape)} {expected[name].dtype}; "
                            "the weights and config.json do not match")
    absent = sorted(set(expected) - set(state))
    if absent:
        raise UserError(f"{weights} lacks the tensor '{absent[0]}' ({len(absent)} missing); "
                        "the file is incomplete or belongs to another model")
    model.load_state_dict(state)
    return model


def quantizing_message(quantize: str | None, calibrate: int, calibration_text: str | None,
                       tune_steps: int) -> str | None:
    """The progress line the CLI prints before a calibrated (slow) quantization; None otherwise."""
    if not (quantize and calibrate):
        return None
    scales = "AWQ channel scales and block scales" if quantize == "nf4" else "block scales"
    tuning = f", then {tune_steps} steps of scale tuning against the float model" if tune_steps else ""
    return (f"quantizing to {quantize}: {scales} weighted by the activations of {calibrate:,} "
            f"'{calibration_text or 'wiki'}' tokens{tuning} ...")


def apply_precision(model: nn.Module, dtype: str | None = None, quantize: str | None = None,
                    calibrate: int = 0, tokenizer=None, calibration_text: str | None = None,
                    tune_steps: int = 0) -> nn.Module:
    """What `--dtype`, `--quantize`, `--calibrate` and `--tune-steps` do to a loaded model: cast the
    float weights to `dtype` (fp32, bf16, fp16), then quantize every Linear with `quantize` (None =
    leave them), nf4 / q4_0 rounding weighted by the activations of `calibrate` tokens (0 = off) of
    `calibration_text` (calibrate.calibration_ids: "wiki", "wiki+chat" or a .txt path; None = wiki),
    then (q4_0, nf4) train the block scales for `tune_steps` steps against the float model on those
    tokens (tune.py; 0 = off)."""
    from .tune import TUNED

    if tune_steps < 0:
        raise UserError(f"--tune-steps {tune_steps} is below 0; use 0 (off) or e.g. 30")
    if tune_steps and (quantize not in TUNED or not calibrate):
        raise UserError(f"--tune-steps trains the scales of --quantize {' or '.join(TUNED)} on the --calibrate "
                        "tokens; add e.g. --quantize q4_0 --calibrate 16384, or leave --tune-steps out")
    if calibrate < 0:
        raise UserError(f"--calibrate {calibrate} is below 0; use 0 (round to nearest) or e.g. 4096 tokens")
    if calibration_text is not None and not calibrate:
        raise UserError(f"--calibration-text {calibration_text} needs --calibrate TOKENS (e.g. --calibrate 4096); "
                        "add it, or leave --calibration-text out")
    if calibrate and quantize not in CALIBRATED:
        raise UserError(f"--calibrate applies to --quantize {' or '.join(CALIBRATED)}; "
                        f"add one of them, or leave --calibrate out")
    if quantize is not None and getattr(model, "quantization", None):
        raise UserError(f"the model is already quantized ({model.quantization}); leave out --quantize "
                        "(and --calibrate, --tune-steps), or load its float version")
    if dtype is not None and dtype != "fp32":
        model = model.to(parse_dtype(dtype))
    if quantize is not None:
        ids = None
        if calibrate:
            from .calibrate import calibration_ids

            if tokenizer is None:
                raise UserError("--calibrate needs the model's tokenizer; pass a model that has one")
            ids = calibration_ids(tokenizer, calibrate, calibration_text or "wiki")
        teacher = copy.deepcopy(model) if tune_steps else None      # the float model, before quantizing
        model = quantize_model(model, check_method(quantize), calibration_ids=ids)
        if teacher is not None:
            from .tune import tune_scales

            tune_scales(model, teacher, ids, steps=tune_steps)
        model.quantization_recipe = {"calibrate": calibrate, "tune_steps": tune_steps,
                                     **({"calibration_text": calibration_text or "wiki"} if calibrate else {})}
    return model
