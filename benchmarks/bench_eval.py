"""Evaluation throughput: lmforge's lm-eval backend vs lm-eval's own `hf` backend, same model, same tasks.

Both sides run SmolLM2-135M-Instruct in fp32 (lmforge: the bundled GGUF exported to an HF directory
and loaded from it; hf: transformers' LlamaForCausalLM from the same directory) through
`lm_eval.simple_evaluate` on the same local tasks, same batch size and torch threads. Model
loading is outside the timings (each LM object is built first and handed to lm-eval).

  loglikelihood  mmlu-fewshot (the MMLU dev questions lm-eval ships, ~280 questions, 57 subjects),
                 cloze-style: "Question: ...\\nAnswer:" scored against each choice's text (acc, acc_norm).
                 Requests/s = log-likelihood requests (question x choice) / seconds.
  generation     the first --gen-questions GSM8K test questions, 0-shot, greedy, until a blank line or
                 "Question:", at most --max-gen-toks new tokens. Tokens/s = generated tokens / seconds.

Where the time differs, on a CPU: hf runs every choice as its own row (context + choice) and
computes log-softmax over the vocabulary at every position; lmforge prefills each question's
context once, copies its KV-cache row to one row per choice, and runs the output layer only at
the positions that predict a choice token. For generation, hf's `generate` decodes a padded batch
until its longest member stops; lmforge's engine refills a finished row with the next question
(continuous batching) and drafts up to --prompt-lookup tokens per greedy row from the text so far
(infer/prompt_lookup.py), keeping those its own argmax agrees with: the same text in fewer
forwards. The generation run is repeated without drafts, to show both effects. Ends with one JSON line.

    python benchmarks/bench_eval.py [--limit 0] [--gen-questions 32] [--max-gen-toks 128] [--batch-size 16] [--prompt-lookup 4]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        flags = [f for f in ("avx2", "avx512f", "amx_tile") if f in fields.get("Flags", "")]
        return f"{fields.get('Model name', platform.processor()).strip()} ({', '.join(flags)})"
    except OSError:
        return platform.processor()


def write_tasks(directory: Path, gen_questions: int) -> None:
    from lmforge.eval.task_data import load_task

    mmlu = load_task("mmlu-fewshot").docs
    rows = [{"question": d["query"].removeprefix("Question: ").removesuffix("\nAnswer:"), "choices": d["choices"],
             "label": d["gold"], "subject": d["group"]} for d in mmlu]
    (directory / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "bench_mmlu.yaml").write_text(
        f"task: bench_mmlu\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'mmlu.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    gsm = load_task("gsm8k").docs[:gen_questions]
    (directory / "gsm.jsonl").write_text("".join(json.dumps({"question": d["query"], "answer": d["reference"]}) + "\n"
                                                 for d in gsm))
    (directory / "bench_gen.yaml").write_text(
        f"task: bench_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'gsm.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: answer\n'
        'generation_kwargs:\n  until: ["\\n\\n", "Question:"]\n  max_gen_toks: MAXTOK\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")


def run(lm, task: str, directory: Path, limit: int | None) -> tuple[dict, float]:
    import lm_eval
    import lm_eval.tasks

    manager = lm_eval.tasks.TaskManager(include_path=str(directory))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                  bootstrap_iters=0)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="questions of the MC task (0 = all)")
    parser.add_argument("--gen-questions", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--prompt-lookup", type=int, default=4,
                        help="lmforge's prompt-lookup drafts per step (0 = off); a run without it is measured too")
    parser.add_argument("--hf-dir", default=None, help="an existing HF export of SmolLM2 (default: export now)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import get_model

    import lmforge.eval.harness  # noqa: F401
    from lmforge.model.loading import export, load

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)   # the HF export is 540 MB
    hf_dir = Path(args.hf_dir) if args.hf_dir else work / "smollm2-hf"
    if not args.hf_dir:
        model, tokenizer = load("smollm2-135m-instruct")
        export(model, tokenizer, hf_dir, "hf")
        del model
    write_tasks(work, args.gen_questions)
    (work / "bench_gen.yaml").write_text((work / "bench_gen.yaml").read_text().replace("MAXTOK", str(args.max_gen_toks)))
    limit = args.limit or None
    sides = {"lmforge": get_model("lmforge")(model=str(hf_dir), batch_size=args.batch_size, max_length=2048,
                                             prompt_lookup=args.prompt_lookup),
             "hf": get_model("hf")(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size,
                                   max_length=2048)}
    report: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    mc, gen = {}, {}
    for name, lm in sides.items():
        out, seconds = run(lm, "bench_mmlu", work, limit)
        samples = out["samples"]["bench_mmlu"]
        requests = sum(len(s["resps"]) for s in samples)
        mc[name] = {"seconds": seconds, "requests": requests, "requests_per_s": requests / seconds,
                    "acc": out["results"]["bench_mmlu"]["acc,none"],
                    "acc_norm": out["results"]["bench_mmlu"]["acc_norm,none"],
                    "logprobs": [r[0][0] for s in samples for r in s["resps"]], "questions": len(samples)}
        out, seconds = run(lm, "bench_gen", work, None)
        texts = [s["resps"][0][0] for s in out["samples"]["bench_gen"]]
        tokens = sum(len(lm.tok_encode(t)) for t in texts)
        gen[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "texts": texts,
                     "exact_match": out["results"]["bench_gen"]["exact_match,none"]}
        print(f"{name}: mc {mc[name]['requests_per_s']:.1f} req/s, gen {gen[name]['tokens_per_s']:.1f} tok/s", flush=True)
    stats = sides["lmforge"].lm.engine().stats
    drafts = {"proposed": stats.draft_tokens, "accepted": stats.accepted_draft_tokens, "steps": stats.steps}
    plain = None
    if args.prompt_lookup:
        # The same engine without drafts: what continuous batching alone gives.
        lm = sides["lmforge"]
        lm.lm.prompt_lookup, lm.lm._engine = 0, None
        out, seconds = run(lm, "bench_gen", work, None)
        texts = [s["resps"][0][0] for s in out["samples"]["bench_gen"]]
        plain = {"tokens_per_s": sum(len(lm.tok_encode(t)) for t in texts) / seconds,
                 "same_texts": texts == gen["lmforge"]["texts"], "steps": lm.lm.engine().stats.steps}
        print(f"lmforge without prompt lookup: gen {plain['tokens_per_s']:.1f} tok/s", flush=True)
    max_diff = max(abs(a - b) for a, b in zip(mc["lmforge"]["logprobs"], mc["hf"]["logprobs"], strict=True))
    same_text = sum(a == b for a, b in zip(gen["lmforge"]["texts"], gen["hf"]["texts"]))
    print(f"\nCPU: {report['cpu']}, {report['threads']} torch threads, batch {args.batch_size}")
    print(f"{'':28}{'lmforge':>12}{'hf':>12}{'ratio':>8}")
    print(f"{'MC questions':28}{mc['lmforge']['questions']:>12}{mc['hf']['questions']:>12}")
    print(f"{'loglikelihood requests/s':28}{mc['lmforge']['requests_per_s']:>12.1f}{mc['hf']['requests_per_s']:>12.1f}"
          f"{mc['lmforge']['requests_per_s'] / mc['hf']['requests_per_s']:>7.2f}x")
    print(f"{'acc':28}{mc['lmforge']['acc']:>12.4f}{mc['hf']['acc']:>12.4f}")
    print(f"{'acc_norm':28}{mc['lmforge']['acc_norm']:>12.4f}{mc['hf']['acc_norm']:>12.4f}")
    print(f"{'max |logprob diff|':28}{max_diff:>12.2e}")
    print(f"{'generated tokens/s':28}{gen['lmforge']['tokens_per_s']:>12.1f}{gen['hf']['tokens_per_s']:>12.1f}"
          f"{gen['lmforge']['tokens_per_s'] / gen['hf']['tokens_per_s']:>7.2f}x")
    print(f"{'identical generations':28}{same_text:>12}/{len(gen['hf']['texts'])}")
    print(f"prompt lookup: {drafts['accepted']} of {drafts['proposed']} drafted tokens kept, {drafts['steps']} engine "
          "steps" + (f"; without it {plain['tokens_per_s']:.1f} tok/s ({plain['steps']} steps, same texts: "
                     f"{plain['same_texts']})" if plain else ""))
    report.update({
        "mc_questions": mc["hf"]["questions"], "mc_requests": mc["hf"]["requests"],
        "loglikelihood_requests_per_s": {k: round(v["requests_per_s"], 2) for k, v in mc.items()},
        "loglikelihood_ratio": round(mc["lmforge"]["requests_per_s"] / mc["hf"]["requests_per_s"], 2),
        "acc": {k: v["acc"] for k, v in mc.items()}, "acc_norm": {k: v["acc_norm"] for k, v in mc.items()},
        "max_logprob_diff": max_diff, "scores_identical": mc["lmforge"]["acc"] == mc["hf"]["acc"]
        and mc["lmforge"]["acc_norm"] == mc["hf"]["acc_norm"],
        "gen_questions": len(gen["hf"]["texts"]), "generated_tokens_per_s": {k: round(v["tokens_per_s"], 2)
                                                                            for k, v in gen.items()},
        "generation_ratio": round(gen["lmforge"]["tokens_per_s"] / gen["hf"]["tokens_per_s"], 2),
        "identical_generations": same_text, "prompt_lookup": args.prompt_lookup, "drafts": drafts,
        "generated_tokens_per_s_without_prompt_lookup": round(plain["tokens_per_s"], 2) if plain else None,
        "generation_ratio_without_prompt_lookup": round(plain["tokens_per_s"] / gen["hf"]["tokens_per_s"], 2)
        if plain else None,
    })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
