"""Reward models: the Bradley-Terry objective improves on a tiny GPT, `lmforge align reward` end to end,
and the exported transformers *ForSequenceClassification directory gives our scores."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge import cli
from lmforge.align.data import collate_pairs
from lmforge.align.reward import RewardObjective, export_reward_model, load_reward_model, reward_scores
from lmforge.train import Trainer, TrainConfig
from lmforge.train.checkpoint import latest_checkpoint

from align_support import pair_batches, token_pairs, write_arithmetic_pairs
from train_support import make_shakespeare_shards, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]


def test_reward_objective_learns_the_preference_and_checkpoints_its_head(tmp_path):
    model = tiny_gpt()
    objective = RewardObjective(model.config.d_model, center_coefficient=0.01)
    config = TrainConfig(max_steps=25, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                         eval_interval=0, checkpoint_interval=25, progress=False)
    trainer = Trainer(model, objective, pair_batches(), config, run_dir=tmp_path)
    probe = collate_pairs(token_pairs(24)[:12], 0)

    def accuracy_and_loss():
        with torch.no_grad():
            output = objective(trainer.raw.eval(), probe)
        return output.metrics["pair_accuracy"].total / 12, float(output.loss) / 12

    before = accuracy_and_loss()
    result = trainer.fit()
    after = accuracy_and_loss()
    assert after[1] < before[1] - 0.1 and after[0] >= 0.9, (before, after)
    assert result.history[-1]["reward_margin"] > 0
    # The head is checkpointed with the backbone: a fresh trainer resumes it.
    fresh = RewardObjective(model.config.d_model)
    restored = Trainer(tiny_gpt(), fresh, pair_batches(), config, run_dir=tmp_path)
    restored.load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(fresh.head.weight, objective.head.weight)


def test_the_hf_export_gives_the_same_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt(seed=3).eval()
    head = torch.nn.Linear(model.config.d_model, 1, bias=False)
    torch.nn.init.normal_(head.weight)
    directory = export_reward_model(model, head, None, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    batch = collate_pairs(token_pairs(24)[:5], pad_id=config["pad_token_id"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = reward_scores(model, head, ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours.std() > 0


def test_align_reward_end_to_end(tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    args = ["align", "reward", "model=nano", f"tokenizer={tokenizer_dir}", f"pairs={pairs}", f"out_dir={tmp_path}",
            "name=rm", "seq_len=64", "batch_size=4", "max_steps=8", "lr=3e-3", "warmup_steps=0", "log_interval=1",
            "eval_interval=4", "checkpoint_interval=4", "val_pairs=8", "progress=false"]
    assert cli.main(args) == 0
    run = tmp_path / "rm"
    report = json.loads((run / "report.json").read_text())
    assert report["after"]["val_loss"] < report["before"]["val_loss"]
    assert "val_pair_accuracy" in report["after"]
    model, head, tokenizer = load_reward_model(run)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "hf-reward").eval()
    from lmforge.align.data import read_pairs, tokenize_pairs

    tokenized, _ = tokenize_pairs(read_pairs(pairs)[:4], tokenizer, 64)
    batch = collate_pairs(tokenized, pad_id=hf.config.pad_token_id)
    with torch.no_grad():
        ours = reward_scores(model.eval(), head, batch["input_ids"], batch["attention_mask"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
