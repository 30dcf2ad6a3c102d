"""`lmforge arena battle | web | ratings`: battles between two models, and their ratings."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli import add_subparser, check_port, is_loopback
from ..errors import UserError
from .battle_log import DEFAULT_LOG


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, metavar="A,B",
                        help="two model references (run dir, HF dir, .gguf, bundled name), each optionally "
                             "REF+ADAPTER_DIR for a LoRA adapter")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help='JSONL of {"prompt": "..."} lines; default: the built-in configs/arena_prompts.jsonl')
    parser.add_argument("--log", default=str(DEFAULT_LOG), help="the SQLite battle log votes are appended to")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="answer length limit")
    parser.add_argument("--temperature", type=float, default=0.7, help="answer sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context served per model")


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")

    battle = add_subparser(subparsers, "battle", "battle two models on prompts; a judge model or you (in the terminal) vote",
                           "lmforge arena battle --models smollm2-135m-instruct,runs/speedrun "
                           "--judge smollm2-135m-instruct --rounds 20")
    _common(battle)
    battle.add_argument("--judge", default=None, metavar="REF",
                        help="judge model, asked with the answers in both orders (disagreement = tie); "
                             "without it you vote in the terminal")
    battle.add_argument("--rounds", type=int, default=10, help="battles to run (prompts drawn without repeats first)")
    battle.add_argument("--seed", type=int, default=0, help="seeds the prompt order, the seats and the sampling")
    battle.set_defaults(func=run_battle)

    web = add_subparser(subparsers, "web", "a web page: two anonymous answers side by side, vote, then names revealed",
                        "lmforge arena web --models smollm2-135m-instruct,runs/speedrun   # http://127.0.0.1:7861")
    _common(web)
    web.add_argument("--host", default="127.0.0.1", help="interface; 0.0.0.0 exposes the page (no login) to your network")
    web.add_argument("--port", type=int, default=7861)
    web.set_defaults(func=run_web)

    ratings = add_subparser(subparsers, "ratings", "Elo and Bradley-Terry ratings (95%% bootstrap intervals) from the log",
                            "lmforge arena ratings --log artifacts/arena/battles.sqlite --bootstrap 500")
    ratings.add_argument("--log", default=str(DEFAULT_LOG), help="the SQLite battle log")
    ratings.add_argument("--judge", default=None, help="only the battles this judge decided ('human' or a model name)")
    ratings.add_argument("--k", type=float, default=32.0, help="Elo K factor: how far one battle moves a rating")
    ratings.add_argument("--initial", type=float, default=1000.0, help="starting Elo rating, and the BT centre")
    ratings.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds for the BT intervals (0 = none)")
    ratings.add_argument("--seed", type=int, default=0)
    ratings.add_argument("--json", default=None, metavar="OUT", help="also write the ratings to this JSON file")
    ratings.set_defaults(func=run_ratings)


def _params(args: argparse.Namespace, seed: int | None = None) -> Any:
    from ..infer import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=seed).validate()


def _load_pair(args: argparse.Namespace) -> list[Any]:
    from .arena import load_arena_model, split_models

    specs = split_models(args.models)
    models = []
    for spec in specs:
        print(f"loading {spec} ...", file=sys.stderr, flush=True)
        models.append(load_arena_model(spec, device=args.device, max_seq_len=args.max_seq_len))
    if models[0].name == models[1].name:
        raise UserError(f"both models are called '{models[0].name}' in the log; give them different paths")
    return models


def _terminal_vote(matchup: Any, answer_a: str, answer_b: str) -> str:
    print(f"\n=== prompt: {matchup.prompt}\n--- Model A:\n{answer_a}\n--- Model B:\n{answer_b}")
    choices = {"a": "a", "b": "b", "t": "tie", "tie": "tie", "x": "both_bad", "bad": "both_bad"}
    while True:
        answer = input("vote [a] A better, [b] B better, [t] tie, [x] both bad: ").strip().lower()
        if answer in choices:
            return choices[answer]


def run_battle(args: argparse.Namespace) -> int:
    from .arena import ModelJudge, load_arena_model, load_prompts, run_battles, split_models
    from .battle_log import BattleLog

    split_models(args.models)                         # a bad --models is the first thing to say
    if not args.judge and not sys.stdin.isatty():     # before minutes of loading models
        raise UserError("no --judge and no terminal to vote in; pass --judge REF, or run in a terminal")
    prompts = load_prompts(args.prompts)
    log = BattleLog(args.log)
    first, second = _load_pair(args)
    judge = None
    if args.judge:
        print(f"loading judge {args.judge} ...", file=sys.stderr, flush=True)
        judge_model = load_arena_model(args.judge, device=args.device, max_seq_len=args.max_seq_len)
        judge = ModelJudge(judge_model.engine, name=judge_model.name)
    records = run_battles(first, second, prompts, _params(args, args.seed), log, judge=judge,
                          vote=None if judge else _terminal_vote, rounds=args.rounds, seed=args.seed,
                          session="cli")
    wins = {first.name: 0, second.name: 0, "tie": 0}
    for record in records:
        if record.winner in ("a", "b"):
            wins[record.model_a if record.winner == "a" else record.model_b] += 1
        else:
            wins["tie"] += 1
    print(f"{len(records)} battles appended to {args.log}: " + ", ".join(f"{k} {v}" for k, v in wins.items()))
    return 0


def run_web(args: argparse.Namespace) -> int:
    from .arena import load_prompts
    from .battle_log import BattleLog

    check_port(args.port)
    prompts = load_prompts(args.prompts)
    log = BattleLog(args.log)
    first, second = _load_pair(args)
    from ..serve.web import launch
    from .arena_web import build_arena_app

    app = build_arena_app(first, second, log, _params(args), prompts=prompts)
    if not is_loopback(args.host):
        print(f"note: listening on {args.host}: anyone who can reach this machine can vote (no login)")
    print(f"arena for {first.name} vs {second.name} at http://{args.host}:{args.port}; votes go to {args.log}",
          flush=True)
    launch(app, host=args.host, port=args.port, block=True)
    return 0


def ratings_table(log_path: str, judge: str | None = None, k: float = 32.0, initial: float = 1000.0,
                  rounds: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Rows best first: model, BT rating, interval, rank, Elo, battles."""
    from .battle_log import BattleLog
    from .ratings import bradley_terry, elo

    battles = BattleLog(log_path, create=False).battles(judge)
    if not battles:
        raise UserError(f"battle log {log_path} has no battles" + (f" judged by '{judge}'" if judge else "")
                        + "; run `lmforge arena battle` or `lmforge arena web` first")
    online = elo(battles, k=k, initial=initial)
    return [{"model": r.model, "rank": r.rank, "bt": r.rating, "lower": r.lower, "upper": r.upper,
             "elo": online[r.model], "battles": r.battles}
            for r in bradley_terry(battles, rounds=rounds, seed=seed, initial=initial)]


