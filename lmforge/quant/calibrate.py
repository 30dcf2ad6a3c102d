"""Activation-aware 4-bit rounding: choose each block's scale by the error the *outputs* see.

    from lmforge.quant import quantize_model
    from lmforge.quant.calibrate import calibration_ids
    model = quantize_model(model, "q4_0", calibration_ids=calibration_ids(tokenizer, 4096))

Round-to-nearest gives each block of 32 (Q4_0) or 64 (NF4) weights the scale that maps its largest
|w| to the grid's end, and counts every weight's rounding error alike. But a Linear's output error
is dW x: the error in weight column j is multiplied by input feature j, and a few input features
carry most of the activation energy. Weighting by the mean square of each input feature,

    importance_j = E[x_j^2]      (the diagonal of the calibration inputs' X^T X / n)
    error(block) = sum_j importance_j (w_j - d q_j)^2,

and searching d per block for the smallest weighted error is what llama.cpp's importance matrix
(`llama-imatrix`) does for its 4-bit formats. Per candidate scale the levels q are rounded, then d
is refitted by weighted least squares given them (d = sum(i w q) / sum(i q^2)); the best candidate
wins. The stored format is unchanged (a Q4_0 block still holds 32 codes and one scale, an NF4
block 64 codes and one absmax slot), so the kernels, bitsandbytes and GGUF readers are untouched;
only the rounding changes. Importance comes from a forward over a few thousand tokens of the
bundled Wikipedia leads (text the held-out Shakespeare perplexity never sees), or of Wikipedia and
ShareGPT chats ("wiki+chat"), or of a text file of your own.

For NF4, AWQ's per-channel input scales are searched first and folded into the preceding norms
and rows (scaling.py): NF4's 64-weight blocks gain from them, Q4_0's 32-weight blocks do not.
Tried and not kept (docs/LOG.md): GPTQ's full-Hessian error compensation (per-layer error down,
perplexity not).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

# Round-to-nearest comes first: a block whose weights all have zero importance keeps it (ties keep
# the earlier candidate).
Q4_0_CANDIDATES = [-8.0] + [-(8 + 0.1 * i) for i in range(-9, 10) if i] + [7 + 0.1 * i for i in range(-9, 10)]
NF4_CANDIDATES = [1.0] + [0.5 + 0.025 * i for i in range(24)]   # fractions of the block's absmax


CALIBRATION_TEXTS = ("wiki", "wiki+chat")          # or the path of a UTF-8 .txt file
CALIBRATION_TEXT_HELP = ("the text --calibrate reads: wiki (the bundled Wikipedia leads), wiki+chat (half Wikipedia, "
                         "half ShareGPT conversations) or the path of a UTF-8 .txt file")


def calibration_ids(tokenizer, tokens: int = 4096, text: str = "wiki") -> list[int]:
    """`tokens` token ids of calibration text, one document after another.

    text: "wiki" = the bundled Wikipedia leads; "wiki+chat" = half of them, then half ShareGPT
    conversations (each conversation's turns, one per line); or the path of a UTF-8 .txt file
    (your own domain's text, as llama.cpp's `llama-imatrix -f` takes)."""
    if tokens < 1:
        raise UserError(f"calibration tokens {tokens} is below 1; use a few thousand, e.g. 4096")
    if text == "wiki":
        return _wiki_ids(tokenizer, tokens)
    if text == "wiki+chat":
        return _wiki_ids(tokenizer, tokens - tokens // 2) + _chat_ids(tokenizer, tokens // 2)
    return _file_ids(tokenizer, text, tokens)


def _wiki_ids(tokenizer, tokens: int) -> list[int]:
    from ..rag.corpus import wiki_documents

    ids: list[int] = []
    for document in wiki_documents():
        ids += tokenizer.encode(document.text + "\n\n")
        if len(ids) >= tokens:
            return ids[:tokens]
    raise UserError(f"the Wikipedia leads have only {len(ids)} tokens; ask for {len(ids)} or fewer")


def _chat_ids(tokenizer, tokens: int) -> list[int]:
    from ..data.chat_corpora import load_sharegpt

    if tokens == 0:
        return []
    limit = 64                                   # conversations parsed; doubled until there is enough text
    while True:
        conversations = load_sharegpt(limit=limit)[0]
        ids = []
        for conversation in conversations:
            ids += tokenizer.encode("\n".join(m["content"] for m in conversation.messages) + "\n\n")
            if len(ids) >= tokens:
                return ids[:tokens]
        if len(conversations) < limit:
            raise UserError(f"the ShareGPT conversations have only {len(ids)} tokens; ask for {2 * len(ids)} "
                            "or fewer calibration tokens")
        limit *= 2


def _file_ids(tokenizer, text: str, tokens: int) -> list[int]:
    from pathlib import Path

    path = Path(text)
    if not path.is_file():
        raise UserError(f"calibration text '{text}' is neither {' nor '.join(CALIBRATION_TEXTS)} nor a file; "
                        "pass one of those names or the path of a UTF-8 .txt file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read calibration text '{text}' ({error}); pass a UTF-8 .txt file") from None
    ids = tokenizer.encode(content)
    if len(ids) < tokens:
        raise UserError(f"calibration text '{text}' has only {len(ids)} tokens; ask for {len(ids)} or fewer, "
                        "or pass a longer file")
    return ids[:tokens]


@torch.inference_mode()
def input_importance(model: nn.Module, ids: list[int], window: int = 256, batch_size: int = 8,
                     second_moment: bool = False) -> dict[str, torch.Tensor]:
    """{Linear name: E[x^2] per input feature [in_features] (fp32)} over `ids` in windows.
    second_moment=True: E[x x^T] [in_features, in_features] instead (its diagonal is E[x^2]),
    what scaling.py scores output errors with."""
    window = min(window, model.config.max_seq_len, len(ids))
    rows = torch.tensor(ids[: len(ids) // window * window]).view(-1, window)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[name] = sums.get(name, 0) + (x.T @ x if second_moment else x.square().sum(dim=0))
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = [module.register_forward_pre_hook(lambda _m, inputs, name=name: record(name, inputs))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    device = next(model.parameters()).device
    try:
        for start in range(0, rows.shape[0], batch_size):
            model(rows[start:start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


def _pick_best(best: tuple | None, error: torch.Tensor, *values: torch.Tensor) -> tuple:
    """Keep, per block, the candidate with the smaller error."""
    if best is None:
        return (error, *values)
    better = error < best[0]
    return tuple(torch.where(better, new, old) for new, old in zip((error, *values), best))


def _refit(blocks: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor):
    """(scale minimising sum weights * (blocks - scale * levels)^2, that error); [..., 1] each."""
    numerator = (weights * blocks * levels).sum(dim=-1, keepdim=True)
    denominator = (weights * levels * levels).sum(dim=-1, keepdim=True)
    scale = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), scale)
    return scale, (weights * (blocks - scale * levels) ** 2).sum(dim=-1, keepdim=True)


def q4_0_weighted(weight: torch.Tensor, importance: torch.Tensor,
                  group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (codes 0..15 uint8 [out, in], scale [out, in/group]) with each block's scale searched
    for the smallest importance-weighted error. W ~ (codes - 8) * scale, as `quantize_q4_0`.

    Candidates map the block's signed extreme m to level -8 +- 0.9 (m / d = -8 is round-to-nearest)
    or to level +7 +- 0.9, each refitted by least squares."""
    out_features, in_features = weight.shape
    if importance.shape != (in_features,):
        raise UserError(f"importance has shape {tuple(importance.shape)}; the weight needs ({in_features},)")
    blocks = weight.detach().float().view(out_features, in_features // group, group)
    weights = importance.float().clamp(min=0).view(1, -1, group).to(blocks.device)
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))          # [out, nb, 1], signed
    best = None
    for level in Q4_0_CANDIDATES:
        scale = extreme / level
        inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        levels = torch.round(blocks * inverse).clamp(-8, 7)
        scale, error = _refit(blocks, weights, levels, scale)
        best = _pick_best(best, error, scale, levels)
    _, scale, levels = best
    codes = (levels + 8).to(torch.uint8).view(out_features, in_features)
    return codes, scale.squeeze(2)


