"""Building pairs (sampling through the engine, the judge asked in both orders, ties) and Constitutional
AI end to end on a tiny model; bad constitution / prompt files are clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge import cli
from lmforge.align.data import read_pairs
from lmforge.align.pairs import judge_preferences, sample_answers, verdicts, verifiable_pairs
from lmforge.errors import UserError

from train_support import make_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]


@pytest.fixture(scope="module")
def tiny(tokenizer_dir):
    from lmforge.model.loading import load

    torch.manual_seed(0)
    return load("nano", tokenizer=tokenizer_dir)


def test_sampling_is_seeded_and_gives_k_answers_per_prompt(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "What is 2 plus 2?"}]]
    first = sample_answers(model, tokenizer, prompts, 3, max_new_tokens=6, seed=1)
    assert [len(x) for x in first] == [3, 3]
    assert first == sample_answers(model, tokenizer, prompts, 3, max_new_tokens=6, seed=1)
    assert first != sample_answers(model, tokenizer, prompts, 3, max_new_tokens=6, seed=2)


def test_the_judge_is_asked_in_both_orders_and_disagreement_is_a_tie(tiny):
    model, tokenizer = tiny
    questions = [("Say hi", "hi", "go away"), ("Say hi", "go away", "hi")]
    margins = judge_preferences(model, tokenizer, questions)
    # Swapping the answers swaps the two orders' margins and negates them.
    torch.testing.assert_close(margins[1], -margins[0].flip(0), rtol=1e-4, atol=1e-5)
    assert verdicts(torch.tensor([[1.0, 2.0], [-1.0, -0.5], [1.0, -1.0]])) == [1, -1, 0]


def test_verifiable_pairs_use_the_task_scorer(tiny, monkeypatch):
    from lmforge.align import pairs as pairs_module
    from lmforge.data.chat_corpora import reasoning_gym_conversations

    conversations = reasoning_gym_conversations("chain_sum", 3, 0)
    answers = [[c.messages[-1]["content"], "wrong"] for c in conversations[:2]] + [["wrong", "no"]]
    monkeypatch.setattr(pairs_module, "sample_answers", lambda *a, **k: answers)
    pairs, stats = verifiable_pairs(*tiny, conversations, k=2)
    assert [p.chosen for p in pairs] == [c.messages[-1]["content"] for c in conversations[:2]]
    assert all(p.rejected == "wrong" for p in pairs) and stats.all_worse == 1
    with_reference, stats = verifiable_pairs(*tiny, conversations, k=2, reference_chosen=True)
    assert len(with_reference) == 3 and stats.from_reference == 1


def test_verifiable_pairs_can_be_scored_by_a_reward_function(tiny, monkeypatch):
    """--reward gsm8k: the right number inside a sentence wins, where the task's scorer wants it bare."""
    from lmforge.align import pairs as pairs_module
    from lmforge.align.rewards import RewardFunctions
    from lmforge.data.chat_corpora import reasoning_gym_conversations

    conversations = reasoning_gym_conversations("chain_sum", 2, 0)
    right = [f"The answer is {c.messages[-1]['content']}." for c in conversations]
    answers = [[right[0], "The answer is 1000."], ["The answer is 999.", "It is 998."]]
    monkeypatch.setattr(pairs_module, "sample_answers", lambda *a, **k: answers)
    pairs, stats = verifiable_pairs(*tiny, conversations, k=2, reward=RewardFunctions(["gsm8k"]))
    assert [(p.chosen, p.rejected) for p in pairs] == [(right[0], "The answer is 1000.")]
    assert stats.all_worse == 1 and stats.mean_score == 0.25


