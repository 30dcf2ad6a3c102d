"""Toolformer's filter: the weighted loss of the tokens after a call, and keeping a call only when
its result lowers that loss by tau. A bigram model with hand-set logits gives known losses."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.labs.toolformer import (ToolformerConfig, continuation_losses, final_answer, keep_calls,
                                     toolformer_weights, weighted_continuation_loss)

V = 10
ANSWER, HELPFUL_RESULT, USELESS_RESULT, CALL_END, TEXT = 7, 5, 6, 4, 3


class Bigram(torch.nn.Module):
    """logits[t] depend on token t only: after HELPFUL_RESULT the answer is certain, else uniform."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(V, V)
        table[HELPFUL_RESULT, ANSWER] = 50.0
        table[ANSWER, ANSWER] = 50.0    # and the answer's second token (also ANSWER) too
        self.table = torch.nn.Parameter(table)

    def forward(self, ids: torch.Tensor, attention_mask=None, logits_mask=None) -> torch.Tensor:
        logits = self.table[ids]
        return logits if logits_mask is None else logits[logits_mask]   # GPT's contract: [N, V] there only


def test_weights_are_toolformers_and_normalised():
    assert torch.allclose(toolformer_weights(7), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0]) / 3.0)
    assert toolformer_weights(1).tolist() == [1.0]


def test_weighted_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))   # [1, 2, 2]
    targets = torch.tensor([[0, 1]])
    weights = torch.tensor([[1.0, 0.8]])
    expected = (1.0 * -math.log(0.5) + 0.8 * -math.log(0.1)) / 1.8
    assert weighted_continuation_loss(logits, targets, weights).item() == pytest.approx(expected, rel=1e-5)


def test_the_filter_keeps_a_call_that_helps_and_drops_one_that_does_not():
    model = Bigram()
    head = [1, 2, TEXT]
    answer = [ANSWER, ANSWER]
    prefixes = [head,                                          # no call
                head + [8, CALL_END],                          # call with an empty result: '[calc(e)→ ]'
                head + [8, HELPFUL_RESULT],                    # call whose result predicts the answer
                head + [8, USELESS_RESULT]]                    # call whose result does not
    losses = continuation_losses(model, prefixes, [answer] * 4, batch_size=3)   # padding across batches too
    uniform = math.log(V)
    # First answer token: uniform unless after HELPFUL_RESULT; the second follows ANSWER (certain).
    assert losses[0].item() == pytest.approx(uniform / 1.8, rel=1e-4)
    assert losses[2].item() == pytest.approx(0.0, abs=1e-4)
    assert losses[3].item() == pytest.approx(losses[0].item(), rel=1e-4)
    kept = keep_calls(losses[[0, 0]], losses[[1, 1]], losses[[2, 3]], tau=1.0)
    assert kept.tolist() == [True, False]
    # The threshold matters: the helpful call's gain is log(10)/1.8 ~ 1.28 nats.
    assert keep_calls(losses[[0]], losses[[1]], losses[[2]], tau=1.5).tolist() == [False]
    # L- is the minimum: a call that only helps through its (empty-result) call text is not credited.
    assert keep_calls(torch.tensor([2.0]), torch.tensor([0.1]), torch.tensor([0.05]), tau=1.0).tolist() == [False]


def test_batched_losses_equal_one_at_a_time():
    torch.manual_seed(0)
    model = Bigram()
    with torch.no_grad():
        model.table.normal_()
    prefixes = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    continuations = [[2, 3], [9, 1, 2, 3], [0]]
    together = continuation_losses(model, prefixes, continuations, batch_size=8)
    alone = torch.cat([continuation_losses(model, [p], [c]) for p, c in zip(prefixes, continuations)])
    assert torch.allclose(together, alone, atol=1e-6)
    # And equal to the pure loss on the full logits of one row.
    row = torch.tensor([prefixes[1] + continuations[1]])
    targets = torch.zeros_like(row)
    targets[0, 0:4] = torch.tensor(continuations[1])
    weights = torch.zeros(1, 5)
    weights[0, 0:4] = torch.tensor([1.0, 0.8, 0.6, 0.4]) / 2.8
    assert together[1].item() == pytest.approx(weighted_continuation_loss(model(row), targets, weights).item(), rel=1e-5)


def test_final_answer_reads_calls_as_their_results():
    assert final_answer("[calculator(141*365)→ 51465] 51465") == "51465"
    assert final_answer("[calculator(141*365)→ 51465]") == "51465"
    assert final_answer("The answer is 1,050.") == "1050"
    assert final_answer("no number") == "no number"


def test_config_validation():
    from lmforge.errors import UserError

    with pytest.raises(UserError, match="samples"):
        ToolformerConfig(samples=0).validate()


def test_recipes_load_and_unknown_keys_are_refused():
    from lmforge.errors import UserError
    from lmforge.labs.metaicl import load_metaicl_config
    from lmforge.labs.toolformer import load_toolformer_config

    assert load_toolformer_config("toolformer-smollm2", ["tau=0.5"]).tau == 0.5
    config = load_metaicl_config("metaicl-smollm2")
    assert config.shots == [0, 1, 4, 8] and "gcd" in config.eval_tasks and "gcd" not in config.train_tasks
    with pytest.raises(UserError, match="nope"):
        load_toolformer_config("toolformer-smollm2", ["nope=1"])


def test_a_second_lab_run_under_one_name_is_refused_before_any_work(tmp_path):
    """An earlier run's fine-tuning sub-run would stop a rerun minutes in; the lab refuses at once."""
    from lmforge.errors import UserError
    from lmforge.labs.metaicl import load_metaicl_config, run_metaicl
    from lmforge.labs.toolformer import load_toolformer_config, run_toolformer

    for name, load_config, run in (("tf", load_toolformer_config, run_toolformer),
                                   ("mi", load_metaicl_config, run_metaicl)):
        (tmp_path / name / f"{name}-sft").mkdir(parents=True)
        config = load_config(None, [f"out_dir={tmp_path}", f"name={name}", "model=no-such-model"])
        with pytest.raises(UserError, match="already exists"):
            run(config)
