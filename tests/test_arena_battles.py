"""Arena battles with two tiny models built in code: random seats, answers through the engine,
judges asked in both orders (disagreement = tie), prompts, the CLI, and bad input."""
from __future__ import annotations

from collections import Counter

import pytest

from arena_support import PROMPT, REPLIES, arena_models
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.eval.arena import (BUILTIN_PROMPTS, ModelJudge, answer_all, both_orders_verdict, draw_matchups,
                                judge_both_orders, load_arena_model, load_prompts, parse_model_spec, parse_verdict,
                                run_battles, split_models, stream_pair)
from lmforge.eval.battle_log import BattleLog
from lmforge.infer import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_new_tokens=60, temperature=0.0)


class ScriptedJudge:
    """A judge with a rule instead of a model; it records what it was asked."""

    def __init__(self, rule, name="scripted"):
        self.rule, self.name, self.asked = rule, name, []

    def judge(self, items):
        self.asked += list(items)
        return [self.rule(*item) for item in items]


@pytest.fixture(scope="module")
def models():
    return arena_models()


@pytest.mark.parametrize("text, verdict", [("A", "a"), ("b", "b"), ("Answer B is better.", "b"), ("Tie.", "tie"),
                                           ("**A**", "a"), ("I cannot decide", "tie"), ("", "tie"),
                                           ("Assistant A", "a")])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("first, swapped, combined", [("a", "b", "a"), ("b", "a", "b"), ("tie", "tie", "tie"),
                                                      ("a", "a", "tie"), ("b", "b", "tie"), ("a", "tie", "tie")])
def test_both_orders_verdict(first, swapped, combined):
    assert both_orders_verdict(first, swapped) == combined


def test_a_judge_that_always_picks_the_first_position_only_produces_ties():
    judge = ScriptedJudge(lambda prompt, a, b: "a")
    items = [("q1", "good", "bad"), ("q2", "bad", "good")]
    assert judge_both_orders(judge, items) == ["tie", "tie"]
    assert judge.asked == items + [("q1", "bad", "good"), ("q2", "good", "bad")]      # both orders, one batch


def test_a_consistent_judge_decides():
    judge = ScriptedJudge(lambda prompt, a, b: "a" if "good" in a else "b")
    assert judge_both_orders(judge, [("q1", "good", "bad"), ("q2", "bad", "good")]) == ["a", "b"]


def test_engine_answers_and_streams_both_models(models):
    poet, clerk = models
    assert answer_all(poet.engine, [PROMPT], GREEDY) == [REPLIES["tiny-poet"]]
    snapshots = list(stream_pair(poet.engine, clerk.engine, PROMPT, GREEDY))
    assert snapshots[-1] == (REPLIES["tiny-poet"], REPLIES["tiny-clerk"])
    assert len(snapshots) > 5                                          # streamed, not all at once
    assert all(REPLIES["tiny-poet"].startswith(a) and REPLIES["tiny-clerk"].startswith(b) for a, b in snapshots)


def test_seats_are_random_and_balanced(models):
    import random

    matchups = draw_matchups(*models, prompts=["p1", "p2", "p3"], rounds=200, rng=random.Random(0))
    seats = Counter(m.model_a.name for m in matchups)
    assert 70 < seats["tiny-poet"] < 130 and seats["tiny-poet"] + seats["tiny-clerk"] == 200
    assert Counter(m.prompt for m in matchups[:3]) == Counter(["p1", "p2", "p3"])   # no repeats before all are used


