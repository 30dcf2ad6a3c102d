"""AdamW from scratch vs torch, parameter groups, LR schedules, EMA."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lmforge.train.config import TrainConfig
from lmforge.train.ema import EMA
from lmforge.train.optim import AdamW, build_optimizer, clip_grad_norm, parameter_groups
from lmforge.train.schedule import LRSchedule

from train_support import tiny_bert, tiny_gpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(optimizer_cls, steps: int = 7, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    optimizer = optimizer_cls(groups, **kwargs)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (step + 1) / steps     # a changing lr, as a schedule does
        x = torch.randn(4, 5, generator=data)
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_is_bit_identical_to_torch(foreach):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours, ours_optimizer = _run(AdamW, foreach=foreach, **kwargs)
    reference, reference_optimizer = _run(torch.optim.AdamW, foreach=False, **kwargs)
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ours_optimizer.state.values(), reference_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 7
    # Not a no-op: the parameters moved.
    torch.manual_seed(0)
    untouched = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    assert not torch.allclose(untouched[0].weight, ours[0].weight)


def test_adamw_state_loads_into_torch_and_back():
    """Our state continues in torch's AdamW (and torch's in ours) exactly as it would in its own."""
    def continue_with(optimizer_cls, source_model, source_optimizer, steps: int = 3):
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        model.load_state_dict(source_model.state_dict())
        groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
                  {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
        kwargs = {"foreach": False} if optimizer_cls is torch.optim.AdamW else {}
        optimizer = optimizer_cls(groups, lr=1e-2, betas=(0.9, 0.95), **kwargs)
        # A deep copy: load_state_dict keeps the given tensors, which the steps below change in place.
        optimizer.load_state_dict(copy.deepcopy(source_optimizer.state_dict()))
        data = torch.Generator().manual_seed(2)
        for _ in range(steps):
            model(torch.randn(4, 5, generator=data)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return model

    ours_model, ours_optimizer = _run(AdamW, steps=3, lr=1e-2, betas=(0.9, 0.95))
    in_torch = continue_with(torch.optim.AdamW, ours_model, ours_optimizer)
    in_ours = continue_with(AdamW, ours_model, ours_optimizer)
    for a, b in zip(in_torch.parameters(), in_ours.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(in_ours[0].weight, ours_model[0].weight)        # the steps did move it
    torch_model, torch_optimizer = _run(torch.optim.AdamW, steps=3, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for a, b in zip(continue_with(AdamW, torch_model, torch_optimizer).parameters(), in_ours.parameters()):
        assert torch.equal(a, b)


def test_fused_adamw_matches_closely():
    ours, _ = _run(AdamW, lr=1e-2)
    fused, _ = _run(torch.optim.AdamW, lr=1e-2, fused=True)
    for a, b in zip(ours.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_build_optimizer_choices():
    model = tiny_gpt()
    assert type(build_optimizer(model, TrainConfig(optimizer="adamw"))) is AdamW
    assert type(build_optimizer(model, TrainConfig(optimizer="torch"))) is torch.optim.AdamW
    fused = build_optimizer(model, TrainConfig(optimizer="fused"))
    assert fused.param_groups[0]["fused"] is True


@pytest.mark.parametrize("make_model", [tiny_gpt, tiny_bert])
def test_no_weight_decay_on_norms_biases_and_embeddings(make_model):
    model = make_model()
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.embed_tokens.weight" in skipped                 # embeddings (and the tied head)
    assert all("norm" in name or name.endswith("bias") or "embed" in name for name in skipped)
    assert all(model.get_parameter(name).ndim == 2 and "embed" not in name for name in decayed)
    assert any("attn" in name for name in decayed) and any("norm" in name for name in skipped)
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_cosine_schedule_values():
    schedule = LRSchedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10)
    assert schedule.lr_at(0, 110) == pytest.approx(0.1)                  # (0 + 1) / 10
    assert schedule.lr_at(4, 110) == pytest.approx(0.5)
    assert schedule.lr_at(9, 110) == pytest.approx(1.0)                  # warmup ends at the peak
    assert schedule.lr_at(10, 110) == pytest.approx(1.0)
    assert schedule.lr_at(60, 110) == pytest.approx(0.55)                # halfway: (1 + 0.1) / 2
    assert schedule.lr_at(35, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert schedule.lr_at(110, 110) == pytest.approx(0.1)
    assert schedule.lr_at(500, 110) == pytest.approx(0.1)                # past the end: min_lr


def test_wsd_and_constant_schedule_values():
    wsd = LRSchedule("wsd", lr=1.0, min_lr=0.0, warmup_steps=10, decay_fraction=0.2)
    assert wsd.lr_at(5, 100) == pytest.approx(0.6)
    assert wsd.lr_at(10, 100) == wsd.lr_at(79, 100) == 1.0              # stable until 80
    assert wsd.lr_at(80, 100) == pytest.approx(1.0)
    assert wsd.lr_at(90, 100) == pytest.approx(0.5)
    assert wsd.lr_at(100, 100) == pytest.approx(0.0)
    constant = LRSchedule("constant", lr=2.0, min_lr=0.0, warmup_steps=4)
    assert [constant.lr_at(s, 100) for s in (0, 3, 4, 99)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    assert LRSchedule("constant", lr=2.0, warmup_steps=0).lr_at(0, 10) == 2.0


def test_ema_follows_its_formula_and_swaps_for_evaluation():
    model = nn.Linear(3, 2)
    start = model.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    expected = start.clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    raw = model.weight.detach().clone()
    assert not torch.allclose(raw, expected)
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), raw)                       # the training weights are back


@pytest.mark.parametrize("max_norm", [0.5, 1e3, 0.0])
def test_global_norm_clipping_equals_torch(max_norm):
    def grads(seed: int) -> list[nn.Parameter]:
        generator = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (7,), (2, 2, 2))]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 3
        return params

    ours, reference = grads(0), grads(0)
    norm = clip_grad_norm(ours, max_norm)
    expected = (torch.nn.utils.clip_grad_norm_(reference, max_norm) if max_norm > 0
                else torch.nn.utils.get_total_norm([p.grad for p in reference]))
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours]))
    if max_norm == 0.5:
        torch.testing.assert_close(after, torch.tensor(0.5), atol=1e-4, rtol=0)   # clipped to max_norm
    else:
        torch.testing.assert_close(after, norm)                                  # left as it was
