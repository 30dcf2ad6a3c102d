"""`lmforge convert REF --to DIR [--format lmforge|hf]`: save any loadable model in our format or HF's."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..errors import UserError

EXAMPLE = "lmforge convert smollm2-135m-instruct --to artifacts/smollm2-hf --format hf"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Load a model (run/checkpoint directory, HF directory, .gguf file, bundled model or preset) "
                          "and write it as an lmforge model directory or a Hugging Face directory that "
                          "transformers.AutoModelFor*.from_pretrained and AutoTokenizer load.")
    parser.epilog = f"example:\n  {EXAMPLE}\n  lmforge convert runs/shakespeare-gpt --to artifacts/shakespeare-gpt"
    parser.add_argument("ref", help="the model to convert (anything `lmforge.load` accepts)")
    parser.add_argument("--to", required=True, metavar="DIR", help="output directory (replaced atomically)")
    parser.add_argument("--format", choices=("lmforge", "hf"), default="lmforge",
                        help="lmforge: config.json + model.safetensors + tokenizer/; "
                             "hf: transformers config.json + model.safetensors + tokenizer files")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: the model's own)")
    parser.add_argument("--merge-adapter", default=None, metavar="DIR",
                        help="merge a LoRA adapter in PEFT's format into the weights before saving")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .info import count_parameters
    from ..io import ensure_writable_dir
    from .loading import export, load, locate

    source = locate(args.ref)
    ensure_writable_dir(Path(args.to).parent, option="--to")   # before loading a model that may take a while
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model, tokenizer = load(args.ref, dtype=args.dtype, tokenizer=args.tokenizer)
    if args.merge_adapter:
        from ..infer.commands import merge_adapter

        model = merge_adapter(model, args.merge_adapter)
        if hasattr(model, "prompt_encoder"):
            raise UserError(f"'{args.merge_adapter}' is a prompt-learning adapter, which has no weights to merge "
                            "into; use it with generate/chat/serve --adapter instead")
    if args.format == "hf":
        from .hf import hf_family_for

        architecture, _ = hf_family_for(model.config)
        target = f"Hugging Face {architecture}"
    else:
        target = "lmforge"
    directory = export(model, tokenizer, args.to, args.format)
    parameters = count_parameters(model.config).total
    print(f"{source.description} -> {target} directory '{directory}' "
          f"({parameters / 1e6:.1f} M parameters, {args.dtype}"
          f"{', with tokenizer' if tokenizer is not None else ', no tokenizer'})")
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"note: {warning.message}")
    return 0
