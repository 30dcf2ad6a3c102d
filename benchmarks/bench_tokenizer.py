"""Tokenizer benchmark: our byte-level BPE against HF `tokenizers` and tiktoken, in the same run.

1. Training on the whole Shakespeare corpus (42 plays, ~5 MB) at vocabulary 8,192: ours vs HF
   `BpeTrainer` with a byte-level pre-tokenizer (both with the same 5 special tokens, all cores).
   Target: ours within 1.5x of HF's time.
2. Encoding throughput (MB/s) on the same corpus, one call on the whole text, same vocabulary for
   all three: ours (fresh cache, then warm), HF tokenizers, tiktoken.
   Target: ours (fresh cache) at least HF tokenizers' single-call throughput.

Each timing is the best of --repeats runs (the machine may be shared). Prints a table, then one
JSON line with the figures.

    python benchmarks/bench_tokenizer.py [--repeats 3] [--vocab-size 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.assets import shakespeare_play_files  # noqa: E402
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, load_tokenizer, train_bpe  # noqa: E402


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def train_hf(files: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    return tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # HF uses all cores, as we do

    files = shakespeare_play_files()
    corpus = "".join(path.read_text(encoding="utf-8") for path in files)
    megabytes = len(corpus.encode("utf-8")) / 1e6

    # --- training ---
    ours_train_s, ours = best_time(lambda: train_bpe(files, args.vocab_size), args.repeats)
    hf_train_s, hf_trained = best_time(lambda: train_hf([str(path) for path in files], args.vocab_size), args.repeats)

    # --- encoding, all on our vocabulary ---
    import tiktoken  # noqa: F401  (import cost outside the timings)
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as directory:
        ours.save(directory)
        hf = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))

        def encode_fresh():
            return load_tokenizer(directory).encode(corpus)  # a new tokenizer: empty cache

        load_s, _ = best_time(lambda: load_tokenizer(directory), args.repeats)
        fresh_s, ids = best_time(encode_fresh, args.repeats)
        fresh_s -= load_s
    warm_s, _ = best_time(lambda: ours.encode(corpus), args.repeats)
    hf_s, hf_encoding = best_time(lambda: hf.encode(corpus), args.repeats)
    encoding = ours.to_tiktoken()
    tiktoken_s, tiktoken_ids = best_time(lambda: encoding.encode(corpus, allowed_special="all"), args.repeats)
    same_ids = ids == hf_encoding.ids == tiktoken_ids

    figures = {
        "corpus_mb": round(megabytes, 3),
        "vocab_size": args.vocab_size,
        "cpus": os.cpu_count(),
        "train_s_ours": round(ours_train_s, 3),
        "train_s_hf": round(hf_train_s, 3),
        "train_ratio_ours_over_hf": round(ours_train_s / hf_train_s, 3),
        "train_target_met": ours_train_s <= 1.5 * hf_train_s,
        "encode_mbps_ours_fresh": round(megabytes / fresh_s, 3),
        "encode_mbps_ours_warm": round(megabytes / warm_s, 3),
        "encode_mbps_hf": round(megabytes / hf_s, 3),
        "encode_mbps_tiktoken": round(megabytes / tiktoken_s, 3),
        "encode_ratio_ours_fresh_over_hf": round(hf_s / fresh_s, 3),
        "encode_target_met": fresh_s <= hf_s,
        "same_ids_all_three": same_ids,
        "hf_vocab_size": hf_trained.get_vocab_size(),
    }

    rows = [
        ("train, vocab %d (s)" % args.vocab_size, f"{ours_train_s:.2f}", f"{hf_train_s:.2f}", "-",
         f"ours/HF = {figures['train_ratio_ours_over_hf']:.2f} (target <= 1.5)"),
        ("encode, fresh cache (MB/s)", f"{megabytes / fresh_s:.2f}", f"{megabytes / hf_s:.2f}",
         f"{megabytes / tiktoken_s:.2f}", f"ours/HF = {figures['encode_ratio_ours_fresh_over_hf']:.2f} (target >= 1)"),
        ("encode, warm cache (MB/s)", f"{megabytes / warm_s:.2f}", "-", "-", ""),
    ]
    print(f"Shakespeare: {len(files)} plays, {megabytes:.2f} MB, {os.cpu_count()} CPUs, best of {args.repeats}")
    header = ("", "lmforge", "HF tokenizers", "tiktoken", "")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(5)]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print(f"identical ids from all three encoders: {same_ids}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