def test_constitutional_ai_end_to_end_on_a_tiny_model(tokenizer_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"bad {i}"}) + "\n" for i in range(14)))
    constitution = tmp_path / "constitution.yaml"       # short texts: the nano model's context is 128 tokens
    constitution.write_text('principles:\n  - {name: kind, critique: "Rude?", revision: "Be kind.", criterion: kinder}\n'
                            '  - {name: safe, critique: "Unsafe?", revision: "Be safe.", criterion: safer}\n')
    args = ["align", "cai", "model=nano", f"tokenizer={tokenizer_dir}", f"prompts={prompts}", f"out_dir={tmp_path}",
            f"constitution={constitution}",
            "name=cai", "held_out=3", "max_new_tokens=4", "sft_steps=2", "dpo_steps=2", "batch_size=2", "seq_len=128",
            "progress=false", "lora.r=2", "lora.alpha=4"]
    assert cli.main(args) == 0
    run = tmp_path / "cai"
    records = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()]
    assert len(records) == 11 and {"response", "critique", "revision", "principle"} <= set(records[0])
    assert read_pairs(run / "ai_pairs.jsonl")
    report = json.loads((run / "report.json").read_text())
    assert report["wins"] + report["losses"] + report["ties"] == 3 and 0 <= report["win_rate"] <= 1
    averaged = report["order_averaged"]          # a strict win (both orders agree) is an averaged win too
    assert averaged["wins"] >= report["wins"] and averaged["losses"] >= report["losses"]
    assert averaged["wins"] + averaged["losses"] <= 3 and "Order-averaged" in (run / "report.md").read_text()
    assert 0 <= report["refusals"]["before"] <= 3 and 0 <= report["refusals"]["after"] <= 3
    assert "Refusals" in (run / "report.md").read_text()
    assert (run / "report.md").is_file() and (run / "dpo" / "model.safetensors").is_file()


def test_worked_examples_come_before_the_critique_and_revision_requests():
    from lmforge.align.cai import FewShot, Principle, few_shot_turns, load_few_shot

    principle = Principle("safe", "Is it unsafe?", "Make it safe.", "safer")
    shot = FewShot("How do I pick a lock?", "Use a pick.", "It helps a break-in.", "I can't help with that.")
    turns = few_shot_turns([shot], principle)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    assert [t["content"] for t in turns] == [shot.prompt, shot.response, principle.critique, shot.critique,
                                             principle.revision, shot.revision]
    shipped = load_few_shot("constitution.yaml")       # configs/constitution.yaml ships three
    assert len(shipped) == 3 and all(s.revision for s in shipped)


def test_refusals_are_counted_by_their_opening():
    from lmforge.align.cai import is_refusal

    assert is_refusal("I can't help with stealing a car.") and is_refusal("  I\u2019m sorry, but no.")
    assert is_refusal("As an AI, I won't do that.")
    compliance = "To steal a car you first find one parked somewhere quiet at night with nobody around. I can't stress this."
    assert compliance.index("I can't") > 80 and not is_refusal(compliance)          # a marker after the opening
    assert not is_refusal("Here is how to hack an email account:")


def test_a_bad_constitution_or_prompt_file_is_a_clear_error(tokenizer_dir, tmp_path, capsys):
    from lmforge.align.cai import load_constitution
    from lmforge.align.pairs import read_prompts

    bad = tmp_path / "constitution.yaml"
    bad.write_text("principles:\n  - name: x\n    critique: c\n")
    with pytest.raises(UserError, match="principle 1 needs text fields"):
        load_constitution(str(bad))
    from lmforge.align.cai import load_few_shot

    shots = tmp_path / "shots.yaml"
    shots.write_text("principles: []\nexamples:\n  - {prompt: p, response: r, critique: c}\n")
    with pytest.raises(UserError, match="example 1 needs text fields prompt, response, critique, revision"):
        load_few_shot(str(shots))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: missing field prompt"):
        read_prompts(str(prompts))
    assert cli.main(["align", "cai", "model=nano", f"tokenizer={tokenizer_dir}", f"constitution={bad}",
                     f"out_dir={tmp_path}", "name=bad"]) == 2
    assert not (tmp_path / "bad").exists()
