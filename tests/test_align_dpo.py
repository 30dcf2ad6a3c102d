"""The DPO family through the one Trainer: each loss type improves its own objective on a tiny GPT;
the LoRA reference is the base with adapters off; the reference cache; `lmforge align dpo` end to
end (report, resume exactness with the objective's state); bad input; 2-process DDP."""
from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli
from lmforge.align.data import collate_pairs, read_pairs
from lmforge.align.preference import PreferenceObjective, adapters_disabled, response_logps
from lmforge.errors import UserError
from lmforge.train import Trainer, TrainConfig

from align_support import dpo_arguments, pair_batches, token_pairs, write_arithmetic_pairs
from train_support import make_shakespeare_shards, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]


def _config(**extra) -> TrainConfig:
    settings = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=0, checkpoint_interval=0, progress=False)
    settings.update(extra)
    return TrainConfig(**settings)


def _objective_value(objective, model, batch, ctx) -> float:
    batch = objective.prepare(dict(batch), ctx)
    with torch.no_grad():
        return float(objective(model, batch).loss) / objective.units(batch)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "orpo", "kto"])
def test_every_loss_type_improves_its_objective(loss_type, tmp_path):
    objective = PreferenceObjective(loss_type, beta=0.5, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    frozen = {} if loss_type in ("simpo", "orpo") else {"reference": tiny_gpt(seed=0)}
    trainer = Trainer(tiny_gpt(seed=0), objective, pair_batches(), _config(), run_dir=tmp_path, frozen_models=frozen)
    probe = collate_pairs(token_pairs(24)[:8], 0)
    before = _objective_value(objective, trainer.raw, probe, trainer.ctx)
    result = trainer.fit()
    after = _objective_value(objective, trainer.raw, probe, trainer.ctx)
    assert after < before - 0.02, (before, after)
    last = result.history[-1]
    assert last["reward_accuracy"] >= 0.75 and last["reward_margin"] > 0
    assert {"chosen_logps", "rejected_logps", "chosen_reward", "rejected_reward"} <= set(last)
    if loss_type == "sigmoid":       # policy == reference at the start: loss log 2, margins 0
        assert result.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_reference_logps_are_cached_once_and_saved_with_the_objective(tmp_path):
    calls = []
    objective = PreferenceObjective("sigmoid", beta=0.5)
    original = objective.reference_logps
    objective.reference_logps = lambda rows, ctx: calls.append(len(rows["pair_index"])) or original(rows, ctx)
    trainer = Trainer(tiny_gpt(), objective, pair_batches(n=8), _config(max_steps=6), run_dir=tmp_path,
                      frozen_models={"reference": tiny_gpt()})
    trainer.fit()
    assert sum(calls) == 8                      # 6 steps x 4 pairs over 8 pairs: each pair scored once
    state = objective.state_dict()
    assert state["ref_index"].tolist() == list(range(8)) and state["ref_logps"].shape == (8, 2)
    fresh = PreferenceObjective("sigmoid")
    fresh.load_state_dict(state)
    assert fresh.cache == objective.cache


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    from lmforge.peft.lora import LoRAConfig, apply_lora

    base = tiny_gpt(seed=0)
    model = apply_lora(tiny_gpt(seed=0), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    objective = PreferenceObjective("sigmoid", beta=0.5)
    trainer = Trainer(model, objective, pair_batches(), _config(max_steps=8, lr=1e-2), run_dir=tmp_path)
    trainer.fit()                                      # no frozen model: the base is the reference
    batch = collate_pairs(token_pairs(24)[:6], 0)
    with torch.no_grad():
        trained = response_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        with adapters_disabled(model):
            off = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        expected = response_logps(base.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    torch.testing.assert_close(off, expected)           # adapters off = the untouched base
    assert not torch.allclose(trained, expected)         # and the adapters did train
    cached = torch.tensor([objective.cache[i] for i in range(6)])
    torch.testing.assert_close(torch.cat([cached[:, 0], cached[:, 1]]), expected, rtol=1e-5, atol=1e-5)


def test_a_reference_free_loss_needs_no_model_but_dpo_does(tmp_path):
    with pytest.raises(UserError, match="needs a reference"):
        Trainer(tiny_gpt(), PreferenceObjective("sigmoid"), pair_batches(), _config(), run_dir=tmp_path)


def test_align_dpo_end_to_end_report_and_exact_resume(tokenizer_dir, tmp_path):
    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    assert cli.main(dpo_arguments(tokenizer_dir, pairs, tmp_path, "straight")) == 0
    run = tmp_path / "straight"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "report.json", "curves.png", "model.safetensors"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["before"]["val_loss"] == pytest.approx(0.6931, abs=1e-3)     # policy = reference
    assert report["after"]["val_loss"] < report["before"]["val_loss"]
    assert report["after"]["val_reward_accuracy"] > 0.5

    assert cli.main(dpo_arguments(tokenizer_dir, pairs, tmp_path, "resumed", max_steps=3)) == 0
    assert cli.main(dpo_arguments(tokenizer_dir, pairs, tmp_path, "resumed") + ["--resume"]) == 0
    straight, resumed = load_file(run / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = {r: [json.loads(line).get("loss") for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("straight", "resumed")}
    assert [x for x in losses["straight"] if x is not None] == [x for x in losses["resumed"] if x is not None]


def test_resume_restores_the_reference_cache(tmp_path):
    from lmforge.train.checkpoint import latest_checkpoint

    def trainer(max_steps):
        return Trainer(tiny_gpt(), PreferenceObjective("sigmoid", beta=0.5), pair_batches(n=12),
                       _config(max_steps=max_steps, checkpoint_interval=2), run_dir=tmp_path / "run",
                       frozen_models={"reference": tiny_gpt()})

    first = trainer(2)
    first.fit()
    second = trainer(4)
    second.load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert second.objective.cache == first.objective.cache and len(second.objective.cache) == 8


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "chosen": "a"}', r"pairs.jsonl:2: missing field rejected"),
    ('{"prompt": "hi", "chosen": 3, "rejected": "b"}', r"pairs.jsonl:2: 'chosen' must be"),
    ('not json', r"pairs.jsonl:2: not valid JSON"),
])
def test_a_bad_pair_file_is_one_clear_error_naming_the_line_and_writes_nothing(tokenizer_dir, tmp_path, capsys,
                                                                               line, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_pairs(pairs)
    assert cli.main(dpo_arguments(tokenizer_dir, pairs, tmp_path, "bad")) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_reference_with_another_vocabulary_is_refused_before_anything_is_written(tokenizer_dir, tmp_path, capsys):
    from lmforge.model import build_model, get_preset
    from lmforge.model.loading import save_pretrained

    other = tmp_path / "other"
    save_pretrained(build_model(get_preset("nano", vocab_size=77)), None, other)
    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    assert cli.main(dpo_arguments(tokenizer_dir, pairs, tmp_path, "bad", reference=other)) == 2
    assert "another vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_dpo_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from align_support import ddp_dpo_worker

    mp.spawn(ddp_dpo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = Trainer(tiny_gpt(seed=0), PreferenceObjective("sigmoid", beta=0.5), pair_batches(batch_size=4),
                     _config(max_steps=4), run_dir=tmp_path / "single", frozen_models={"reference": tiny_gpt(seed=0)})
    result = single.fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # One process runs each pair's prompt once (model/shared_prefix.py), the DDP ranks the plain
    # forward: the same sums in another order, so after 4 AdamW steps they agree to ~1e-6, not bitwise.
    for name, parameter in single.raw.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], parameter.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ranks[1]["params"][name], parameter.detach(), rtol=1e-5, atol=1e-5)
    assert ranks[0]["losses"] == pytest.approx([row["loss"] for row in result.history], rel=1e-5)
