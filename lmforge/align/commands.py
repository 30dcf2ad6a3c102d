"""`lmforge align METHOD`: preference pairs, reward models, DPO and its family, GRPO/RLOO, PPO,
Constitutional AI.

Each training method is a recipe-driven run like `lmforge sft` (--config, key=value overrides,
--resume, --print-config): a module with a config loader and a train function, one entry in
TRAINING below.
"""
from __future__ import annotations

import argparse
import importlib

from ..cli import HelpFormatter, add_subparser
from ..train.commands import add_recipe_arguments, run_recipe

# method -> (module, config loader, train function, recipes, description, example)
TRAINING: dict[str, tuple[str, str, str, str, str, str]] = {
    "reward": ("lmforge.align.reward", "load_reward_config", "train_reward_model", "rm-smollm2-countdown",
               "Train a reward model (Bradley-Terry on preference pairs): a scalar head on the last hidden\n"
               "state; reports held-out pairwise accuracy and exports a transformers\n"
               "*ForSequenceClassification directory.",
               "lmforge align reward --config rm-smollm2-countdown pairs=pairs.jsonl"),
    "dpo": ("lmforge.align.dpo", "load_dpo_config", "dpo", "dpo-smollm2-countdown",
            "Direct preference optimisation and its family (sigmoid, ipo, hinge, robust, sigmoid_norm,\n"
            "simpo, orpo, kto) on preference pairs, through the one Trainer; LoRA uses the base with\n"
            "adapters off as the reference.",
            "lmforge align dpo --config dpo-smollm2-countdown loss_type=ipo beta=0.5"),
    "grpo": ("lmforge.align.grpo", "load_grpo_config", "grpo", "grpo-smollm2-chain-sum",
             "GRPO (or method=rloo) with verifiable rewards: G completions per prompt sampled by the\n"
             "engine, group-relative advantages, the clipped surrogate (epsilon_high, loss_type grpo |\n"
             "bnpo | dr_grpo | dapo), optional k3 KL to a reference; reports held-out accuracy and pass@k.",
             "lmforge align grpo --config grpo-smollm2-chain-sum num_generations=8 max_steps=30"),
    "ppo": ("lmforge.align.ppo", "load_ppo_config", "ppo", "ppo-smollm2-chain-sum",
            "PPO as in InstructGPT: a value head on the policy, rollouts from the engine, per-token KL\n"
            "penalty to a frozen reference with the reward model's score at the end, GAE, clipped\n"
            "policy and value losses over several epochs, fixed or adaptive KL coefficient.",
            "lmforge align ppo --config ppo-smollm2-chain-sum reward_model=runs/rm-chain-sum"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Alignment: build preference pairs (verifiable rewards or AI feedback), train reward\n"
                          "models, DPO-family objectives, GRPO/RLOO and PPO on sampled completions, and\n"
                          "Constitutional AI, all through the one Trainer.")
    subparsers = parser.add_subparsers(dest="method", metavar="METHOD")
    pairs = add_subparser(subparsers, "pairs", "Write preference pairs (JSONL, TRL's prompt/chosen/rejected): "
                          "k samples per reasoning-gym prompt split by the task's scorer, or two samples per "
                          "prompt judged by a model in both orders.",
                          "lmforge align pairs --model smollm2-135m-instruct --task 'reasoning-gym:countdown?size=200' "
                          "--k 4 --out pairs.jsonl")
    pairs.add_argument("--model", required=True, help="the policy that samples answers (any lmforge.load reference)")
    source = pairs.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="reasoning-gym:TASK?size=N&seed=S&... (verifiable pairs)")
    source.add_argument("--prompts", help="a JSONL file of {\"prompt\": ...} lines (AI feedback; needs --judge)")
    pairs.add_argument("--judge", help="the judge model for --prompts (default: --model itself)")
    pairs.add_argument("--k", type=int, default=4, help="samples per prompt (verifiable pairs)")
    pairs.add_argument("--pairs-per-prompt", type=int, default=1)
    pairs.add_argument("--reference-chosen", action="store_true",
                       help="verifiable pairs: when no sample is correct, the task's reference answer is chosen")
    pairs.add_argument("--reward", help="verifiable pairs: score the samples with these reward functions "
                       "(comma-separated: task, gsm8k, format, module:function) instead of the task's scorer")
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--max-new-tokens", type=int, default=64)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--out", required=True, help="the pair file to write (atomically)")
    pairs.set_defaults(func=run_pairs)

    for method, (_, _, _, recipes, description, example) in TRAINING.items():
        sub = add_subparser(subparsers, method, description, example)
        add_recipe_arguments(sub, f"e.g. {recipes}", "max_steps=50 beta=0.1")
        sub.set_defaults(func=run_training, method=method)

    cai = add_subparser(subparsers, "cai", "Constitutional AI: red-team prompts -> response -> critique against "
                        "a principle -> revision; SFT on the revisions; then the model judges pairs against the "
                        "principles and DPO trains on those AI preferences. Writes a before/after report.",
                        "lmforge align cai --config cai-smollm2")
    add_recipe_arguments(cai, "e.g. cai-smollm2", "sft_steps=30 dpo_steps=30")
    cai.set_defaults(func=run_cai)
    parser.formatter_class = HelpFormatter


def run_training(args: argparse.Namespace) -> int:
    module_name, loader, train, *_ = TRAINING[args.method]
    module = importlib.import_module(module_name)
    return run_recipe(args, getattr(module, loader), getattr(module, train))


def run_cai(args: argparse.Namespace) -> int:
    from .cai import constitutional_ai, load_cai_config

    return run_recipe(args, load_cai_config, constitutional_ai)


def run_pairs(args: argparse.Namespace) -> int:
    import time

    from ..model.loading import load
    from .data import write_pairs
    from .pairs import ai_feedback_pairs, log, read_prompts, verifiable_pairs

    started = time.perf_counter()
    torch_seed(args.seed)
    model, tokenizer = load(args.model)
    if tokenizer is None:
        from ..errors import UserError

        raise UserError(f"model '{args.model}' has no tokenizer; give a model with one")
    if args.task:
        from ..data.chat_corpora import builtin_conversations, is_builtin
        from .rewards import RewardFunctions

        if not is_builtin(args.task) or not args.task.startswith(("reasoning-gym:", "reasoning_gym:")):
            from ..errors import UserError

            raise UserError(f"--task {args.task!r} is not a reasoning-gym task; use reasoning-gym:TASK?size=N")
        pairs, stats = verifiable_pairs(model, tokenizer, builtin_conversations(args.task), k=args.k,
                                        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                        seed=args.seed, pairs_per_prompt=args.pairs_per_prompt,
                                        reference_chosen=args.reference_chosen,
                                        reward=RewardFunctions(args.reward.split(",")) if args.reward else None)
    else:
        judge, judge_tokenizer = (model, tokenizer) if not args.judge else load(args.judge)
        pairs, stats = ai_feedback_pairs(model, judge, judge_tokenizer or tokenizer, tokenizer,
                                         read_prompts(args.prompts), temperature=args.temperature,
                                         max_new_tokens=args.max_new_tokens, seed=args.seed)
    if not pairs:
        from ..errors import UserError

        raise UserError(f"no pairs: {stats.describe()}; raise --k or --temperature, or choose an easier task "
                        "(nothing was written)")
    write_pairs(args.out, pairs)
    log(f"pairs: {stats.describe()} -> {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
