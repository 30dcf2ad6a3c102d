"""Distillation losses: GKD's generalised JSD equals TRL 1.16's GKDTrainer.generalized_jsd_loss, and
forward / reverse KL equal torch's F.kl_div and the definition written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.losses import forward_kl, generalized_jsd, kl_divergence, reverse_kl


def _logits(seed: int = 0, shape=(2, 5, 11)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    if labels.dim() == 2:
        labels[0, :2] = -100        # prompt positions: not trained
        labels[1, -1] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_equals_trls_gkd_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = _logits()
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    mask = labels != -100
    ours = generalized_jsd(student[mask], teacher[mask], beta=beta, temperature=temperature)   # [N]
    assert ours.shape == (int(mask.sum()),)
    # TRL's "batchmean" is the sum over trained positions divided by their number.
    torch.testing.assert_close(ours.sum() / mask.sum(), expected.float(), rtol=1e-5, atol=1e-6)
    # Per position too (TRL's reduction="none" keeps [N, V]: summed over the vocabulary).
    per_position = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                                   temperature=temperature, reduction="none").sum(-1)
    torch.testing.assert_close(ours, per_position.float(), rtol=1e-5, atol=1e-6)


def test_gradients_equal_trls_too():
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = _logits(seed=3)
    mask = labels != -100
    ours_input = student.clone().requires_grad_(True)
    trl_input = student.clone().requires_grad_(True)
    (generalized_jsd(ours_input[mask], teacher[mask], beta=0.5).sum() / mask.sum()).backward()
    GKDTrainer.generalized_jsd_loss(trl_input, teacher, labels=labels, beta=0.5).backward()
    torch.testing.assert_close(ours_input.grad, trl_input.grad, rtol=1e-4, atol=1e-7)


def test_forward_and_reverse_kl_equal_torch_and_the_definition():
    student, teacher, _ = _logits(seed=1, shape=(7, 13))
    for temperature in (1.0, 2.5):
        log_s = F.log_softmax(student / temperature, dim=-1)
        log_t = F.log_softmax(teacher / temperature, dim=-1)
        # F.kl_div(input=log q, target=log p, log_target) = sum p (log p - log q) = KL(p || q)
        torch.testing.assert_close(forward_kl(student, teacher, temperature),
                                   F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).float())
        torch.testing.assert_close(reverse_kl(student, teacher, temperature),
                                   F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1).float())
    # By hand, on a two-token vocabulary: p = (0.8, 0.2), q = (0.5, 0.5).
    p = torch.tensor([[math.log(0.8), math.log(0.2)]])
    q = torch.tensor([[0.0, 0.0]])
    assert kl_divergence(p, q).item() == pytest.approx(0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5))
    assert forward_kl(q, p).item() == pytest.approx(kl_divergence(p, q).item())      # teacher p, student q
    assert reverse_kl(q, p).item() == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))


def test_divergences_are_zero_only_when_the_distributions_agree():
    student, teacher, _ = _logits(seed=2, shape=(6, 9))
    for beta in (0.0, 0.5, 1.0):
        assert torch.allclose(generalized_jsd(teacher, teacher + 3.0, beta=beta), torch.zeros(6), atol=1e-6)
        assert (generalized_jsd(student, teacher, beta=beta) > 1e-4).all()
    # The JSD is bounded by log 2 (beta = 0.5 in GKD's convention is half the classic symmetric JSD's 2x).
    assert (generalized_jsd(student * 50, teacher * 50, beta=0.5) <= math.log(2) + 1e-6).all()
    # Works on bf16 logits and returns fp32.
    assert generalized_jsd(student.bfloat16(), teacher.bfloat16()).dtype == torch.float32
