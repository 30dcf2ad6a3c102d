"""Quantized decode on SmolLM2-135M-Instruct: batch-1 decode tokens/s and held-out perplexity per
method, against transformers fp32 and transformers' best CPU option, in the same run.

lmforge: fp32, bf16 (--dtype bf16), weight-only int8, Q4_0, Q4_1 and NF4 (--quantize), Q4_0 and NF4
with activation-aware rounding (q4_0-cal / nf4-cal: --calibrate N), Q4_0 with its scales then tuned
against the float model (q4_0-tuned: --calibrate N --tune-steps K), eager or with the
compiled decode step (--compile). transformers reads the same GGUF; its options: fp32, bf16, and
torch.compile of the fp32 model (--hf-compile, its static cache). Every side generates exactly
--new-tokens greedy tokens from the same prompt; best of --repeats. Perplexity: the held-out
Shakespeare play (lmforge.quant.lab), --ppl-tokens tokens in windows of 256. Targets (issue 11):
decode >= 2.5x transformers fp32 and >= 1.5x transformers' best; perplexity within 2% of fp32
for int8 and 8% for 4-bit. Ends with one JSON line.

    python benchmarks/bench_quant.py [--methods fp32,bf16,int8,q4_0,q4_0-cal,q4_1,nf4,nf4-cal,q4_0-tuned]
                                     [--compile] [--hf-compile] [--calibrate 4096] [--calibration-text wiki]
                                     [--tune-steps 30]
                                     [--new-tokens 32] [--ppl-tokens 1025] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

PROMPT = "The history of the printing press begins"


def cpu_name() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in info.splitlines() if line.startswith("Flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def ours_decode(model, tokenizer, prompt_ids, new_tokens, repeats, compile) -> tuple[float, float]:
    from lmforge.infer import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=len(prompt_ids) + new_tokens, compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0)
    best = float("inf")
    for _ in range(repeats + 1):          # the first run warms up
        start = time.perf_counter()
        engine.generate([prompt_ids], params)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best, engine.stats.compile_seconds


def hf_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lmforge.assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def hf_decode(model, prompt_ids, new_tokens, repeats, compile: bool = False) -> float:
    ids = torch.tensor([prompt_ids])
    extra = {"cache_implementation": "static"} if compile else {}
    if compile:
        model.forward = torch.compile(model.forward, dynamic=False)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="fp32,bf16,int8,q4_0,q4_0-cal,q4_1,nf4,nf4-cal")
    parser.add_argument("--compile", action="store_true", help="also run lmforge's compiled decode step")
    parser.add_argument("--hf-compile", action="store_true", help="also run transformers with torch.compile")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=1025, help="0 = skip perplexity (lmforge quantize reports it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", type=int, default=4096,
                        help="tokens of --calibration-text for the -cal methods (activation-aware rounding)")
    parser.add_argument("--tune-steps", type=int, default=30,
                        help="scale-tuning steps of the -tuned methods (q4_0-tuned: q4_0-cal, then lmforge.quant.tune)")
    parser.add_argument("--calibration-text", default="wiki",
                        help="wiki, wiki+chat or a .txt path (calibrate.calibration_ids)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lmforge
    from lmforge.quant.lab import heldout_shakespeare_ids, perplexity
    from lmforge.quant.quantize import apply_precision

    base, tokenizer = lmforge.load("smollm2-135m-instruct")
    prompt_ids = tokenizer.encode(PROMPT)
    ppl_ids = heldout_shakespeare_ids(tokenizer, args.ppl_tokens) if args.ppl_tokens else []
    figures = {"benchmark": "quant", "model": "smollm2-135m-instruct", "cpu": cpu_name(), "batch_size": 1,
               "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    rows = []                                         # (side, method, mode, tok/s, ppl)

    hf = hf_model(torch.float32)
    hf_fp32 = hf_decode(hf, prompt_ids, args.new_tokens, args.repeats)
    rows.append(("transformers", "fp32", "eager", hf_fp32, None))
    hf_options = {"fp32": hf_fp32}
    if args.hf_compile:
        hf_options["fp32+compile"] = hf_decode(hf, prompt_ids, args.new_tokens, args.repeats, compile=True)
        rows.append(("transformers", "fp32", "compiled", hf_options["fp32+compile"], None))
    del hf
    hf = hf_model(torch.bfloat16)
    hf_options["bf16"] = hf_decode(hf, prompt_ids, args.new_tokens, args.repeats)
    rows.append(("transformers", "bf16", "eager", hf_options["bf16"], None))
    del hf
    print(f"[transformers: {hf_options}]", file=sys.stderr, flush=True)
    hf_best_name = max(hf_options, key=hf_options.get)
    hf_best = hf_options[hf_best_name]

    ppl_fp32 = None
    for method in args.methods.split(","):
        model = lmforge.load("smollm2-135m-instruct")[0] if method != "fp32" else base
        dtype = "bf16" if method == "bf16" else "fp32"
        # q4_0-cal: --quantize q4_0 --calibrate N; q4_0-tuned: the same, then --tune-steps K
        calibrate = args.calibrate if method.endswith(("-cal", "-tuned")) else 0
        tune_steps = args.tune_steps if method.endswith("-tuned") else 0
        start = time.perf_counter()
        quantize = None if method in ("fp32", "bf16") else method.removesuffix("-cal").removesuffix("-tuned")
        model = apply_precision(model, dtype, quantize, calibrate=calibrate, tokenizer=tokenizer,
                                calibration_text=args.calibration_text if calibrate else None, tune_steps=tune_steps)
        if tune_steps:
            figures["tune_steps"] = tune_steps
        if calibrate:
            figures[f"{method}_quantize_s"] = round(time.perf_counter() - start, 1)
            figures["calibration_tokens"] = calibrate
            figures["calibration_text"] = args.calibration_text
        ppl = perplexity(model, ppl_ids) if ppl_ids else float("nan")
        ppl_fp32 = ppl if method == "fp32" and ppl_ids else ppl_fp32
        for compile in (False, True) if args.compile and not method.startswith("nf4") else (False,):
            speed, compile_s = ours_decode(model, tokenizer, prompt_ids, args.new_tokens, args.repeats, compile)
            mode = "compiled" if compile else "eager"
            rows.append(("lmforge", method, mode, speed, ppl))
            print(f"[{method} {mode}: {speed:.2f} tok/s, perplexity {ppl:.3f}]", file=sys.stderr, flush=True)
            key = f"{method}_{mode}"
            figures[f"{key}_tokens_per_s"] = round(speed, 2)
            figures[f"{key}_vs_hf_fp32"] = round(speed / hf_fp32, 3)
            figures[f"{key}_vs_hf_best"] = round(speed / hf_best, 3)
        figures[f"{method}_ppl"] = round(ppl, 3) if ppl_ids else None
        if ppl_fp32 is not None:
            figures[f"{method}_ppl_vs_fp32"] = round(ppl / ppl_fp32, 4)
        del model

    figures.update({"transformers_fp32_tokens_per_s": round(hf_fp32, 2), "transformers_best": hf_best_name,
                    "transformers_best_tokens_per_s": round(hf_best, 2)})
    print(f"SmolLM2-135M-Instruct decode at batch 1, {args.new_tokens} new tokens, {args.threads} thread(s), "
          f"best of {args.repeats}; CPU: {figures['cpu']}")
    print(f"perplexity: held-out Shakespeare, {len(ppl_ids)} tokens")
    print(f"{'side':<13} {'method':<10} {'mode':<9} {'tok/s':>7} {'vs hf fp32':>11} {'vs hf best':>11} "
          f"{'ppl':>8} {'ppl/fp32':>9}")
    for side, method, mode, speed, ppl in rows:
        ppl_text = "-" if ppl is None else f"{ppl:.2f}"
        ratio = "-" if ppl is None or ppl_fp32 is None else f"{ppl / ppl_fp32:.4f}"
        print(f"{side:<13} {method:<10} {mode:<9} {speed:>7.2f} {speed / hf_fp32:>10.2f}x {speed / hf_best:>10.2f}x "
              f"{ppl_text:>8} {ratio:>9}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
