"""The training loop on lmforge's real GPT/BERT: learning, gradient accumulation, precision, stops."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.eval import evaluate_objective
from lmforge.train import CausalLMObjective, MaskedLMObjective, NonFiniteLossError, Objective, Trainer, TrainConfig
from lmforge.train.checkpoint import list_checkpoints, load_trainer_state

from train_support import CountingBatches, SplitBatches, parameters_of, tiny_bert, tiny_gpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    settings = dict(max_steps=4, lr=3e-3, warmup_steps=2, log_interval=1, eval_interval=0,
                    checkpoint_interval=0, progress=False, peak_flops=1e12)
    settings.update(overrides)
    return TrainConfig(**settings)


def _evaluate(model: torch.nn.Module) -> dict[str, float]:
    source = CountingBatches(8, 16, seed=99)
    return evaluate_objective(model, CausalLMObjective(), [source.next_batch() for _ in range(2)])


def test_loss_falls_and_everything_is_logged(tmp_path):
    config = _config(max_steps=30, lr=1e-2, warmup_steps=3, log_interval=10, eval_interval=15,
                     checkpoint_interval=15)
    result = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(8, 16), config, run_dir=tmp_path,
                     evaluate=_evaluate, flops_per_token=1e5).fit()
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 1 and last["step"] == 30
    assert last["loss"] < first["loss"] - 1.5, (first["loss"], last["loss"])
    assert result.eval_metrics["val_loss"] < first["loss"] - 1.5
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "accuracy"):
        assert key in last and last[key] == last[key], key      # present and not NaN
    assert last["tokens_seen"] == 30 * 8 * 16
    assert {"val_loss", "val_ppl", "val_accuracy"} <= set(result.eval_metrics)
    assert result.eval_metrics["val_ppl"] == pytest.approx(torch.tensor(result.eval_metrics["val_loss"]).exp().item())
    assert [step for step, _ in list_checkpoints(tmp_path)] == [15, 30]
    assert (tmp_path / "model.safetensors").is_file() and json.loads((tmp_path / "config.json").read_text())["arch"] == "gpt"
    assert result.stop_reason == "max_steps" and result.best["step"] in (15, 30)


def test_batch_8_equals_batch_1_times_accumulation_8_with_padding(tmp_path):
    """The loss is normalised by the predicted tokens of the whole step, so splitting a padded batch
    into micro-batches does not change the update (per-micro-batch means would weight rows unequally)."""
    config = _config(max_steps=2, lr=1e-2, warmup_steps=0, grad_clip=0.5, weight_decay=0.1)
    initial = parameters_of(tiny_gpt())
    whole = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(8, 24, padded=True),
                    _config(**{**config.__dict__, "batch_size": 8, "grad_accum": 1}), run_dir=tmp_path / "a")
    split = Trainer(tiny_gpt(), CausalLMObjective(), SplitBatches(CountingBatches(8, 24, padded=True), 1),
                    _config(**{**config.__dict__, "batch_size": 1, "grad_accum": 8}), run_dir=tmp_path / "b")
    whole_result, split_result = whole.fit(), split.fit()
    for name, start in initial.items():
        moved = whole.raw.get_parameter(name).detach() - start
        assert moved.abs().max() > 1e-4
        # Adam divides by sqrt(v): float rounding in the gradients shows up at ~1e-4 of the step size
        # (the fused output layer scales its gradient after the matmul: one element of 24,576 moved 1.5e-5).
        torch.testing.assert_close(split.raw.get_parameter(name).detach() - start, moved, rtol=1e-3, atol=2e-5)
    for row_whole, row_split in zip(whole_result.history, split_result.history):
        assert row_whole["loss"] == pytest.approx(row_split["loss"], rel=1e-5)
        assert row_whole["grad_norm"] == pytest.approx(row_split["grad_norm"], rel=1e-4)


class _MaskedRepeats:
    """Masked-LM batches where every row repeats one random token. Of the chosen positions half
    become the mask id 1 and half keep their token (BERT keeps some, so that the model must
    predict every position); labels are -100 elsewhere."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len, self.step = batch_size, seq_len, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.step)
        self.step += 1
        tokens = torch.randint(2, 64, (self.batch_size, 1), generator=generator).expand(-1, self.seq_len)
        roll = torch.rand(tokens.shape, generator=generator)
        chosen, masked = roll < 0.3, roll < 0.15
        return {"input_ids": tokens.masked_fill(masked, 1), "labels": tokens.masked_fill(~chosen, -100)}

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def test_masked_lm_objective_trains_bert(tmp_path):
    held_out = _MaskedRepeats(16, 16)
    held_out.step = 10_000
    eval_batches = [held_out.next_batch() for _ in range(2)]

    def evaluate(model):
        return evaluate_objective(model, MaskedLMObjective(), eval_batches)

    model = tiny_bert()
    before = evaluate(model.eval())
    result = Trainer(model, MaskedLMObjective(), _MaskedRepeats(8, 16), _config(max_steps=40, lr=5e-3, log_interval=10),
                     run_dir=tmp_path, evaluate=evaluate).fit()
    assert result.eval_metrics["val_loss"] < before["val_loss"] - 0.4
    # The masked-token accuracy rose with the loss falling (random init: about 1 / vocabulary).
    assert result.eval_metrics["val_mlm_accuracy"] > before["val_mlm_accuracy"] + 0.01