def test_battles_go_to_the_log_with_the_right_winner(models, tmp_path):
    log = BattleLog(tmp_path / "battles.sqlite")
    # This judge prefers the poet's answer whichever seat it is in.
    judge = ScriptedJudge(lambda prompt, a, b: "a" if a.startswith("Roses") else "b")
    records = run_battles(*models, prompts=[PROMPT], params=GREEDY, log=log, judge=judge, rounds=8, seed=3)
    stored = log.records()
    assert [r.id for r in records] == [r.id for r in stored] and len(stored) == 8
    assert {r.model_a for r in stored} == {"tiny-poet", "tiny-clerk"}                # both seats used
    for record in stored:
        winner = record.model_a if record.winner == "a" else record.model_b
        assert winner == "tiny-poet" and record.judge == "scripted"
        assert {record.answer_a, record.answer_b} == set(REPLIES.values())
        assert (record.answer_a == REPLIES[record.model_a]) and record.prompt == PROMPT


def test_human_votes_through_the_callback(models, tmp_path):
    log = BattleLog(tmp_path / "battles.sqlite")
    seen = []

    def vote(matchup, answer_a, answer_b):
        seen.append((matchup.model_a.name, answer_a))
        return "both_bad"

    run_battles(*models, prompts=[PROMPT], params=GREEDY, log=log, vote=vote, rounds=3)
    assert [r.winner for r in log.records()] == ["both_bad"] * 3 and len(seen) == 3
    assert all(answer == REPLIES[name] for name, answer in seen)
    assert {r.judge for r in log.records()} == {"human"}


def test_model_judge_runs_on_a_real_engine(models):
    judge = ModelJudge(models[0].engine, name="tiny-poet")
    verdicts = judge_both_orders(judge, [(PROMPT, "yes", "no"), (PROMPT, "no", "yes")])
    assert len(verdicts) == 2 and set(verdicts) <= {"a", "b", "tie"}


def test_builtin_and_user_prompts(tmp_path):
    builtin = load_prompts()
    assert len(builtin) >= 20 and all(p.strip() for p in builtin) and BUILTIN_PROMPTS.name == "arena_prompts.jsonl"
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two", "category": "x"}\n')
    assert load_prompts(path) == ["one", "two"]


@pytest.mark.parametrize("content, match", [('{"text": "no prompt key"}\n', "line 1"),
                                            ('{"prompt": "fine"}\nnot json\n', "line 2"),
                                            ('{"prompt": ""}\n', "line 1"), ("\n\n", "holds no prompts")])
