"""GRPO, RLOO and PPO losses against TRL 1.16's formulas, written out here term for term as its
trainers compute them (GRPOTrainer._compute_loss / _generate_and_score_completions, RLOOTrainer,
PPOTrainer.train), on fixed inputs."""
from __future__ import annotations

import pytest
import torch
from trl.trainer.utils import nanstd

from lmforge.train import losses


def _padded(seed: int = 0, rows: int = 6, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:rows]
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()          # [B, T] completion mask
    logps = -torch.rand(rows, width, generator=g) * 3
    old = logps + 0.3 * torch.randn(rows, width, generator=g)
    ref = logps + 0.2 * torch.randn(rows, width, generator=g)
    advantages = torch.randn(rows, generator=g)
    return mask, logps, old, ref, advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.9, 0.1, 0.0])
    group = 4
    mean = rewards.view(-1, group).mean(dim=1).repeat_interleave(group)
    std = (nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group) if scale != "batch"
           else nanstd(rewards).expand_as(rewards))
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    ours, zero_std = losses.group_advantages(rewards, group, scale)
    torch.testing.assert_close(ours, expected)
    assert zero_std.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_leave_one_out_advantages_equal_trls_rloo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.4])
    grouped = rewards.view(-1, 4)
    baselines = ((grouped.sum(dim=1, keepdim=True) - grouped) / 3).view(-1)
    torch.testing.assert_close(losses.leave_one_out_advantages(rewards, 4), rewards - baselines)


def test_k3_and_clipped_surrogate_equal_grpos_per_token_loss():
    mask, logps, old, ref, advantages = _padded()
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
    expected = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None]) + beta * per_token_kl
    ours, clipped = losses.clipped_surrogate(logps, old, advantages[:, None], eps_low, eps_high)
    torch.testing.assert_close(ours + beta * losses.k3_kl(logps, ref), expected)
    is_low = (coef_1 < 1 - eps_low) & (advantages[:, None] < 0)
    is_high = (coef_1 > 1 + eps_high) & (advantages[:, None] > 0)
    assert torch.equal(clipped, is_low | is_high)            # TRL's clip_ratio counts the same tokens


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregations_equal_trls_for_one_micro_batch(loss_type):
    mask, logps, old, _, advantages = _padded(1)
    per_token = -torch.min(torch.exp(logps - old) * advantages[:, None],
                           torch.clamp(torch.exp(logps - old), 0.8, 1.2) * advantages[:, None])
    max_completion_length = 7
    if loss_type == "grpo":
        expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        expected = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        expected = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:   # dapo: num_items_in_batch = the completion tokens (one process, one accumulation step)
        expected = (per_token * mask).sum() / mask.sum()
    selected = mask.bool()
    rows = selected.nonzero()[:, 0]
    loss_sum, units = losses.aggregate_token_losses(per_token[selected], rows, mask.shape[0], loss_type,
                                                    max_completion_length)
    # The Trainer divides the step's summed losses by its summed units.
    torch.testing.assert_close(loss_sum / units, expected)


def _trl_gae(rewards, values, gamma, lam):
    """PPOTrainer.train's loop, as written there (values and rewards already 0 on padding)."""
    lastgaelam, reversed_ = 0, []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], dim=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_equals_trls_reversed_loop(gamma, lam):
    mask, logps, _, _, _ = _padded(2)
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(mask.shape, generator=g) * mask, torch.randn(mask.shape, generator=g) * mask
    expected_advantages, expected_returns = _trl_gae(rewards, values, gamma, lam)
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, expected_returns * mask, atol=1e-5, rtol=1e-5)


def test_gae_ignores_a_prompt_before_the_completion():
    # Label-aligned rows: the completion starts after a prompt whose entries must not leak in.
    rewards, values = torch.tensor([[9.0, 9.0, 0.0, 1.0, 0.0]]), torch.tensor([[5.0, 5.0, 0.5, 0.2, 0.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    advantages, _ = losses.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.0, 0.5, 0.8, 0.0]]))


def test_whiten_equals_trls_masked_whiten():
    mask, logps, _, _, _ = _padded(4)
    mean = (logps * mask).sum() / mask.sum()
    variance = (((logps - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    expected = (logps - mean) * torch.rsqrt(variance + 1e-8)
    torch.testing.assert_close(losses.whiten(logps, mask), expected * mask)
    torch.testing.assert_close(losses.whiten(logps, mask, shift_mean=False), (expected + mean) * mask)


def test_clipped_value_loss_equals_ppo_trainers():
    g = torch.Generator().manual_seed(5)
    values, old, returns = torch.randn(20, generator=g), torch.randn(20, generator=g), torch.randn(20, generator=g)
    clipped = torch.clamp(values, old - 0.2, old + 0.2)
    loss1, loss2 = (values - returns) ** 2, (clipped - returns) ** 2
    ours, was_clipped = losses.clipped_value_loss(values, old, returns, 0.2)
    torch.testing.assert_close(ours, 0.5 * torch.max(loss1, loss2))
    assert torch.equal(was_clipped, loss2 > loss1)


def test_ppo_policy_loss_is_trls_max_of_negated_terms():
    mask, logps, old, _, advantages = _padded(6)
    ratio = torch.exp(logps - old)
    a = advantages[:, None]
    trl = torch.max(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2))
    torch.testing.assert_close(losses.clipped_surrogate(logps, old, a, 0.2, 0.2)[0], trl)


def test_adaptive_kl_controller_moves_toward_its_target_and_fixed_does_not():
    from lmforge.align.ppo import KLController

    adaptive, fixed = KLController(0.1, adaptive=True, target=6.0, horizon=100), KLController(0.1)
    adaptive.update(12.0, 10)                # KL twice the target: +0.2 (clipped) x 10/100
    fixed.update(12.0, 10)
    assert adaptive.value == pytest.approx(0.1 * 1.02) and fixed.value == 0.1
    adaptive.update(3.0, 10)                 # half the target: -0.2 (clipped) x 10/100
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
