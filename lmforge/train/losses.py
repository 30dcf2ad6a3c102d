"""Pure loss functions every objective shares (SFT, reward models, DPO, PPO, GRPO, distillation).

No modules, no state: tensors in, tensors out, documented with shapes. Objectives compose them.

Shapes: B batch, T positions, V vocabulary, N selected positions (e.g. the labelled ones).
IGNORE_INDEX (-100) marks labels that are not predicted.

The log-probability of the label is `logit[label] - logsumexp(logits)`. Computing it as
`log_softmax(logits.float()).gather(...)` materialises an fp32 [B, T, V] tensor (for SmolLM2's
49,152-token vocabulary that is 200 KB per position) and keeps it for backward. `token_logprobs`
instead walks over rows in chunks, upcasts one chunk at a time and saves only the logits it was
given and one logsumexp per row; backward recomputes softmax chunk by chunk.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ROWS = 1024           # rows of logits upcast to fp32 at once (1024 x 49152 x 4 B = 200 MB)


class _TokenLogprobs(torch.autograd.Function):
    """log p(label) per row of [N, V] logits, chunked in forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        logsumexp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(logsumexp)
        for start in range(0, logits.shape[0], chunk_rows):
            chunk = logits[start:start + chunk_rows].float()
            logsumexp[start:start + chunk_rows] = torch.logsumexp(chunk, dim=-1)
            picked[start:start + chunk_rows] = chunk.gather(-1, labels[start:start + chunk_rows, None])[:, 0]
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.chunk_rows = chunk_rows
        return picked - logsumexp

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            # d/dlogits [logit_y - logsumexp] = onehot(y) - softmax(logits)
            softmax = (logits[rows].float() - logsumexp[rows, None]).exp()
            chunk = -softmax
            chunk.scatter_add_(-1, labels[rows, None], torch.ones_like(chunk[:, :1]))
            grad[rows] = (chunk * grad_output[rows, None]).to(logits.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """log p(labels) under logits, in fp32, without an fp32 copy of all the logits.

    logits: [..., V] (any float dtype); labels: [...] (IGNORE_INDEX allowed: its result is 0).
    Returns: [...] fp32 log-probabilities (<= 0), differentiable with respect to logits.
    """
    shape = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    ignored = flat_labels == IGNORE_INDEX
    safe_labels = flat_labels.masked_fill(ignored, 0)
    result = _TokenLogprobs.apply(flat_logits, safe_labels, chunk_rows)
    return result.masked_fill(ignored, 0.0).reshape(shape)


def shift_labels(input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM labels: labels[:, t] = input_ids[:, t + 1] where mask[:, t + 1] is set, else IGNORE_INDEX.

    input_ids: [B, T]; mask: [B, T] (1 = train on predicting this token; None = every token).
    Returns: [B, T] (the last position predicts nothing).
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if mask is not None:
        labels[:, :-1] = labels[:, :-1].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return labels


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where mask is true. values, mask: the same shape (or broadcastable)."""
    values = values * mask.to(values.dtype)
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is true (0 where nothing is kept, never NaN)."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability: the sum (or mean, `average`) of token log-probs where mask is set.

    token_logps: [B, T]; mask: [B, T] -> [B]. The sum is log p(response | prompt) (DPO); the mean
    is the length-normalised score (IPO, SimPO).
    """
    return masked_mean(token_logps, mask, dim=-1) if average else masked_sum(token_logps, mask, dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in fp32: logits [..., V] -> [...].

    H = logsumexp(z) - sum_v softmax(z)_v z_v, computed chunk by chunk (one fp32 chunk at a time).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start:start + chunk_rows].float()
        logsumexp = torch.logsumexp(chunk, dim=-1)
        pieces.append(logsumexp - (chunk.softmax(dim=-1) * chunk).sum(dim=-1))
    return (torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32)).reshape(logits.shape[:-1])


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: where a label is predicted. Pass it as the model's `logits_mask` so the output
    layer runs only there; the labels to score are then `labels[mask]` ([N])."""
    return labels != IGNORE_INDEX


# ---------------------------------------------------------------- preference losses (reward models, DPO family)
# Each returns a per-pair (or per-example) loss [B]; objectives sum it (units = pairs). The formulas
# follow TRL 1.16 (DPOTrainer, CPOTrainer, ORPOTrainer, KTOTrainer, RewardTrainer) term for term;
# tests/test_align_losses.py checks them against TRL's own expressions on fixed log-probs.

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coefficient: float | None = None) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2.

    rewards, margin: [B] -> [B]. The centering term (TRL's `center_rewards_coefficient`) pulls the
    scores toward mean 0, which keeps them comparable across reward models.
    """
    import torch.nn.functional as F

    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, simpo_gamma: float = 0.5) -> torch.Tensor:
    """The DPO family's per-pair loss from summed response log-probs [B] (policy and reference).

    With h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):
      sigmoid       -log sigmoid(beta h)                                     (DPO)
      hinge         relu(1 - beta h)                                         (SLiC)
      ipo           (h_avg - 1/(2 beta))^2, log-ratios divided by response length (TRL's IPO)
      robust        ((1-e) -log sig(beta h) + e log sig(-beta h)) / (1 - 2e), e = label_smoothing
      sigmoid_norm  -log sigmoid(beta h_avg), length-normalised log-ratios
      simpo         SimPO/CPO: no reference; u = avg log pi(y_c) - avg log pi(y_r) - gamma/beta,
                    (1-e) -log sig(beta u) - e log sig(-beta u)  (pass the reference as zeros)
    lengths: [B] response tokens (needed by ipo, sigmoid_norm, simpo).
    """
    import torch.nn.functional as F

    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {DPO_LOSS_TYPES}")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type in ("ipo", "sigmoid_norm", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        chosen_ratio = chosen_ratio / chosen_lengths.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_lengths.clamp(min=1)
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid" or loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    logits = delta - simpo_gamma / beta       # simpo
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
                    beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term from length-averaged log-probs [B]: (-beta log sigmoid(log_odds), log_odds).

    log_odds = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)); the full ORPO loss adds the chosen
    response's NLL. (TRL returns +beta log sigmoid and subtracts it; this is the same loss.)
    """
    import torch.nn.functional as F

    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), log_odds


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch mean of log pi(y'|x) - log ref(y'|x) over mismatched
    (prompt, other example's completion) pairs, clamped at 0 and detached. [B] -> scalar.
    (Under several processes TRL averages the per-process means; the objective does the same.)"""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO per example (unpaired): desirable w_d (1 - sigmoid(beta (r - KL))), undesirable
    w_u (1 - sigmoid(beta (KL - r))), r = log pi(y|x) - log ref(y|x). logps, ref_logps: [B];
    desirable: bool [B]; kl: scalar (kto_kl_estimate) -> [B]."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad)