def test_bad_prompt_files(tmp_path, content, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_prompts(path)
    with pytest.raises(UserError, match="cannot read prompts file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_model_specs():
    assert parse_model_spec("runs/base+runs/lora") == ("runs/base", "runs/lora")
    assert parse_model_spec("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert split_models("a, b") == ["a", "b"]
    for bad, match in [("a", "exactly two"), ("a,b,c", "exactly two"), ("a,a", "twice")]:
        with pytest.raises(UserError, match=match):
            split_models(bad)
    with pytest.raises(UserError, match="REF\\+ADAPTER_DIR"):
        parse_model_spec("base+")


def test_unknown_model_and_missing_adapter_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a known model"):
        load_arena_model("no-such-model", device="cpu")
    with pytest.raises(UserError, match="is not a directory"):
        load_arena_model(f"nano+{tmp_path / 'missing-adapter'}", device="cpu")
    with pytest.raises(UserError, match="has no tokenizer"):
        load_arena_model("nano", device="cpu")


def test_cli_ratings_and_errors(tmp_path, capsys):
    log = BattleLog(tmp_path / "battles.sqlite")
    from lmforge.eval.battle_log import BattleRecord

    for n in range(12):
        log.record(BattleRecord("x", "y", "a" if n % 4 else "b", "human", "p"))
    out_json = tmp_path / "ratings.json"
    assert main(["arena", "ratings", "--log", str(log.path), "--bootstrap", "50", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["rank", "model", "Bradley-Terry"]
    assert lines[1].split()[1] == "x" and lines[2].split()[1] == "y"
    import json

    saved = json.loads(out_json.read_text())
    assert [r["model"] for r in saved["ratings"]] == ["x", "y"] and saved["ratings"][0]["lower"] is not None
    for argv, message in [(["arena", "ratings", "--log", str(tmp_path / "none.sqlite")], "does not exist"),
                          (["arena", "ratings", "--log", str(log.path), "--judge", "gpt"], "no battles judged by"),
                          (["arena", "ratings", "--log", str(log.path), "--k", "0"], "--k 0"),
                          (["arena", "battle", "--models", "nano"], "exactly two"),
                          (["arena", "battle", "--models", "no-such-model,nano", "--judge", "nano",
                            "--log", str(log.path)], "not a known model"),
                          (["arena", "web", "--models", "nano,nano"], "twice")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.fixture(scope="module")
def saved_poet_and_adapter(tmp_path_factory):
    """The poet saved as a model directory, and a LoRA adapter for it (random non-zero B)."""
    import torch

    from arena_support import tiny_model
    from lmforge.model.loading import load, save_pretrained
    from lmforge.peft import LoRAConfig, apply_lora, save_adapter

    root = tmp_path_factory.mktemp("arena-adapter")
    save_pretrained(*tiny_model(REPLIES["tiny-poet"]), root / "poet")
    adapted, _ = load(root / "poet")
    apply_lora(adapted, LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.5)
    save_adapter(adapted, root / "lora")
    return root, adapted.eval()


def test_a_lora_adapter_is_a_model_of_its_own(saved_poet_and_adapter):
    from lmforge.infer import Engine

    root, adapted = saved_poet_and_adapter
    base = load_arena_model(str(root / "poet"), device="cpu")
    with_lora = load_arena_model(f"{root / 'poet'}+{root / 'lora'}", device="cpu")
    assert (base.name, with_lora.name) == ("poet", "poet+lora") and with_lora.adapter == str(root / "lora")
    [base_answer] = answer_all(base.engine, [PROMPT], GREEDY)
    [lora_answer] = answer_all(with_lora.engine, [PROMPT], GREEDY)
    assert base_answer == REPLIES["tiny-poet"] and lora_answer != base_answer
    # The same as the adapted model (LoRA layers unmerged) answers through an engine of its own.
    assert answer_all(Engine(adapted, with_lora.engine.tokenizer), [PROMPT], GREEDY) == [lora_answer]


def test_cli_battle_with_a_judge_model(saved_poet_and_adapter, tmp_path, capsys):
    root, _ = saved_poet_and_adapter
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "hi there"}\n')
    log = tmp_path / "battles.sqlite"
    argv = ["arena", "battle", "--models", f"{root / 'poet'},{root / 'poet'}+{root / 'lora'}",
            "--judge", str(root / "poet"), "--prompts", str(prompts), "--rounds", "4", "--log", str(log),
            "--max-new-tokens", "24", "--device", "cpu"]
    assert main(argv) == 0
    assert "4 battles appended" in capsys.readouterr().out
    records = BattleLog(log).records()
    assert len(records) == 4 and {r.judge for r in records} == {"poet"}
    assert {r.model_a for r in records} | {r.model_b for r in records} == {"poet", "poet+lora"}
    assert {r.prompt for r in records} == {"hello", "hi there"}


def test_terminal_vote_asks_until_the_answer_is_a_vote(monkeypatch, capsys):
    from types import SimpleNamespace

    from lmforge.eval.arena_command import _terminal_vote

    answers = iter(["maybe", "", "X"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert _terminal_vote(SimpleNamespace(prompt="q?"), "left answer", "right answer") == "both_bad"
    shown = capsys.readouterr().out
    assert "q?" in shown and "left answer" in shown and "right answer" in shown
    assert "tiny" not in shown                                   # no model names before the vote


def test_battle_without_judge_or_terminal_is_a_user_error(tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["arena", "battle", "--models", "nano,tiny", "--log", str(tmp_path / "b.sqlite")]) == 2
    assert "no terminal to vote in" in capsys.readouterr().err
