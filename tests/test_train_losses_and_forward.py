"""train/losses.py against first principles, and the generalised model forward (inputs_embeds,
logits only where labelled, hidden states and the MoE loss returned, packed sequences)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import build_model, get_preset
from lmforge.train.losses import (IGNORE_INDEX, entropy_from_logits, masked_mean, masked_sum, sequence_logprobs,
                                  shift_labels, token_logprobs)

from train_support import VOCAB, tiny_gpt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equal_log_softmax_gather_with_the_same_gradient(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 33) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 33, (5, 7))
    labels[0, :3] = IGNORE_INDEX
    ours = token_logprobs(logits, labels, chunk_rows=4)            # several chunks, one partial
    kept = labels != IGNORE_INDEX
    reference_logits = logits.detach().float().requires_grad_()
    reference = reference_logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * kept
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert torch.all(ours[~kept] == 0)
    weights = torch.randn(5, 7)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, atol=tolerance, rtol=tolerance)
    assert logits.grad.dtype == dtype


def test_entropy_masked_reductions_sequence_logprobs_and_shift_labels():
    logits = torch.randn(3, 4, 9)
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=5), -(probs * probs.log()).sum(-1))
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_sum(values, mask) == 4.0
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 0.0]))   # never NaN
    torch.testing.assert_close(sequence_logprobs(values, mask), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(sequence_logprobs(values, mask, average=True), torch.tensor([2.0, 0.0]))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, IGNORE_INDEX]]
    assert shift_labels(ids, torch.tensor([[0, 0, 1, 1]])).tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX]]


def test_inputs_embeds_logits_mask_and_hidden_states_match_the_plain_forward():
    model = tiny_gpt().eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    logits = model(ids)
    from_embeddings = model(inputs_embeds=model.transformer.embed_tokens(ids))
    torch.testing.assert_close(from_embeddings, logits)
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 3], keep[1, 7:] = True, True
    output = model(ids, logits_mask=keep, return_output=True)
    assert output.logits.shape == (4, VOCAB)
    torch.testing.assert_close(output.logits, logits[keep])
    torch.testing.assert_close(model.lm_head(output.hidden_states), logits)
    assert output.aux_loss is None
    with pytest.raises(ValueError):
        model(ids, inputs_embeds=model.transformer.embed_tokens(ids))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_packed_documents_never_see_each_other(position):
    """A token's logits are unchanged by what is packed before it in the row."""
    torch.manual_seed(0)
    model = build_model(get_preset("nano", vocab_size=VOCAB, position=position)).eval()
    first, second, third = (torch.randint(0, VOCAB, (n,)) for n in (5, 7, 4))
    row = torch.cat([first, second, third])[None]
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    documents = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)[None]
    packed = model(row, position_ids=positions, document_ids=documents)[0]
    for document, (start, end) in zip((first, second, third), ((0, 5), (5, 12), (12, 16))):
        alone = model(document[None])[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
    # Without the document mask the second example would see the first: the check above can fail.
    leaky = model(row, position_ids=positions)[0]
    assert not torch.allclose(leaky[5:12], model(second[None])[0], atol=1e-3)


def test_moe_aux_loss_is_returned_by_the_forward_and_flows_through_checkpointing():
    model = build_model(get_preset("moe-tiny", vocab_size=VOCAB, d_model=32, d_ff=32, n_layers=2)).train()
    ids = torch.randint(0, VOCAB, (2, 8))
    plain = model(ids, return_output=True)
    model.transformer.gradient_checkpointing = True
    checkpointed = model(ids, return_output=True)
    torch.testing.assert_close(plain.aux_loss, checkpointed.aux_loss)
    (F.cross_entropy(checkpointed.logits.flatten(0, 1), ids.flatten()) + checkpointed.aux_loss).backward()
    assert model.transformer.blocks[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_output_layer_and_loss_equal_logits_then_cross_entropy(dtype):
    """linear_cross_entropy (model/lm_head_loss.py): the loss, argmax count and both gradients of
    logits = hidden @ W.T followed by cross-entropy, over several chunks with ignored rows, without
    the [N, V] logits; under autocast the matmuls run in bf16 as nn.Linear's would."""
    from lmforge.model.lm_head_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (37,))
    labels[::5] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, correct = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
        logits = F.linear(hidden, weight)
    (loss * 0.5).backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (reference * 0.5).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, reference.detach(), rtol=tolerance, atol=tolerance)
    assert correct == ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    torch.testing.assert_close(ours[0], hidden.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours[1], weight.grad, rtol=tolerance, atol=tolerance)
    with torch.no_grad():                        # evaluation: the loss alone, no gradient work
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels)[0], loss.detach(),
                                   rtol=tolerance, atol=tolerance)


def test_a_frozen_output_layer_costs_no_weight_gradient():
    """LoRA, QLoRA and prompt tuning freeze the (tied) head: linear_cross_entropy then computes and
    keeps no [V, d] weight gradient, and the hidden states get the same gradient as before."""
    from lmforge.model.lm_head_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (37,))
    linear_cross_entropy(hidden, weight, labels, chunk_rows=8)[0].backward()
    trained_input_grad, hidden.grad = hidden.grad.clone(), None
    loss, _ = linear_cross_entropy(hidden, weight.detach(), labels, chunk_rows=8)
    assert not any(t is not None and t.shape == weight.shape for t in loss.grad_fn.saved_tensors)
    loss.backward()
    assert torch.equal(hidden.grad, trained_input_grad)


def test_fused_objectives_equal_the_unfused_path_on_a_gpt():
    """CausalLMObjective and SFTObjective fuse the model's output layer with the loss by default:
    same loss, accuracy and parameter gradients as logits-then-loss, tied embeddings included."""
    from lmforge.train.objectives import CausalLMObjective, SFTObjective

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = shift_labels(ids)
    labels[0, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    for kind in (CausalLMObjective, SFTObjective):
        results = []
        for fused in (True, False):
            torch.manual_seed(1)
            model = tiny_gpt()
            output = kind(fused_loss=fused)(model, batch)
            output.loss.backward()
            results.append((output.loss.detach(), output.metrics["accuracy"],
                            {name: p.grad.clone() for name, p in model.named_parameters()}))
        (fused_loss, fused_acc, fused_grads), (loss, acc, grads) = results
        torch.testing.assert_close(fused_loss, loss)
        assert fused_acc == acc
        for name in grads:
            torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_hand_written_backward_equals_autograd_of_the_formula(dtype):
    """model/norms.py's RMSNorm Function: gradcheck in fp64, and in fp32/bf16 the output and both
    gradients equal autograd through the plain formula computed in fp32."""
    from lmforge.model.norms import rms_norm

    torch.manual_seed(0)
    x64 = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w64 = (torch.randn(16, dtype=torch.float64) + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x64, w64))
    x = (torch.randn(6, 32) * 3).to(dtype).requires_grad_()
    w = (torch.randn(32) * 0.2 + 1).to(dtype).requires_grad_()
    upstream = torch.randn(6, 32)
    ours = rms_norm(x, w, 1e-5)
    (ours.float() * upstream).sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    x32, w32 = x.float(), w.float()
    reference = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * w32
    (reference * upstream).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), reference.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grads[0].float(), x.grad.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grads[1].float(), w.grad.float(), rtol=tolerance, atol=tolerance * 4)