def test_objectives_return_sums_over_predicted_tokens():
    from lmforge.model.gpt import CausalLMOutput
    from lmforge.train.objectives import SFTObjective

    logits = torch.randn(2, 3, 5)

    class Fixed(torch.nn.Module):
        """The GPT forward contract (return_output, logits_mask) and BERT's (return_aux) on fixed logits."""

        def forward(self, input_ids, attention_mask=None, logits_mask=None, return_output=False, return_aux=False):
            selected = logits if logits_mask is None else logits[logits_mask]
            if return_aux:
                return selected, None
            return CausalLMOutput(selected, torch.zeros(2, 3, 4), None) if return_output else selected

    labels = torch.tensor([[1, -100, 4], [-100, -100, 2]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": labels}
    # fused_loss=False: this model has logits only (the fused output layer + loss is checked against
    # this unfused path in test_train_losses_and_forward.py).
    for objective, accuracy in ((CausalLMObjective(fused_loss=False), "accuracy"), (MaskedLMObjective(), "mlm_accuracy"),
                                (SFTObjective(fused_loss=False), "accuracy")):
        output = objective(Fixed(), batch)
        kept = labels != -100
        expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum")
        assert objective.units(batch) == 3
        torch.testing.assert_close(output.loss, expected)
        assert output.metrics[accuracy] == (logits.argmax(-1)[kept] == labels[kept]).sum()


def test_bf16_autocast_and_activation_checkpointing_run(tmp_path):
    plain = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 16), _config(max_steps=2), run_dir=tmp_path / "a")
    checkpointed = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 16),
                           _config(max_steps=2, activation_checkpointing=True), run_dir=tmp_path / "b")
    assert checkpointed.raw.transformer.gradient_checkpointing
    plain.fit(), checkpointed.fit()
    # Recomputing activations in backward gives the same gradients, hence the same weights.
    for (name, a), b in zip(plain.raw.named_parameters(), checkpointed.raw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    bf16 = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 16), _config(max_steps=3, precision="bf16"),
                   run_dir=tmp_path / "c")
    result = bf16.fit()
    assert all(param.dtype == torch.float32 for param in bf16.raw.parameters())   # fp32 master weights
    assert abs(result.history[-1]["loss"] - plain.history[-1]["loss"]) < 0.5


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(2, 8), _config(precision="fp16", device="cpu"),
                run_dir=tmp_path)


