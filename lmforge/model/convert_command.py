"""`lmforge convert REF --to DIR [--format lmforge|hf]`: save any loadable model in our format or HF's."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import UserError
from ..quant.calibrate import CALIBRATION_TEXT_HELP
from ..quant.quantize import CLI_METHODS
from ..quant.tune import TUNE_STEPS_HELP

EXAMPLE = "lmforge convert smollm2-135m-instruct --to artifacts/smollm2-hf --format hf"
QUANT_EXAMPLE = ("lmforge convert smollm2-135m-instruct --to artifacts/smollm2-q4_0 --quantize q4_0 --calibrate 16384 "
                 "--calibration-text wiki+chat --tune-steps 30")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Load a model (run/checkpoint directory, HF directory, .gguf file, bundled model or preset) "
                          "and write it as an lmforge model directory or a Hugging Face directory that "
                          "transformers.AutoModelFor*.from_pretrained and AutoTokenizer load.")
    parser.epilog = (f"example:\n  {EXAMPLE}\n  lmforge convert runs/shakespeare-gpt --to artifacts/shakespeare-gpt"
                     f"\n  {QUANT_EXAMPLE}")
    parser.add_argument("ref", help="the model to convert (anything `lmforge.load` accepts)")
    parser.add_argument("--to", required=True, metavar="DIR", help="output directory (replaced atomically)")
    parser.add_argument("--format", choices=("lmforge", "hf"), default="lmforge",
                        help="lmforge: config.json + model.safetensors + tokenizer/; "
                             "hf: transformers config.json + model.safetensors + tokenizer files")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: the model's own)")
    parser.add_argument("--merge-adapter", default=None, metavar="DIR",
                        help="merge a LoRA adapter in PEFT's format into the weights before saving")
    quant = parser.add_argument_group("quantized models (lmforge format; generate/chat/serve --model DIR load them "
                                      "without quantizing again)")
    quant.add_argument("--quantize", choices=CLI_METHODS, default=None,
                       help="save the weights quantized: int8, nf4, q4_0 or q4_1 (lmforge.quant)")
    quant.add_argument("--calibrate", type=int, default=0, metavar="TOKENS",
                       help="with --quantize q4_0 or nf4: activation-aware rounding on TOKENS tokens (as generate's)")
    quant.add_argument("--calibration-text", default=None, metavar="TEXT",
                       help=CALIBRATION_TEXT_HELP + " (default wiki)")
    quant.add_argument("--tune-steps", type=int, default=0, metavar="STEPS", help=TUNE_STEPS_HELP)
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .info import count_parameters
    from ..io import ensure_writable_dir
    from .loading import export, load, locate

    source = locate(args.ref)
    ensure_writable_dir(Path(args.to).parent, option="--to")   # before loading a model that may take a while
    quantized = args.quantize or args.calibrate or args.calibration_text is not None or args.tune_steps
    if quantized and args.format == "hf":
        raise UserError("--quantize saves in the lmforge format only (transformers has no reader for these "
                        "layers); use --format lmforge")
    if quantized and args.dtype != "fp32":
        raise UserError("--quantize keeps the float parts in fp32; leave out --dtype")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model, tokenizer = load(args.ref, dtype=args.dtype, tokenizer=args.tokenizer)
    if args.merge_adapter:
        from ..infer.commands import merge_adapter

        model = merge_adapter(model, args.merge_adapter)
        if hasattr(model, "prompt_encoder"):
            raise UserError(f"'{args.merge_adapter}' is a prompt-learning adapter, which has no weights to merge "
                            "into; use it with generate/chat/serve --adapter instead")
    if quantized:
        from ..quant.quantize import apply_precision, quantizing_message

        message = quantizing_message(args.quantize, args.calibrate, args.calibration_text, args.tune_steps)
        if message:
            print(message, file=sys.stderr, flush=True)
        model = apply_precision(model, None, args.quantize, calibrate=args.calibrate, tokenizer=tokenizer,
                                calibration_text=args.calibration_text, tune_steps=args.tune_steps)
    if args.format == "hf":
        from .hf import hf_family_for

        architecture, _ = hf_family_for(model.config)
        target = f"Hugging Face {architecture}"
    else:
        target = "lmforge" + (f" ({args.quantize})" if args.quantize else "")
    directory = export(model, tokenizer, args.to, args.format)
    parameters = count_parameters(model.config).total
    print(f"{source.description} -> {target} directory '{directory}' "
          f"({parameters / 1e6:.1f} M parameters, {args.dtype}"
          f"{', with tokenizer' if tokenizer is not None else ', no tokenizer'})")
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"note: {warning.message}")
    return 0
