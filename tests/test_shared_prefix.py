"""The shared-prompt training forward (model/shared_prefix.py) against plain duplicated rows:
log-probs, logits, hidden states and every parameter's gradient, on RoPE and learned-position
models, prompts of different lengths, ragged completions, and a prompt used once."""
from __future__ import annotations

import pytest
import torch

from lmforge.align.preference import response_logps
from lmforge.align.rollout import rollout_tensors, token_logps_and_hidden
from lmforge.model import build_model, get_preset
from lmforge.model.shared_prefix import shared_prefix_states, shared_prompts


def _states(model, rows):
    predicted = rows["labels"] != -100
    return shared_prefix_states(model, rows["input_ids"], rows["attention_mask"], predicted, rows["prompt_lengths"])


def _rows():
    g = torch.Generator().manual_seed(0)
    prompt_a = torch.randint(3, 500, (9,), generator=g).tolist()
    prompt_b = torch.randint(3, 500, (5,), generator=g).tolist()
    prompt_c = torch.randint(3, 500, (7,), generator=g).tolist()
    prompts = [prompt_a, prompt_b, prompt_a, prompt_b, prompt_a, prompt_c, prompt_b]
    lengths = [6, 3, 1, 8, 4, 5, 2]
    completions = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    return rollout_tensors(prompts, completions, pad_id=0)


@pytest.mark.parametrize("preset", ["nano", "gpt2-nano"])
def test_shared_prompt_forward_equals_duplicated_rows(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset))
    rows = _rows()
    plain_rows = {k: v for k, v in rows.items() if k != "prompt_lengths"}

    results = {}
    for name, batch in (("shared", rows), ("plain", plain_rows)):
        model.zero_grad()
        logps, logits, hidden = token_logps_and_hidden(model, batch, hidden=True)
        (logps.sum() + hidden.square().mean()).backward()
        results[name] = (logps.detach(), logits.detach(), hidden.detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert _states(model, rows) is not None
    for ours, reference in zip(results["shared"][:3], results["plain"][:3]):
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    shared_grads, plain_grads = results["shared"][3], results["plain"][3]
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_prompts_are_grouped_by_their_tokens_not_their_rows():
    rows = _rows()
    representatives, owner = shared_prompts(rows["input_ids"], rows["prompt_lengths"])
    assert representatives == [0, 1, 5]
    assert owner.tolist() == [0, 1, 0, 1, 0, 2, 1]


def test_no_shared_prompt_or_a_checkpointed_model_uses_the_plain_forward():
    torch.manual_seed(0)
    model = build_model(get_preset("nano"))
    assert _states(model, rollout_tensors([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0)) is None
    rows = _rows()
    model.train()
    model.transformer.gradient_checkpointing = True
    assert _states(model, rows) is None
    model.transformer.gradient_checkpointing = False
    assert _states(model, rows) is not None
    early = dict(rows, prompt_lengths=rows["prompt_lengths"] + 1)     # a scored position inside the "prompt"
    assert _states(model, early) is None


def test_dpo_response_logps_share_the_pair_prompt():
    """Chosen and rejected rows (DPO's concatenated batch) give the plain forward's sums and grads."""
    torch.manual_seed(0)
    model = build_model(get_preset("nano"))
    rows = _rows()
    ids, mask, labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
    predicted = labels != -100
    assert _states(model, dict(rows, prompt_lengths=predicted.int().argmax(dim=1) + 1)) is not None
    model.zero_grad()
    sums, lengths = response_logps(model, ids, mask, labels)
    sums.sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids, attention_mask=mask, logits_mask=predicted)
    token = torch.log_softmax(logits.float(), -1).gather(1, labels[predicted][:, None])[:, 0]
    expected = torch.zeros(len(ids)).index_add(0, predicted.nonzero()[:, 0], token)
    expected.sum().backward()
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == predicted.sum(dim=1).tolist()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(shared_grads[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