# ---------------------------------------------------------------- distillation (token-level KD, GKD)
# Per-position divergences between a student's and a teacher's next-token distributions, in fp32.
# logits: [N, V] (the trained positions only) -> [N]; objectives sum them (units = tokens). The JSD
# follows Agarwal et al. 2024 (GKD) and TRL 1.16's GKDTrainer.generalized_jsd_loss term for term
# (tests/test_distill_losses.py checks it): no T^2 factor, so temperature changes the targets only.


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per row, p = softmax(p_logits / T), q likewise.

    p_logits, q_logits: [..., V] -> [...] fp32, >= 0; differentiable with respect to both.
    """
    log_p = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position (classic KD, Hinton et al.): mean-seeking, the student
    spreads mass over every token the teacher likes. [..., V] -> [...]."""
    return kl_divergence(teacher_logits, student_logits, temperature)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per position (MiniLLM): mode-seeking, the student may ignore teacher
    modes it cannot fit rather than smear probability between them. [..., V] -> [...]."""
    return kl_divergence(student_logits, teacher_logits, temperature)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence per position. [..., V] -> [...] fp32.

    With M = beta * teacher + (1 - beta) * student (a mixture of probabilities):
        JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M).
    As in GKD (and TRL), beta = 0 means forward KL(teacher || student) and beta = 1 reverse
    KL(student || teacher) (the JSD itself tends to 0 at both ends, so the ends are defined apart).
    """
    import math

    if beta == 0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # log M computed from log-probabilities: logsumexp(log s + log(1 - beta), log t + log beta).
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    kl_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