class _NaNAtCall(Objective):
    """The causal-LM objective, except the loss of the n-th call is NaN (a numerical blow-up)."""

    def __init__(self, nan_call: int) -> None:
        self.inner, self.calls, self.nan_call = CausalLMObjective(), 0, nan_call

    def units(self, batch):
        return self.inner.units(batch)

    def __call__(self, model, batch):
        self.calls += 1
        output = self.inner(model, batch)
        if self.calls == self.nan_call:
            output.loss = output.loss * float("nan")
        return output


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(tiny_gpt(), _NaNAtCall(nan_call=3), CountingBatches(4, 8),
                      _config(max_steps=10, checkpoint_interval=2), run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit()
    message = str(error.value)
    assert "nan at step 3" in message and "step-000002" in message
    assert isinstance(error.value, UserError)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert load_trainer_state(tmp_path / "checkpoints" / "step-000002")["step"] == 2
    assert trainer.history[-1]["step"] == 3 and trainer.history[-1]["loss"] != trainer.history[-1]["loss"]


def test_time_budget_stops_cleanly_with_eval_and_checkpoint(tmp_path):
    config = _config(max_steps=None, max_minutes=0.02, warmup_steps=1, log_interval=50)
    result = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 16), config, run_dir=tmp_path,
                     evaluate=_evaluate).fit()
    assert result.stop_reason == "time_budget"
    # The budget is 1.2 s; the run stops at the first step boundary past it (however loaded the machine).
    assert result.elapsed_seconds >= 1.2 and result.step > 1
    step_rows = [row for row in result.history if "elapsed_s" in row]
    assert step_rows[-1]["elapsed_s"] >= 1.2
    assert "val_loss" in result.eval_metrics and result.history[-1]["step"] == result.step
    assert list_checkpoints(tmp_path)[-1][0] == result.step
    # The schedule decayed toward min_lr as the budget ran out (its horizon was estimated).
    assert result.history[-1]["lr"] < config.lr


def test_hooks_see_every_step(tmp_path):
    seen = []

    class Recorder:
        def on_step_end(self, trainer, step, row):
            seen.append(step)

        def on_train_end(self, trainer, step):
            seen.append(("end", step))

    Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(2, 8), _config(max_steps=3), run_dir=tmp_path,
            hooks=[Recorder()]).fit()
    assert seen == [1, 2, 3, ("end", 3)]


def test_peak_flops_is_measured_once_and_cached(tmp_path, monkeypatch):
    from lmforge.train import throughput

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = throughput.peak_flops(torch.device("cpu"), "fp32")
    assert measured > 1e8 and (tmp_path / "lmforge" / "peak.json").is_file()

    def must_not_measure(*args, **kwargs):
        raise AssertionError("the cached peak should be used")

    monkeypatch.setattr(throughput, "measure_matmul_flops", must_not_measure)
    assert throughput.peak_flops(torch.device("cpu"), "fp32") == measured
    assert throughput.peak_flops(torch.device("cpu"), "fp32", configured=5e12) == 5e12


def test_evaluation_and_export_use_the_ema_weights(tmp_path):
    seen = []

    def evaluate(model):
        seen.append(model.get_parameter("transformer.final_norm.weight").detach().clone())
        return {"val_loss": 1.0}

    trainer = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 16), _config(max_steps=6, ema_decay=0.9),
                      run_dir=tmp_path, evaluate=evaluate)
    trainer.fit()
    ema_weight = trainer.ema.shadow["transformer.final_norm.weight"]
    raw_weight = trainer.raw.get_parameter("transformer.final_norm.weight").detach()
    assert not torch.allclose(ema_weight, raw_weight)
    assert torch.equal(seen[-1], ema_weight)                 # evaluated with the EMA...
    from lmforge.train.checkpoint import load_tensors

    assert torch.equal(load_tensors(tmp_path / "model.safetensors")["transformer.final_norm.weight"], ema_weight)
    assert torch.equal(load_tensors(tmp_path / "checkpoints" / "step-000006" / "ema.safetensors")[
        "transformer.final_norm.weight"], ema_weight)
    assert trainer.raw.training                              # ...and back to the raw weights in train mode
