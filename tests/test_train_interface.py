"""The generalised objective interface through the one Trainer: frozen models, prepare, own units
and denominators, extra trainable modules, objective state, resume, ctx.policy()."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.train import Trainer, TrainConfig
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints
from lmforge.train.losses import sequence_logprobs, token_logprobs
from lmforge.train.objectives import Mean, Objective, ObjectiveOutput

from train_support import VOCAB, StopAt, StopRun, parameters_of, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    settings = dict(max_steps=6, lr=5e-3, warmup_steps=0, log_interval=1, eval_interval=0, checkpoint_interval=0,
                    progress=False, batch_size=4)
    settings.update(overrides)
    return TrainConfig(**settings)


class PairBatches:
    """Pairs of sequences: 'chosen' counts up (learnable), 'rejected' is random; plus their prompts
    as strings (a non-tensor value the loop must pass through untouched)."""

    def __init__(self, pairs: int = 4, length: int = 12, seed: int = 0) -> None:
        self.pairs, self.length, self.seed, self.step = pairs, length, seed, 0

    def next_batch(self) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.step)
        self.step += 1
        start = torch.randint(0, VOCAB, (self.pairs, 1), generator=generator)
        chosen = (start + torch.arange(self.length)) % VOCAB
        rejected = torch.randint(0, VOCAB, (self.pairs, self.length), generator=generator)
        rejected[:, 0] = chosen[:, 0]
        return {"chosen": chosen, "rejected": rejected, "prompts": [f"pair {i}" for i in range(self.pairs)]}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def _sequence_logps(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[1:] | ids[0]) per row, through the model's forward: [B]."""
    logits = model(ids[:, :-1])
    return sequence_logprobs(token_logprobs(logits, ids[:, 1:]), torch.ones_like(ids[:, 1:]))


