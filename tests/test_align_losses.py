"""Preference losses (train/losses.py) against TRL 1.16 on fixed log-probs.

Where TRL has a callable (ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss, orpo's log1mexp) the
test calls it; where TRL computes a loss inline in `_compute_loss` (DPOTrainer, KTOTrainer,
RewardTrainer), the test repeats TRL's lines verbatim (trl/trainer/dpo_trainer.py 1.16.0,
"per_sequence_loss = ..."), so a change of definition on either side fails here.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.losses import (bradley_terry_loss, dpo_loss, kto_kl_estimate, kto_loss, log1mexp,
                                  odds_ratio_loss)

trl = pytest.importorskip("trl")


def fixed_logps(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    policy_c, policy_r, ref_c, ref_r = (-(torch.rand(n, generator=g, dtype=torch.float64) * 30 + 1) for _ in range(4))
    lengths_c = torch.randint(1, 40, (n,), generator=g).double()
    lengths_r = torch.randint(1, 40, (n,), generator=g).double()
    return policy_c, policy_r, ref_c, ref_r, lengths_c, lengths_r


def trl_dpo(loss_type, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len,
            beta, label_smoothing=0.0):
    """TRL 1.16 DPOTrainer._compute_loss (f_divergence_type reverse_kl), the per_sequence_loss lines."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    # completion_mask.chunk(2) rows: their sums are the response lengths
    chosen_mask_sum, rejected_mask_sum = chosen_len, rejected_len
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        chosen_avg_score = chosen_scores / chosen_mask_sum.clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask_sum.clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        return (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    if loss_type == "sigmoid_norm":
        chosen_avg_score = chosen_scores / chosen_mask_sum.clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask_sum.clamp(min=1.0)
        delta = chosen_avg_score - rejected_avg_score
        return -F.logsigmoid(beta * delta)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_match_trl(loss_type, beta):
    pc, pr, rc, rr, lc, lr = fixed_logps()
    smoothing = 0.2 if loss_type == "robust" else 0.0
    ours = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                    chosen_lengths=lc, rejected_lengths=lr)
    theirs = trl_dpo(loss_type, pc, pr, rc, rr, lc, lr, beta, smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.shape == (6,) and not torch.allclose(ours, ours[0].expand(6))   # per pair, not a constant


def test_dpo_gradients_match_trl():
    pc, pr, rc, rr, lc, lr = fixed_logps(seed=3)
    for loss_type in ("sigmoid", "ipo"):
        a, b = pc.clone().requires_grad_(), pc.clone().requires_grad_()
        dpo_loss(a, pr, rc, rr, loss_type=loss_type, beta=0.3, chosen_lengths=lc, rejected_lengths=lr).mean().backward()
        trl_dpo(loss_type, b, pr, rc, rr, lc, lr, 0.3).mean().backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_simpo_matches_trl_cpo_trainer():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, _, _, lc, lr = fixed_logps(seed=1)
    for smoothing in (0.0, 0.1):
        fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=smoothing,
                                     accelerator=types.SimpleNamespace(device="cpu"))
        # CPO's simpo is fed length-averaged log-probs (get_batch_logps(average_log_prob=True)).
        theirs, _, _ = CPOTrainer.cpo_loss(fake, pc / lc, pr / lr)
        zeros = torch.zeros_like(pc)
        ours = dpo_loss(pc, pr, zeros, zeros, loss_type="simpo", beta=2.0, label_smoothing=smoothing,
                        chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=0.7)
        torch.testing.assert_close(ours, theirs)


def test_odds_ratio_matches_trl_orpo_trainer():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    pc, pr, _, _, lc, lr = fixed_logps(seed=2)
    chosen, rejected = (pc / lc).float(), (pr / lr).float()       # ORPO uses average log-probs
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    losses, _, _, _, log_odds_mean = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    ours, log_odds = odds_ratio_loss(chosen, rejected, beta=0.25)
    # TRL's loss is nll - losses.mean(): our term is -losses.
    torch.testing.assert_close(ours, -losses)
    torch.testing.assert_close(log_odds.mean(), log_odds_mean)
    x = -torch.logspace(-6, 2, 50, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x))


def test_kto_matches_trl_kto_trainer():
    g = torch.Generator().manual_seed(4)
    logps, ref = -torch.rand(8, generator=g) * 20, -torch.rand(8, generator=g) * 20
    kl_logps, ref_kl_logps = -torch.rand(8, generator=g) * 20, -torch.rand(8, generator=g) * 20
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    beta, wd, wu = 0.1, 1.0, 1.33
    # TRL 1.16 KTOTrainer._compute_loss, loss_type "kto":
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_idx, rejected_idx = label.nonzero().view(-1), (~label).nonzero().view(-1)
    chosen_logratios = logps.index_select(0, chosen_idx) - ref.index_select(0, chosen_idx)
    rejected_logratios = logps.index_select(0, rejected_idx) - ref.index_select(0, rejected_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    theirs = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)

    ours_kl = kto_kl_estimate(kl_logps, ref_kl_logps)
    ours = kto_loss(logps, ref, label, ours_kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    torch.testing.assert_close(ours_kl, kl)
    torch.testing.assert_close(torch.cat([ours[chosen_idx], ours[rejected_idx]]), theirs)
    # A negative KL estimate is clamped to 0 (the reference point never goes below the reference).
    assert kto_kl_estimate(ref_kl_logps - 5, ref_kl_logps).item() == 0.0


def test_bradley_terry_matches_trl_reward_trainer():
    g = torch.Generator().manual_seed(5)
    rewards_chosen, rewards_rejected, margin = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.rand(7, generator=g)
    # TRL 1.16 RewardTrainer.compute_loss (the loss is a mean over pairs):
    theirs = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    theirs = theirs + 0.01 * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    ours = bradley_terry_loss(rewards_chosen, rewards_rejected, margin, center_coefficient=0.01).mean()
    torch.testing.assert_close(ours, theirs)
    plain = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    torch.testing.assert_close(bradley_terry_loss(rewards_chosen, rewards_rejected).mean(), plain)


def test_unknown_loss_type_and_missing_lengths_are_refused():
    pc, pr, rc, rr, _, _ = fixed_logps()
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