def format_ratings(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'rank':>4}  {'model':<32} {'Bradley-Terry':>13} {'95% interval':>17} {'Elo':>7} {'battles':>8}"]
    for row in rows:
        interval = "-" if row["lower"] is None else f"{row['lower']:.0f} .. {row['upper']:.0f}"
        lines.append(f"{row['rank']:>4}  {row['model']:<32} {row['bt']:>13.1f} {interval:>17} {row['elo']:>7.1f} "
                     f"{row['battles']:>8}")
    return "\n".join(lines)


def run_ratings(args: argparse.Namespace) -> int:
    from ..io import write_json_atomic

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap} is negative; use 0 (no intervals) or more rounds")
    if args.k <= 0:
        raise UserError(f"--k {args.k} must be positive; the usual value is 32 (or 4 for a large log)")
    rows = ratings_table(args.log, args.judge, args.k, args.initial, args.bootstrap, args.seed)
    print(format_ratings(rows))
    print("(Bradley-Terry: one fit of all battles, order-free; Elo: replayed in log order with "
          f"K={args.k:g}, so it depends on the order)")
    if args.json:
        write_json_atomic(args.json, {"log": args.log, "k": args.k, "initial": args.initial,
                                      "bootstrap": args.bootstrap, "ratings": rows})
    return 0