class ToyPairwise(Objective):
    """A DPO-shaped objective: the unit is a pair, reference log-probs come from a frozen model in
    `prepare`, the accuracy is per pair, the mean length per sequence (its own denominator), and
    a 'temperature' that grows every call is objective state that must survive a resume."""

    def __init__(self) -> None:
        self.calls = 0
        self.beta = 0.1
        self.seen_prompts: list[str] = []

    def setup(self, ctx) -> None:
        self.reference = ctx.frozen["reference"]
        assert not self.reference.training
        assert all(not p.requires_grad for p in self.reference.parameters())

    def prepare(self, batch, ctx):
        assert not torch.is_grad_enabled()
        self.seen_prompts.extend(batch["prompts"])
        batch["ref_chosen"] = _sequence_logps(self.reference, batch["chosen"])
        batch["ref_rejected"] = _sequence_logps(self.reference, batch["rejected"])
        return batch

    def units(self, batch) -> int:
        return batch["chosen"].shape[0]

    def tokens(self, batch) -> int:
        return batch["chosen"].numel() + batch["rejected"].numel()

    def __call__(self, model, batch) -> ObjectiveOutput:
        self.calls += 1
        margin = ((_sequence_logps(model, batch["chosen"]) - batch["ref_chosen"])
                  - (_sequence_logps(model, batch["rejected"]) - batch["ref_rejected"]))
        loss = -torch.nn.functional.logsigmoid(self.beta * margin).sum()
        sequences = 2 * batch["chosen"].shape[0]
        return ObjectiveOutput(loss, {"reward_accuracy": Mean((margin > 0).float().sum(), batch["chosen"].shape[0]),
                                      "length": Mean(float(batch["chosen"].numel() * 2), sequences),
                                      "margin": margin.detach().sum()})

    def state_dict(self) -> dict:
        return {"calls": self.calls, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.beta = state["calls"], state["beta"]


def _pairwise_trainer(run_dir, **overrides) -> Trainer:
    return Trainer(tiny_gpt(seed=1), ToyPairwise(), PairBatches(), _config(**overrides), run_dir=run_dir,
                   frozen_models={"reference": tiny_gpt(seed=1)})


def test_pairwise_objective_with_a_frozen_reference_trains_and_reports_its_own_denominators(tmp_path):
    trainer = _pairwise_trainer(tmp_path, max_steps=12)
    result = trainer.fit()
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"]
    assert first["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-4)
    assert last["reward_accuracy"] > 0.9 and first["reward_accuracy"] <= 1.0
    assert last["length"] == 12.0                  # per sequence, not per pair
    assert last["tokens_seen"] == 12 * 2 * 4 * 12  # the objective's own token count
    assert trainer.objective.seen_prompts[:2] == ["pair 0", "pair 1"]   # strings reached prepare
    # The reference never moved: it is frozen, and not in the optimizer.
    assert all(torch.equal(a, b) for a, b in zip(trainer.ctx.frozen["reference"].state_dict().values(),
                                                 tiny_gpt(seed=1).state_dict().values()))


def test_pairwise_resume_is_exact_including_the_objective_state(tmp_path):
    straight = _pairwise_trainer(tmp_path / "straight")
    straight_result = straight.fit()
    stopped = _pairwise_trainer(tmp_path / "resumed", checkpoint_interval=3)
    stopped.hooks.append(StopAt(4))
    with pytest.raises(StopRun):
        stopped.fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [3]
    resumed = _pairwise_trainer(tmp_path / "resumed", checkpoint_interval=3)
    resumed_result = resumed.fit(resume_from=latest_checkpoint(tmp_path / "resumed"))
    assert resumed.objective.calls == straight.objective.calls == 6
    assert [row["loss"] for row in resumed_result.history] == [row["loss"] for row in straight_result.history[3:]]
    for name, value in parameters_of(straight.raw).items():
        assert torch.equal(value, parameters_of(resumed.raw)[name]), name


class ValueRegression(Objective):
    """A next-token loss plus a value head (an extra trained module) regressing the position
    index from the final hidden states, which the model's forward returns."""

    extras_lr_scale = 2.0

    def __init__(self, d_model: int) -> None:
        self.head = nn.Linear(d_model, 1)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.head}

    def units(self, batch) -> int:
        return batch["input_ids"].numel()

    def __call__(self, model, batch) -> ObjectiveOutput:
        output = model(batch["input_ids"], return_output=True)
        target = torch.linspace(0, 1, batch["input_ids"].shape[1])[None].expand_as(batch["input_ids"])
        value_error = (self.head(output.hidden_states)[..., 0] - target).square()
        lm = -token_logprobs(output.logits[:, :-1], batch["input_ids"][:, 1:]).sum()
        return ObjectiveOutput(lm + value_error.sum(), {"value_error": value_error.detach().sum()})


class CountBatches:
    def __init__(self) -> None:
        self.step = 0

    def next_batch(self) -> dict:
        generator = torch.Generator().manual_seed(self.step)
        self.step += 1
        start = torch.randint(0, VOCAB, (4, 1), generator=generator)
        return {"input_ids": (start + torch.arange(10)) % VOCAB}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def _value_trainer(run_dir, **overrides) -> Trainer:
    torch.manual_seed(5)
    return Trainer(tiny_gpt(seed=2), ValueRegression(64), CountBatches(), _config(**overrides), run_dir=run_dir)


def test_extra_module_is_optimised_at_its_own_lr_checkpointed_and_resumed_exactly(tmp_path):
    straight = _value_trainer(tmp_path / "straight", max_steps=8, lr=1e-2)
    initial_head = {k: v.clone() for k, v in straight.extras.state_dict().items()}
    result = straight.fit()
    assert result.history[-1]["value_error"] < result.history[0]["value_error"]
    assert not torch.equal(straight.extras["value_head"].weight, initial_head["value_head.weight"])
    scales = sorted(group.get("lr_scale", 1.0) for group in straight.optimizer.param_groups)
    assert scales == [1.0, 1.0, 2.0, 2.0]
    head_groups = [g for g in straight.optimizer.param_groups if g.get("lr_scale") == 2.0]
    assert all(g["lr"] == pytest.approx(2 * result.history[-1]["lr"]) for g in head_groups)
    assert (result.checkpoint / "extras.safetensors").is_file()

    stopped = _value_trainer(tmp_path / "resumed", max_steps=8, lr=1e-2, checkpoint_interval=4)
    stopped.hooks.append(StopAt(5))
    with pytest.raises(StopRun):
        stopped.fit()
    resumed = _value_trainer(tmp_path / "resumed", max_steps=8, lr=1e-2, checkpoint_interval=4)
    resumed.fit(resume_from=latest_checkpoint(tmp_path / "resumed"))
    for name, value in straight.extras.state_dict().items():
        assert torch.equal(value, resumed.extras.state_dict()[name]), name
    for name, value in parameters_of(straight.raw).items():
        assert torch.equal(value, parameters_of(resumed.raw)[name]), name


def test_ctx_policy_gives_the_live_weights_in_eval_mode_and_restores_training(tmp_path):
    trainer = Trainer(tiny_gpt(), ValueRegression(64), CountBatches(), _config(max_steps=2, ema_decay=0.5),
                      run_dir=tmp_path)
    trainer.fit()
    trainer.raw.train()
    live = parameters_of(trainer.raw)
    with trainer.ctx.policy() as policy:
        assert not policy.training and not torch.is_grad_enabled()
        assert all(torch.equal(p, live[name]) for name, p in policy.named_parameters())
    assert trainer.raw.training
    with trainer.eval_model() as evaluated:      # evaluation, by contrast, uses the EMA weights
        assert any(not torch.equal(p, live[name]) for name, p in evaluated.named_parameters())


def test_the_engine_leaves_the_callers_model_in_its_mode():
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    class Bytes:
        eot_id = None

        def encode(self, text, allow_special=True):
            return [ord(c) % VOCAB for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

        def id_to_bytes(self, index):
            return chr(97 + index % 26).encode()

    model = tiny_gpt().train()
    result = Engine(model, Bytes(), max_batch_size=2).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3,
                                                                                             temperature=0))
    assert len(result[0].token_ids) == 3
    assert model.training and all(module.training for module in model.modules())


def test_a_partly_frozen_model_keeps_its_frozen_weights_in_checkpoints(tmp_path):
    """Only a checkpoint that names its base (LoRA) leaves the frozen weights out; a model with some
    weights frozen by hand still checkpoints them, so the checkpoint loads on its own."""
    from lmforge.model.loading import load

    model = tiny_gpt()
    model.transformer.embed_tokens.weight.requires_grad_(False)
    result = Trainer(model, ValueRegression(64), CountBatches(), _config(max_steps=2, checkpoint_interval=2),
                     run_dir=tmp_path).fit()
    loaded, _ = load(result.checkpoint)
    torch.testing.assert_close(loaded.transformer.embed_tokens.weight, model.transformer.embed_tokens.weight)
