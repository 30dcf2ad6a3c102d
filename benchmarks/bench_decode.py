"""Decode tokens/s at batch 1: lmforge's Engine vs transformers' `generate`, same weights, greedy.

Two models: a tiny preset GPT (exported to an HF Llama directory with the same weights) and the
bundled SmolLM2-135M-Instruct (transformers reads the same GGUF with `gguf_file=`). Every side
generates exactly --new-tokens tokens (end tokens ignored) from the same prompt; the best of
--repeats runs counts. lmforge runs eagerly and with its compiled decode step (`compile=True`,
whose one-off compile time is reported separately). The greedy tokens are compared too.
The "matmul floor" row is the speed at which one batch-1 pass over every nn.Linear of the model
runs with nothing else (no attention, norms, sampling): no implementation that keeps the same fp32
weights can decode faster than that on this machine. Ends with one JSON line.

    python benchmarks/bench_decode.py [--models tiny,smollm2] [--new-tokens 64] [--threads 1] [--compile-models tiny,smollm2]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")   # transformers' GGUF conversion bar

import torch

PROMPT = "The history of the printing press begins"


def ours_tokens_per_second(model, tokenizer, prompt_ids: list[int], new_tokens: int, repeats: int,
                           compile: bool) -> tuple[float, list[int], float]:
    """(tokens/s, greedy tokens, compile seconds)."""
    from lmforge.infer import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=len(prompt_ids) + new_tokens, compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    best, tokens = float("inf"), []
    for _ in range(repeats + 1):          # the first run warms up
        start = time.perf_counter()
        [result] = engine.generate([prompt_ids], params)
        best = min(best, time.perf_counter() - start)
        tokens = result.token_ids
    return new_tokens / best, tokens, engine.stats.compile_seconds


def matmul_floor_tokens_per_second(model, repeats: int) -> float:
    """Tokens/s of a bare batch-1 pass through every nn.Linear (the weight-streaming ceiling)."""
    weights = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
    inputs = [torch.randn(1, weight.shape[1], dtype=weight.dtype) for weight in weights]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for weight, x in zip(weights, inputs):
                torch.nn.functional.linear(x, weight)
            best = min(best, time.perf_counter() - start)
    return 1.0 / best


def hf_tokens_per_second(hf_model, prompt_ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt_ids])
    best, tokens = float("inf"), []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - start)
            tokens = out[0, len(prompt_ids):].tolist()
    return new_tokens / best, tokens


def tiny_pair(directory: str):
    """A tiny preset GPT with a byte-level tokenizer, and the same weights as an HF Llama."""
    from transformers import AutoModelForCausalLM

    import lmforge
    from lmforge.model.loading import export
    from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer

    torch.manual_seed(0)
    tokenizer = BPETokenizer.from_merges([], special_tokens=DEFAULT_SPECIAL_TOKENS)
    model, _ = lmforge.load("tiny", tokenizer=tokenizer)
    export(model, tokenizer, directory, format="hf")
    return model, tokenizer, AutoModelForCausalLM.from_pretrained(directory).eval()


def smollm2_pair():
    from transformers import AutoModelForCausalLM

    import lmforge
    from lmforge.assets import smollm2_gguf_path

    model, tokenizer = lmforge.load("smollm2-135m-instruct")
    path = smollm2_gguf_path()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        dtype=torch.float32).eval()
    return model, tokenizer, hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (0 = torch's default). 1 by default: on a small or "
                             "shared CPU, intra-op threads make microsecond decode ops wait on each other and the "
                             "timings swing several-fold")
    parser.add_argument("--compile-models", default="tiny,smollm2",
                        help="models also run with the compiled decode step (it pays off where overhead dominates)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, figures = [], {"benchmark": "decode", "batch_size": 1, "new_tokens": args.new_tokens,
                         "threads": torch.get_num_threads()}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as directory:
            model, tokenizer, hf_model = tiny_pair(directory) if name == "tiny" else smollm2_pair()
            prompt_ids = tokenizer.encode(PROMPT)
            hf_speed, hf_tokens = hf_tokens_per_second(hf_model, prompt_ids, args.new_tokens, args.repeats)
            del hf_model
            for compile in (False, True) if name in args.compile_models.split(",") else (False,):
                speed, tokens, compile_seconds = ours_tokens_per_second(model, tokenizer, prompt_ids, args.new_tokens,
                                                                        args.repeats, compile)
                same = sum(a == b for a, b in zip(tokens, hf_tokens))
                label = f"{name}_compiled" if compile else name
                rows.append((name, "compiled" if compile else "eager", speed, hf_speed, same, compile_seconds))
                figures.update({f"{label}_lmforge_tokens_per_s": round(speed, 2),
                                f"{label}_ratio": round(speed / hf_speed, 3),
                                f"{label}_same_greedy_tokens": f"{same}/{args.new_tokens}"})
                if compile:
                    figures[f"{label}_compile_s"] = round(compile_seconds, 1)
            figures[f"{name}_transformers_tokens_per_s"] = round(hf_speed, 2)
            floor = matmul_floor_tokens_per_second(model, args.repeats * 5)
            rows.append((name, "floor", floor, hf_speed, None, 0.0))
            figures[f"{name}_matmul_floor_tokens_per_s"] = round(floor, 2)

    print(f"decode at batch 1, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, best of {args.repeats}")
    print("(floor: a bare batch-1 pass through every nn.Linear, the ceiling for these fp32 weights)")
    print(f"{'model':<9} {'lmforge':<9} {'lmforge tok/s':>13} {'transformers tok/s':>19} {'ratio':>7} "
          f"{'same greedy':>12} {'compile s':>10}")
    for name, mode, speed, hf_speed, same, compile_seconds in rows:
        compiled = f"{compile_seconds:.1f}" if mode == "compiled" else "-"
        same_text = "-" if same is None else f"{same}/{args.new_tokens}"
        print(f"{name:<9} {mode:<9} {speed:>13.1f} {hf_speed:>19.1f} {speed / hf_speed:>6.2f}x "
              f"{same_text:>12} {compiled:>10}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