# ---------------------------------------------------------------- policy gradients (GRPO, RLOO, PPO)
# On-policy RL on sampled completions. Token-level tensors are flat [M]: the completion tokens of a
# micro-batch in row-major order (what `logits_mask=labels != IGNORE_INDEX` selects), with
# `rows` [M] naming each token's sequence. Formulas follow TRL 1.16 (GRPOTrainer, RLOOTrainer,
# PPOTrainer); tests/test_align_rl_losses.py checks them against TRL's expressions term for term.

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: torch.Tensor | None = None, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages (r - mean of its group) / (std + eps), and which groups had no spread.

    rewards: [N] with N = groups x group_size, each group contiguous. scale: "group" divides by the
    group's std, "batch" by the std of all N (`batch_std` overrides it, e.g. over every process),
    "none" not at all (Dr. GRPO). std is the unbiased one, as torch.std and TRL's nanstd.
    Returns (advantages [N], zero_std [N] bool: the row's group has identical rewards).
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    group_std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        std = batch_std if batch_std is not None else rewards.std()
        advantages = advantages / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, not {scale!r}")
    return advantages, torch.isclose(group_std, torch.zeros_like(group_std))


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages: r_i minus the mean of the other G - 1 rewards of its group. [N] -> [N]."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss: -min(rho A, clip(rho, 1 - e_low, 1 + e_high) A), rho = exp(logp - old).

    All arguments broadcast ([M] per token, or [N] per sequence for RLOO). epsilon_high > epsilon_low
    is DAPO's clip-higher. Returns (loss, clipped: bool, where the clipped branch was taken and
    carries no gradient).
    """
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped, clipped = ratio * advantages, clipped_ratio * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def aggregate_token_losses(per_token: torch.Tensor, rows: torch.Tensor, n_rows: int, loss_type: str,
                           max_completion_length: int) -> tuple[torch.Tensor, float]:
    """The summed loss of a micro-batch and the units it is a sum over (the Trainer divides the step's
    summed losses by the step's summed units), for each of GRPO's aggregations:

      grpo     mean over sequences of each sequence's mean token loss   (units: sequences)
      bnpo     the micro-batch's token mean (TRL normalises per micro-batch; units: 1 per micro-batch)
      dr_grpo  token sum / (sequences x max_completion_length)          (units: that product)
      dapo     token sum / tokens of the whole step                     (units: tokens)

    per_token, rows: [M]; n_rows: sequences in the micro-batch.
    """
    if loss_type == "grpo":
        lengths = torch.zeros(n_rows, device=per_token.device).index_add(0, rows, torch.ones_like(per_token))
        sums = torch.zeros(n_rows, device=per_token.device, dtype=per_token.dtype).index_add(0, rows, per_token)
        return (sums / lengths.clamp(min=1)).sum(), float(n_rows)
    if loss_type == "bnpo":
        return per_token.sum() / max(per_token.numel(), 1), 1.0
    if loss_type == "dr_grpo":
        return per_token.sum(), float(n_rows * max_completion_length)
    if loss_type == "dapo":
        return per_token.sum(), float(per_token.numel())
    raise ValueError(f"unknown loss_type {loss_type!r}; one of {GRPO_LOSS_TYPES}")


def discounted_returns_matrix(length: int, discount: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """D [T, T] with D[t, s] = discount^(s - t) for s >= t, else 0: x @ D.T sums each x's discounted future."""
    index = torch.arange(length, device=device, dtype=torch.float64)
    power = index[None, :] - index[:, None]
    return torch.where(power >= 0, discount ** power.clamp(min=0), torch.zeros((), dtype=torch.float64,
                                                                              device=device)).float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded rows.

    rewards, values, mask: [B, T] (mask 1 on each row's completion tokens, contiguous; rewards and
    values there, anything elsewhere). The value after a row's last token is 0 (the episode ended).
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_k (gamma lam)^k delta_{t+k}
    computed for all positions at once with a [T, T] discount matrix (no loop over time).
    Returns (advantages [B, T], returns = advantages + values [B, T]), 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = deltas @ discounted_returns_matrix(values.shape[1], gamma * lam, values.device).T
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (TRL's masked_whiten: unbiased variance);
    shift_mean=False adds the mean back (used for rewards). 0 outside the mask."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) ** 2) * mask).sum() / count
    variance = variance * count / (count - 1) if count > 1 else variance
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), and where the
    clipped branch was larger (TRL's vf_clipfrac). [M] -> ([M], [M] bool)."""
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss
