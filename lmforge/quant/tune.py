"""Scale tuning: train Q4_0's or NF4's block scales end to end, with the float model as the teacher.

    from lmforge.quant import quantize_model, tune_scales
    teacher = copy.deepcopy(model)                                  # the float model
    quantize_model(model, "q4_0", calibration_ids=ids)              # codes and scales (calibrate.py)
    tune_scales(model, teacher, ids, steps=30)                      # better scales, the same codes

Why. The activation-aware search (calibrate.py) chooses each block's scale for that block's own
weighted rounding error, one Linear at a time. What the model loses is what all those errors
do together at the logits, after passing through every later layer. Scale tuning keeps every
4-bit code as it is and trains all the per-block scales at once (3.3M for SmolLM2) so that the
quantized model's next-token distributions match the float model's on the calibration text:
forward KL(float || quantized), the distillation objective of train/distill.py with
kd_ratio = 1, run by the one Trainer. This is EfficientQAT's end-to-end step "E2E-QP" (Chen et
al. 2024). The format is unchanged: a Q4_0 block still holds 32 codes and one scale, so the fast
kernel and the file layout stay as they are. For NF4 the trained scale is each 64-block's absmax,
double-quantized to 8 bits again after training (so bitsandbytes still reads the result).

Each scale is trained as s = s0 * exp(u), starting from u = 0. Adam's steps are then relative
changes (lr 1e-3 moves a scale by about 0.1% a step), the same for a scale of 1e-3 as for one of
1e-1, and a scale never crosses zero (which would flip every weight of its block).

While tuning, the weights are dequantized in each forward (autograd needs the float weight; the
packed kernels have no backward), and the int8 output layer runs its readable path too. On 2 CPU
cores one step of 4 x 256 tokens takes ~10 s for SmolLM2-135M; 30 steps take Q4_0 from +8.5% to
+6.1% in held-out perplexity (docs/LOG.md, session 22).
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .nf4 import NF4Linear, nf4_code, quantize_nf4, unpack_nf4
from .weight_only import Int8WeightLinear, Q4Linear, unpack_nibbles

TUNED = ("q4_0", "nf4")                 # the methods whose scales tune_scales trains
TUNE_STEPS_HELP = ("with --quantize q4_0 or nf4 and --calibrate TOKENS: then train the block scales for STEPS "
                   "steps (4 x 256 tokens each) so the quantized model's predictions match the float model's on "
                   "those tokens; the codes stay (SmolLM2 on 2 cores: ~10 s a step; e.g. 30; 0 = off)")


class TunableQ4Linear(nn.Module):
    """A Q4Linear whose block scales train: W = levels * s0 * exp(log_gain) (+ zero), per block.

    levels: the fixed codes - 8, float [out, in] (not saved); log_gain: [out, in/group], the
    only parameter. `tuned()` gives back a Q4Linear with the trained scales."""

    def __init__(self, layer: Q4Linear):
        super().__init__()
        self.layer = layer
        self.register_buffer("levels", unpack_nibbles(layer.weight_q4).float() - 8, persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(layer.scales))

    def scales(self) -> torch.Tensor:
        return self.layer.scales * self.log_gain.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        out_features, in_features = self.levels.shape
        blocks = self.levels.view(out_features, -1, self.layer.group)
        weight = blocks * self.scales().unsqueeze(2) + self.layer.zeros.unsqueeze(2)
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, weight.view(out_features, in_features).to(x.dtype), bias)

    def tuned(self) -> Q4Linear:
        zeros = self.layer.zeros if self.layer.zeros.any() else None
        codes = (self.levels + 8).to(torch.uint8)
        return Q4Linear(codes, self.scales().detach(), zeros, self.layer.bias, self.layer.fast)


class TunableNF4Linear(nn.Module):
    """An NF4Linear whose block absmax trains: W = code[idx] * absmax0 * exp(log_gain) per block of
    64 (over the flattened weight, as NF4 stores it). `tuned()` quantizes the trained weight again
    with the trained absmax as its scales: the codes come back unchanged (each value is exactly a
    level), and the new absmax is double-quantized to 8 bits as before."""

    def __init__(self, layer: NF4Linear):
        super().__init__()
        self.layer = layer
        q = layer.qweight
        levels = nf4_code().to(q.data.device)[unpack_nf4(q).long()]
        pad = -levels.numel() % q.blocksize
        self.register_buffer("levels", F.pad(levels, (0, pad)).view(-1, q.blocksize), persistent=False)
        self.register_buffer("absmax0", q.block_absmax().float(), persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(self.absmax0))

    def scales(self) -> torch.Tensor:
        return self.absmax0 * self.log_gain.exp()

    def weight(self) -> torch.Tensor:
        out_features, in_features = self.layer.out_features, self.layer.in_features
        flat = (self.levels * self.scales().unsqueeze(1)).view(-1)
        return flat[: out_features * in_features].view(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def tuned(self) -> NF4Linear:
        q = self.layer.qweight
        with torch.no_grad():
            quantized = quantize_nf4(self.weight(), q.blocksize, q.double_quant, scale=self.scales())
        quantized.dtype = q.dtype
        return NF4Linear(quantized, self.layer.bias)


TUNABLE = {Q4Linear: TunableQ4Linear, NF4Linear: TunableNF4Linear}


class CalibrationWindows:
    """The Trainer's batch source: `batch_size` random windows of `window` tokens of `ids` per
    micro-batch, as a next-token batch (labels = the following token; the last one unlabelled).
    Seeded, and resumable by the number of batches drawn."""

    def __init__(self, ids: list[int], window: int, batch_size: int, seed: int = 0):
        rows = len(ids) // (window + 1)
        if rows < 1:
            raise UserError(f"{len(ids)} calibration tokens are fewer than one window of {window + 1}; "
                            "calibrate on more tokens (e.g. --calibrate 4096)")
        self.rows = torch.tensor(ids[: rows * (window + 1)]).view(rows, window + 1)
        self.batch_size, self.seed, self.drawn = batch_size, seed, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        self.drawn += 1
        rows = self.rows[torch.randint(0, self.rows.shape[0], (self.batch_size,), generator=generator)]
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:],
                "attention_mask": torch.ones_like(rows[:, :-1])}

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


def _swap(model: nn.Module, kind: type, make) -> int:
    """Replace every `kind` module of `model` by make(module); returns how many."""
    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, kind)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(module))
    return len(swaps)


def tune_scales(model: nn.Module, teacher: nn.Module, ids: list[int], steps: int = 30, lr: float = 1e-3,
                batch_size: int = 4, window: int = 256, seed: int = 0, progress: bool = True) -> list[float]:
    """Train the block scales of `model`'s Q4_0 / NF4 layers (in place) so that its next-token
    distributions match `teacher`'s (the float model it was quantized from) on `ids`; the codes
    stay. The Trainer freezes `teacher` in place (eval mode, no grads), as it does every frozen
    model. Returns the KL per token at each logged step (the first step's first)."""
    from ..track.progress import TrainProgress
    from ..train.config import TrainConfig
    from ..train.distill import DistillConfig, DistillObjective
    from ..train.loop import Trainer

    if steps < 1:
        raise UserError(f"scale tuning steps {steps} is below 1; use e.g. 30, or leave tuning out")
    if getattr(model, "quantization", None) not in TUNED:
        raise UserError(f"scale tuning applies to a model quantized with {' or '.join(TUNED)}, not "
                        f"'{getattr(model, 'quantization', None)}'; quantize with {' or '.join(TUNED)} first")
    window = min(window, model.config.max_seq_len)
    batches = CalibrationWindows(ids, window, batch_size, seed)
    was_training = model.training
    heads = [module for module in model.modules() if isinstance(module, Int8WeightLinear)]
    fast_heads = [module.fast for module in heads]
    for module in heads:
        module.fast = False                  # the int8 kernel has no backward; its readable path does
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    for kind, tunable in TUNABLE.items():
        _swap(model, kind, tunable)
    device = next(model.parameters()).device
    config = TrainConfig(name="tune-scales", device=str(device), batch_size=batch_size, max_steps=steps, lr=lr,
                         min_lr=0.0, beta2=0.999, weight_decay=0.0, grad_clip=0.0, warmup_steps=0,
                         schedule="cosine", precision="fp32", log_interval=1, eval_interval=steps + 1,
                         checkpoint_interval=steps + 1, seed=seed, progress=progress)
    objective = DistillObjective(DistillConfig(teacher="the float model", loss="forward_kl", kd_ratio=1.0),
                                 tokenizer=None, seq_len=window)
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge-tune-") as run_dir:
            trainer = Trainer(model, objective, batches, config, run_dir=run_dir,
                              frozen_models={"teacher": teacher},
                              progress=TrainProgress(total_steps=steps, every=5, enabled=progress),
                              export_state=lambda raw: {name: p.detach() for name, p in raw.named_parameters()
                                                        if p.requires_grad})
            result = trainer.fit()
    finally:
        for tunable in TUNABLE.values():
            _swap(model, tunable, lambda module: module.tuned())
        for module, fast in zip(heads, fast_heads):
            module.fast = fast
        for param in frozen:
            param.requires_grad_(True)
        model.train(was_training)
    return [row["kd"] for row in result.history if "kd" in row]
