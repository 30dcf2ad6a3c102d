"""lmforge.quant: quantization from scratch: NF4 (QLoRA), LLM.int8(), weight-only int8 / Q4_0.

    from lmforge.quant import quantize_nf4, dequantize_nf4, NF4Linear
    q = quantize_nf4(linear.weight)            # NF4Tensor: packed uint8, absmax (double-quantized)
    layer = NF4Linear.from_linear(linear)      # frozen 4-bit weight, dequantized in forward
    layer = Int8Linear.from_linear(linear)     # LLM.int8(): int8 x int8 + fp outlier columns
    model = quantize_model(model, "q4_0")      # int8 | llm-int8 | nf4 | q4_0, every nn.Linear
    model = quantize_model(model, "q4_0", calibration_ids=calibration_ids(tokenizer))  # activation-aware
    tune_scales(model, float_model, ids, steps=30)   # then train the q4_0 block scales (KL to the float model)

Names are imported on first use, so importing lmforge.quant does not load torch.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "NF4Tensor": "lmforge.quant.nf4",
    "NF4Linear": "lmforge.quant.nf4",
    "quantize_nf4": "lmforge.quant.nf4",
    "dequantize_nf4": "lmforge.quant.nf4",
    "unpack_nf4": "lmforge.quant.nf4",
    "nf4_code": "lmforge.quant.nf4",
    "dynamic_code": "lmforge.quant.nf4",
    "Int8Linear": "lmforge.quant.int8",
    "Int8WeightLinear": "lmforge.quant.weight_only",
    "Q4Linear": "lmforge.quant.weight_only",
    "quantize_model": "lmforge.quant.quantize",
    "calibration_ids": "lmforge.quant.calibrate",
    "tune_scales": "lmforge.quant.tune",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
