"""The output layer and the cross-entropy fused, chunk by chunk (pretraining's biggest tensor, never built).

Unfused, pretraining computes logits = hidden @ W.T ([N, V]: for B=8, T=256 and GPT-2's 50,257
tokens that is 412 MB in fp32), then log-softmax ([N, V] again), keeps both for backward, and
backward writes a third [N, V] gradient. On a CPU those passes over memory cost as much as the
matmul; on a GPU they cap the batch size.

Fused (the idea of Liger-Kernel's FusedLinearCrossEntropy): walk over rows in chunks. For each
chunk, compute its logits, the loss, and, because the loss is a scalar whose upstream gradient is
a single number g, already the gradient: d loss / d logits = softmax - onehot(label). Multiply it
into grad_hidden = d @ W and grad_W += d.T @ hidden straight away, and drop the chunk. Backward
then only scales the two saved gradients by g. Same FLOPs as unfused (no recomputation), and
memory O(chunk x V + N x d + V x d) instead of O(N x V).

Shapes: N rows (positions), d model width, V vocabulary. IGNORE_INDEX labels add nothing.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logits per chunk: 64M (256 MB in fp32), about 1,300 rows of a 50k vocabulary. Measured on a
# 2-core AVX2 EPYC at d=384, V=50,304, N=2,048 (forward+backward): 83-row chunks 9.1 s (each chunk
# rewrites the whole [V, d] weight gradient), 512 rows 5.2 s, 1,024 rows 4.3 s, unchunked 4.1 s,
# against 5.3 s unfused. Chunks this size keep most of the speed and a quarter of the memory.
CHUNK_ELEMENTS = 1 << 26
# A frozen head (LoRA, QLoRA, prompt tuning) has no weight gradient to rewrite per chunk, so small
# chunks cost little: 8M logits (32 MB) per chunk (SmolLM2's ~500 answer tokens of an SFT step
# would otherwise make one 98 MB chunk; LoRA tokens/s measured unchanged, 1.28x peft).
FROZEN_HEAD_CHUNK_ELEMENTS = 1 << 23


def chunk_rows_for(vocab_size: int, weight_grad: bool = True) -> int:
    return max(16, (CHUNK_ELEMENTS if weight_grad else FROZEN_HEAD_CHUNK_ELEMENTS) // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                with_grad: bool, weight_grad: bool):
        n_rows = hidden.shape[0]
        losses = hidden.new_zeros((), dtype=torch.float32)
        correct = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        # fp32 accumulation over chunks: summing bf16 partial products would lose the small updates.
        # A frozen head (LoRA, QLoRA, prompt tuning) needs no [V, d] weight gradient: skip it.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad and weight_grad else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_hidden, chunk_labels = hidden[rows], labels[rows]
            logits = (chunk_hidden @ weight.t()).float()                       # [n, V] fp32
            kept = chunk_labels != IGNORE_INDEX
            safe = chunk_labels.masked_fill(~kept, 0)
            picked = logits.gather(-1, safe[:, None])[:, 0]
            correct = correct + ((logits.argmax(dim=-1) == chunk_labels) & kept).sum()
            # logsumexp by hand, in place: exp(logits - max) overwrites the logits, so the chunk
            # holds one [n, V] tensor (torch.logsumexp and a separate softmax would add two).
            peak = logits.amax(dim=-1, keepdim=True)
            weights = logits.sub_(peak).exp_()
            total = weights.sum(dim=-1)
            logsumexp = peak[:, 0] + total.log()                                # [n]
            losses = losses + ((logsumexp - picked) * kept).sum()
            if with_grad:
                # d/dlogits of sum(logsumexp - logit_y) = softmax - onehot(y), zero on ignored rows
                grad_logits = weights.div_(total[:, None])
                grad_logits.scatter_add_(-1, safe[:, None], -torch.ones_like(grad_logits[:, :1]))
                grad_logits.mul_(kept[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ weight
                if grad_weight is not None and weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), chunk_hidden)
                elif grad_weight is not None:   # a bf16 product, accumulated in fp32 (addmm_ wants one dtype)
                    grad_weight.add_(grad_logits.t() @ chunk_hidden)
        if with_grad:
            ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(correct)
        return losses, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), \
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `labels` under logits = hidden @ weight.T, without the [N, V] logits.

    hidden: [..., d]; weight: [V, d]; labels: [...] (IGNORE_INDEX = not predicted).
    Returns (loss_sum fp32 scalar, differentiable with respect to hidden and weight;
             correct: how many kept rows have argmax(logits) == label, fp32 scalar, no grad).
    Under autocast the matmuls run in the autocast dtype, as nn.Linear's would.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    with_grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or weight.requires_grad)
    rows = chunk_rows or chunk_rows_for(weight.shape[0], weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, rows, with_grad, weight.requires_grad)
