"""Several LoRA adapters served from one SmolLM2-135M-Instruct, requests for all of them in one batch
(`lmforge serve --adapter NAME=DIR ...`), against PEFT's mixed-batch generation (`adapter_names=`)
on transformers, in the same run.

--adapters adapters (rank --rank on every linear layer, random B so each one changes the model) get
--prompts requests each. Every side decodes --new-tokens greedy tokens per request; best of
--repeats. lmforge runs three ways:
  mixed      one engine, the adapters unmerged, every request in one batch (multi_lora.py)
  merged     one merged model per adapter, its requests batched, the adapters one after another
             (what serving several adapters costs without per-row adapters)
  base       the base model alone on the same requests: the floor the adapters add to
The greedy tokens of `mixed` are compared with each adapter merged alone and with PEFT's.

    python benchmarks/bench_multi_lora.py [--adapters 4] [--prompts 4] [--rank 16] [--new-tokens 32]
                                          [--repeats 2] [--threads 2] [--compile]
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

PROMPTS = ["The history of the printing press begins", "Write a short poem about the sea.",
           "Explain photosynthesis to a child.", "List three uses of copper:", "The capital of France is",
           "Once upon a time, in a small village,", "def fibonacci(n):", "The best way to learn a language is"]


def make_adapters(base, count: int, rank: int, root: str) -> dict[str, str]:
    from lmforge.peft import LoRAConfig, apply_lora, save_adapter

    directories = {}
    for index in range(count):
        model = copy.deepcopy(base)
        apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank, target_modules=["all-linear"]))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        directories[f"adapter{index}"] = str(save_adapter(model, os.path.join(root, f"adapter{index}")))
        del model
    return directories


def timed(run, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats + 1):                  # the first run warms up
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def ours(model, tokenizer, requests, new_tokens: int, repeats: int, compile: bool) -> tuple[float, list[list[int]]]:
    from lmforge.infer import Engine, SamplingParams

    # The compiled step attends over the whole cache, so the context is what these requests need.
    context = max(len(ids) for ids, _ in requests) + new_tokens
    engine = Engine(model, tokenizer, max_batch_size=len(requests), max_seq_len=context, compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0)

    def run():
        sequences = [engine.submit(ids, params, adapter=adapter) for ids, adapter in requests]
        while not all(s.finished for s in sequences):
            engine.step()
        return [s.token_ids for s in sequences]

    return timed(run, repeats)


def peft_mixed(directories, requests, new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    import peft
    from transformers import AutoModelForCausalLM

    from lmforge.assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    names = list(directories)
    model = peft.PeftModel.from_pretrained(hf, directories[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(directories[name], adapter_name=name)
    width = max(len(ids) for ids, _ in requests)
    pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in requests])       # left padding
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in requests])
    adapter_names = ["__base__" if adapter is None else adapter for _, adapter in requests]

    # No end token at all, as lmforge's ignore_eos (min_new_tokens would instead forbid the end
    # token, which changes the greedy choice wherever it is the argmax).
    model.generation_config.eos_token_id = None

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=adapter_names,
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, width:].tolist()

    return timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="requests per adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="lmforge: the compiled decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lmforge
    from lmforge.peft import load_adapter, unload_lora
    from lmforge.peft.multi_lora import load_adapters
    from lmforge.train.sft_eval import cpu_description

    base, tokenizer = lmforge.load("smollm2-135m-instruct")
    base.eval()
    with tempfile.TemporaryDirectory() as root:
        directories = make_adapters(base, args.adapters, args.rank, root)
        names = list(directories)
        prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.prompts)]
        # Interleaved, so every decode step mixes all the adapters.
        requests = [(ids, name) for ids in prompts for name in names]
        total = len(requests) * args.new_tokens

        multi = load_adapters(copy.deepcopy(base), directories).eval()
        mixed_s, mixed_tokens = ours(multi, tokenizer, requests, args.new_tokens, args.repeats, args.compile)
        del multi
        merged_s, merged_tokens = 0.0, {}
        for name in names:
            model = unload_lora(load_adapter(copy.deepcopy(base), directories[name]), merge=True).eval()
            own = [(ids, None) for ids, adapter in requests if adapter == name]
            seconds, tokens = ours(model, tokenizer, own, args.new_tokens, args.repeats, args.compile)
            merged_s += seconds
            merged_tokens[name] = iter(tokens)
            del model
        base_s, _ = ours(base, tokenizer, [(ids, None) for ids, _ in requests], args.new_tokens, args.repeats,
                         args.compile)
        peft_s, peft_tokens = peft_mixed(directories, requests, args.new_tokens, args.repeats)

    alone = [next(merged_tokens[adapter]) for _, adapter in requests]
    same_as_merged = sum(a == b for a, b in zip(mixed_tokens, alone))
    same_as_peft = sum(a == b for a, b in zip(mixed_tokens, peft_tokens))
    rows = [("lmforge mixed batch (multi-LoRA)", mixed_s), ("lmforge merged, one adapter at a time", merged_s),
            ("lmforge base model, no adapter", base_s), ("peft + transformers mixed batch", peft_s)]
    print(f"{args.adapters} adapters (r={args.rank}, all linear layers) x {args.prompts} requests, "
          f"{args.new_tokens} greedy tokens each; {cpu_description()}, {args.threads} threads"
          + (", compiled" if args.compile else ""))
    print(f"{'':40s} {'seconds':>8s} {'tokens/s':>9s}")
    for label, seconds in rows:
        print(f"{label:40s} {seconds:8.2f} {total / seconds:9.1f}")
    print(f"greedy tokens of the mixed batch: {same_as_merged}/{len(requests)} requests equal to the adapter "
          f"merged alone, {same_as_peft}/{len(requests)} equal to peft's")
    figures = {"benchmark": "multi_lora", "model": "smollm2-135m-instruct", "cpu": cpu_description(),
               "threads": args.threads, "adapters": args.adapters, "requests": len(requests), "rank": args.rank,
               "new_tokens": args.new_tokens, "compile": args.compile,
               "mixed_tok_s": round(total / mixed_s, 1), "merged_sequential_tok_s": round(total / merged_s, 1),
               "base_tok_s": round(total / base_s, 1), "peft_mixed_tok_s": round(total / peft_s, 1),
               "mixed_vs_peft": round(peft_s / mixed_s, 2), "mixed_vs_merged_sequential": round(merged_s / mixed_s, 2),
               "mixed_vs_base": round(base_s / mixed_s, 3),
               "same_as_merged": same_as_merged, "same_as_peft": same_as_peft}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