def nf4_block_scales(weight: torch.Tensor, importance: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Per-block NF4 scales [nblocks] (for `quantize_nf4(scale=...)`) with the smallest
    importance-weighted error; candidates are fractions of the absmax, refitted by least squares."""
    from .nf4 import _nearest_index, nf4_code

    out_features, in_features = weight.shape
    if importance.shape != (in_features,):
        raise UserError(f"importance has shape {tuple(importance.shape)}; the weight needs ({in_features},)")
    flat = weight.detach().float().reshape(-1)
    weights = importance.float().clamp(min=0).to(flat.device).repeat(out_features)
    pad = -flat.numel() % blocksize                     # NF4 blocks run over the flattened weight
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    weights = torch.nn.functional.pad(weights, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    code = nf4_code().to(flat.device)
    # nearest level by table lookup on a fine grid of [-1, 1] (bucketize is ~10x slower here)
    grid = torch.linspace(-1, 1, 4097, device=flat.device)
    table = code[_nearest_index(grid, code)]
    nearest = lambda x: table[((x.clamp(-1, 1) + 1) * 2048).round_().long()]  # noqa: E731
    best = None
    for fraction in NF4_CANDIDATES:
        scale = (absmax * fraction).clamp(min=1e-30)
        # quantize_nf4 then rounds to the nearest level of the refitted scale; judging that second
        # rounding here instead was no better on SmolLM2 and 1.5x slower
        scale, error = _refit(blocks, weights, nearest(blocks / scale), scale)
        best = _pick_best(best, error, scale)
    scale = best[1].squeeze(1)
    return torch.where(absmax.squeeze(1) == 0, torch.zeros_like(scale), scale)


def nf4_weighted_fake_quant(weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The weight after NF4 with searched block scales and back (no double quantization): what
    the AWQ scale search in scaling.py scores its candidates with."""
    from .nf4 import dequantize_nf4, quantize_nf4

    scale = nf4_block_scales(weight, importance)
    return dequantize_nf4(quantize_nf4(weight.float(), double_quant=False, scale=scale)).view_as(weight)
