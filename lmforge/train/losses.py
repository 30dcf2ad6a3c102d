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
