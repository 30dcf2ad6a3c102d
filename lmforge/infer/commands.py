"""`lmforge generate`: text from a prompt, streamed as it is generated.

The sampling and model flags defined here are shared by `lmforge chat` and `lmforge serve`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import HelpFormatter
from ..errors import UserError
from ..quant.calibrate import CALIBRATION_TEXT_HELP
from ..quant.tune import TUNE_STEPS_HELP


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="REF",
                        help="a run/checkpoint dir, an HF dir, a .gguf file, a preset, or smollm2-135m-instruct")
    parser.add_argument("--adapter", action="append", default=None, metavar="DIR",
                        help="a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), "
                             "merged into the model once at load time. lmforge serve also takes NAME=DIR, "
                             "repeatable: each adapter is served unmerged under model id NAME, and requests for "
                             "different adapters (and the base) decode in one batch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; small models on a busy machine are often fastest with 1")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (faster for small models; compiling takes a while)")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                        help="greedy requests: draft N tokens per step from the text so far and keep those the "
                             "model's own argmax agrees with (exactly greedy's output, fewer forwards; 0 = off; "
                             "not with --compile)")
    parser.add_argument("--quantize", choices=["int8", "nf4", "q4_0", "q4_1"], default=None,
                        help="quantize the weights at load time: int8 (per channel), nf4 (QLoRA's 4-bit), q4_0 or "
                             "q4_1 (llama.cpp's 4-bit); int8, q4_0 and q4_1 decode faster on a CPU (lmforge.quant)")
    parser.add_argument("--calibrate", type=int, default=0, metavar="TOKENS",
                        help="with --quantize q4_0 or nf4: pick each block's scale by the rounding error weighted "
                             "by the activations of TOKENS tokens of --calibration-text; nf4 also folds AWQ "
                             "channel scales into the norms first (e.g. 4096; SmolLM2 on 2 cores: ~30 s for "
                             "q4_0, ~2 min for nf4; 0 = round to nearest)")
    parser.add_argument("--calibration-text", default=None, metavar="TEXT",
                        help=CALIBRATION_TEXT_HELP + " (default wiki)")
    parser.add_argument("--tune-steps", type=int, default=0, metavar="STEPS", help=TUNE_STEPS_HELP)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="float precision of the weights and activations (bf16 halves the bytes read per token; "
                             "on CPUs without AVX512-BF16/AMX it is emulated)")
    parser.add_argument("--context-policy", choices=["truncate_left", "error"], default="truncate_left",
                        help="a prompt too long for the context (with the tokens to generate): drop its oldest tokens, or refuse")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.7, top_p: float = 0.9) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass (1 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x p(top token)")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None)


def add_tool_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tools")
    group.add_argument("--tools", default=None, metavar="NAMES",
                       help="let the model call tools while it writes, Toolformer's '[calculator(2+3)→ 5]' markup "
                            "(comma-separated: calculator, retrieval)")
    group.add_argument("--tool-index", default=None, metavar="DIR",
                       help="the RAG index the retrieval tool searches (from `lmforge rag index`)")


def tools_from_args(args: argparse.Namespace) -> Any:
    """The ToolRegistry that --tools asks for, or None."""
    if not getattr(args, "tools", None):
        return None
    from .tools import ToolRegistry

    return ToolRegistry.builtin(args.tools, getattr(args, "tool_index", None) or getattr(args, "rag", None))


def sampling_from_args(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          stop=list(args.stop), seed=args.seed).validate()


def model_name(ref: str) -> str:
    """The id a model is served under: the REF's last path part, without a .gguf suffix."""
    name = Path(ref.rstrip("/")).name or ref
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def load_engine(args: argparse.Namespace, max_batch_size: int = 16, max_seq_len: int | None = None,
                several: bool = False) -> Any:
    """Load `--model` onto `--device` and wrap it in an Engine.

    `args` needs model, device and context_policy; threads and compile are optional (other
    commands, e.g. `lmforge web`, reuse this without those flags). `several`: NAME=DIR adapters
    are loaded side by side, one chosen per request (lmforge serve).
    """
    import torch

    from ..device import pick_device
    from ..model.loading import load
    from .engine import Engine

    device = pick_device(args.device, supported=("cpu", "cuda", "mps"))
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads} is below 1; use 1 or more, or leave it out")
        torch.set_num_threads(threads)
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size {max_batch_size} is below 1; use 1 or more")
    if (getattr(args, "prompt_lookup", 0) or 0) < 0:
        raise UserError(f"--prompt-lookup {args.prompt_lookup} is below 0; use 0 (off) or a few tokens, e.g. 4")
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max-seq-len {max_seq_len} is below 1; use a positive context length, or leave it out")
    model, tokenizer = load(args.model, device=device)
    model = add_adapters(model, getattr(args, "adapter", None), several)
    if tokenizer is None:
        raise UserError(f"model '{args.model}' has no tokenizer (a preset has random weights and none); "
                        "pass a trained model directory, a run, an HF directory or a .gguf file")
    calibrate = getattr(args, "calibrate", 0) or 0
    calibration_text = getattr(args, "calibration_text", None)
    tune_steps = getattr(args, "tune_steps", 0) or 0
    precision_asked = getattr(args, "quantize", None) or getattr(args, "dtype", "fp32") != "fp32"
    if precision_asked or calibrate or calibration_text is not None or tune_steps:
        from ..quant.quantize import apply_precision, quantizing_message

        message = quantizing_message(getattr(args, "quantize", None), calibrate, calibration_text, tune_steps)
        if message:
            print(message, file=sys.stderr, flush=True)
        model = apply_precision(model, getattr(args, "dtype", "fp32"), getattr(args, "quantize", None),
                                calibrate=calibrate, tokenizer=tokenizer,
                                calibration_text=calibration_text, tune_steps=tune_steps)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, context_policy=args.context_policy,
                  max_seq_len=max_seq_len, compile=getattr(args, "compile", False),
                  prompt_lookup=getattr(args, "prompt_lookup", 0) or 0)


def add_adapters(model: Any, values: list[str] | str | None, several: bool) -> Any:
    """The `--adapter` values applied: one bare DIR is merged in; NAME=DIR entries (`several`:
    lmforge serve) are loaded unmerged, one per request (lmforge/peft/multi_lora.py)."""
    from ..peft.multi_lora import load_adapters, parse_adapter_arguments

    adapters = parse_adapter_arguments(values)
    if not adapters:
        return model
    if len(adapters) == 1 and (adapters[0][0] is None or not several):
        return merge_adapter(model, adapters[0][1])
    if not several:
        raise UserError(f"--adapter was given {len(adapters)} times, but this command runs one model; serve "
                        "several adapters with lmforge serve --adapter NAME=DIR ..., or pass one --adapter")
    unnamed = [directory for name, directory in adapters if name is None]
    if unnamed:
        raise UserError(f"--adapter '{unnamed[0]}' has no name; with several adapters give each as NAME=DIR "
                        "(the model id that requests use)")
    return load_adapters(model, {name: directory for name, directory in adapters}).eval()


def merge_adapter(model: Any, adapter_dir: str) -> Any:
    """`model` with a PEFT-format LoRA adapter merged in: a plain model again, so decoding costs
    nothing extra (and the compiled decode step sees ordinary linear layers). A prompt-learning
    adapter (prompt/prefix/P-tuning) cannot be merged: the model comes back wrapped, its KV cache
    rows starting with the prompt's keys and values (lmforge/peft/prompt.py)."""
    from ..peft.adapter_format import load_adapter
    from ..peft.prompt import is_prompt_adapter, load_prompt_adapter

    if is_prompt_adapter(adapter_dir):
        return load_prompt_adapter(model, adapter_dir).eval()
    from ..peft.lora import unload_lora

    return unload_lora(load_adapter(model, adapter_dir), merge=True).eval()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Generate text from a prompt. One prompt streams as it is generated; several "
                          "--prompt flags are generated together in one batch.")
    parser.formatter_class = HelpFormatter
    parser.epilog = ('example:\n  lmforge generate --model smollm2-135m-instruct --chat '
                     '--prompt "Write a haiku about the sea." --max-new-tokens 40 --seed 0')
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="the prompt (repeat for a batch)")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, help="system prompt (with --chat)")
    parser.add_argument("--stats", action="store_true", help="print tokens, speed and finish reason to stderr")
    add_sampling_arguments(parser)
    add_tool_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .chat import render_chat_ids

    params = sampling_from_args(args)
    tools = tools_from_args(args)
    engine = load_engine(args, max_batch_size=len(args.prompt))
    prompts = list(args.prompt)
    if tools is not None:
        return _run_with_tools(args, engine, tools, params)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [render_chat_ids(engine.tokenizer, system + [{"role": "user", "content": p}],
                                   add_generation_prompt=True)[0] for p in prompts]
    start = time.perf_counter()
    if len(prompts) == 1:
        sequence = engine.submit(prompts[0], params)
        for piece in engine.stream_sequence(sequence):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        results = [sequence.result()]
    else:
        results = engine.generate(prompts, params)
        for index, result in enumerate(results):
            print(f"--- [{index}] {args.prompt[index]!r}")
            print(result.text)
    if args.stats:
        seconds = time.perf_counter() - start
        tokens = sum(r.completion_tokens for r in results)
        reasons = ", ".join(r.finish_reason for r in results)
        drafts = engine.stats
        lookup = (f"; prompt lookup kept {drafts.accepted_draft_tokens} of {drafts.draft_tokens} drafted tokens"
                  if drafts.draft_tokens else "")
        print(f"[{tokens} tokens in {seconds:.2f}s, {tokens / seconds:.1f} tokens/s; finish: {reasons}{lookup}]",
              file=sys.stderr)
    return 0


def _run_with_tools(args: argparse.Namespace, engine: Any, tools: Any, params: Any) -> int:
    """generate --tools: each prompt through the tool loop (lmforge.infer.tools); calls listed on stderr."""
    from .chat import render_chat_ids
    from .tools import ToolLoop

    loop = ToolLoop(engine, tools)
    prompts: list = list(args.prompt)
    if args.chat:   # the tools are described in the system prompt
        system = "\n\n".join(part for part in (args.system, tools.describe()) if part)
        prompts = [render_chat_ids(engine.tokenizer, [{"role": "system", "content": system},
                                                      {"role": "user", "content": p}], add_generation_prompt=True)[0]
                   for p in prompts]
    if len(prompts) == 1:
        for piece in loop.stream(prompts[0], params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        results = [loop.last]
    else:
        results = loop.generate(prompts, params)
        for index, result in enumerate(results):
            print(f"--- [{index}] {args.prompt[index]!r}")
            print(result.text)
    for index, result in enumerate(results):
        for call in result.calls:
            print(f"[tool {index}: {call.raw}) -> {call.result if call.error is None else 'error: ' + call.error}]",
                  file=sys.stderr)
    return 0
