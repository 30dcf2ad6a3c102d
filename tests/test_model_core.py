"""Model components and invariants: causality, KV cache, GQA, RoPE, masks, MoE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.model import BERT, GPT, ModelConfig, build_model, get_preset
from lmforge.model.mlp import MixtureOfExperts
from lmforge.model.positions import RotaryEmbedding, alibi_slopes


def tiny(**overrides) -> ModelConfig:
    base = dict(arch="gpt", vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def set_capture(model, on: bool) -> None:
    for module in model.modules():
        if hasattr(module, "capture_attention"):
            module.capture_attention = on


@pytest.mark.parametrize("overrides", [
    {}, {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh"}, {"position": "alibi"},
    {"position": "sinusoidal", "mlp": "relu2"}, {"sliding_window": 4}, {"qk_norm": True, "n_kv_heads": 1},
])
def test_gpt_is_causal(overrides):
    model = GPT(tiny(**overrides)).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 97
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :7], b[:, :7]), "a future token changed an earlier logit"
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_bert_is_bidirectional():
    model = BERT(tiny(**{**get_preset("bert-nano").to_dict(), "vocab_size": 97})).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 97
    assert not torch.allclose(model(ids)[:, :7], model(changed)[:, :7])


@pytest.mark.parametrize("overrides", [
    {}, {"position": "learned", "norm": "layernorm", "mlp": "gelu"}, {"position": "alibi"},
    {"sliding_window": 5}, {"n_kv_heads": 2}, {"rope_interleaved": True, "qk_norm": True},
])
def test_kv_cache_prefill_and_decode_equal_full_forward(overrides):
    model = GPT(tiny(**overrides)).eval()
    ids = torch.randint(0, 97, (2, 15))
    full = model(ids)
    cache = model.new_kv_cache(batch_size=2)
    steps = [model(ids[:, :6], kv_cache=cache)]
    for t in range(6, 15):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.lengths.tolist() == [15, 15]


def test_kv_cache_rows_with_different_lengths_and_right_padding():
    """Continuous batching: rows of different lengths, prefilled with right padding, decoded together."""
    model = GPT(tiny(n_kv_heads=2)).eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 7, 5)]
    continuation = torch.randint(0, 97, (3, 4))
    cache = model.new_kv_cache(batch_size=4)
    # Prefill rows 1..3 of the cache in one padded batch.
    padded = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    rows = torch.tensor([1, 2, 3])
    model(padded, attention_mask=mask, kv_cache=cache, cache_rows=rows)
    assert cache.lengths.tolist() == [0, 3, 7, 5]
    # Decode all three, then only rows 3 and 1 (in that order).
    out_all = model(continuation[:, :1], kv_cache=cache, cache_rows=rows)
    out_sub = model(continuation[[2, 0], 1:2], kv_cache=cache, cache_rows=torch.tensor([3, 1]))
    for row, prompt in enumerate(prompts):
        reference = model(torch.cat([prompt, continuation[row, :2]])[None])
        assert torch.allclose(out_all[row, 0], reference[0, len(prompt)], atol=1e-5)
    for batch_row, row in ((0, 2), (1, 0)):
        reference = model(torch.cat([prompts[row], continuation[row, :2]])[None])
        assert torch.allclose(out_sub[batch_row, 0], reference[0, -1], atol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    model = GPT(tiny()).eval()
    cache = model.new_kv_cache(batch_size=1, max_seq_len=8)
    with pytest.raises(UserError, match="KV cache holds 8"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_right_padding_does_not_change_real_positions():
    for arch_model in (GPT(tiny()).eval(), BERT(tiny(**{**get_preset("bert-nano").to_dict(), "vocab_size": 97})).eval()):
        ids = torch.randint(0, 97, (1, 6))
        padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
        mask = torch.tensor([[1] * 6 + [0] * 4])
        assert torch.allclose(arch_model(ids), arch_model(padded, attention_mask=mask)[:, :6], atol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha_and_matches_explicit_attention():
    config = tiny(n_kv_heads=4)
    model = GPT(config).eval()
    ids = torch.randint(0, 97, (2, 10))
    fast = model(ids)
    set_capture(model, True)
    explicit = model(ids)
    assert torch.allclose(fast, explicit, atol=1e-5)
    # Hand-written MHA for layer 0 with the same weights: the module's output must match.
    attn = model.transformer.blocks[0].attn
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).split(32, dim=-1)
    heads = lambda t: t.view(2, 10, 4, 8).transpose(1, 2)
    rotary = model.transformer.rotary
    positions = torch.arange(10)[None]
    q, k = rotary(heads(q), positions), rotary(heads(k), positions)
    reference = F.scaled_dot_product_attention(q, k, heads(v), is_causal=True).transpose(1, 2).reshape(2, 10, 32)
    set_capture(model, False)
    from lmforge.model.attention import AttentionMask
    got = attn(x, AttentionMask(None, True), rotary.tables(positions))
    assert torch.allclose(got, attn.out(reference), atol=1e-5)


def test_gqa_matches_repeated_kv_heads():
    """GQA with 2 kv heads equals MHA whose kv projections repeat each kv head for its query group."""
    gqa = GPT(tiny(n_kv_heads=2)).eval()
    mha = GPT(tiny(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    for layer in range(2):
        key = f"transformer.blocks.{layer}.attn.qkv.weight"
        q, k, v = state[key].split([32, 16, 16])
        repeat = lambda t: t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
        state[key] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 9))
    assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_depends_only_on_relative_position(interleaved):
    rotary = RotaryEmbedding(16, interleaved=interleaved)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        return (rotary(q, torch.tensor([[m]])) * rotary(k, torch.tensor([[n]]))).sum()

    assert torch.allclose(score(5, 2), score(105, 102), atol=1e-4)
    assert torch.allclose(score(0, 0), (q * k).sum(), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_pairings_are_a_permutation_of_each_other():
    half, inter = RotaryEmbedding(8, interleaved=False), RotaryEmbedding(8, interleaved=True)
    x = torch.randn(1, 1, 3, 8)
    permutation = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split channel (i, i+4) -> adjacent (2i, 2i+1)
    positions = torch.arange(3)[None]
    assert torch.allclose(half(x, positions)[..., permutation], inter(x[..., permutation], positions), atol=1e-6)


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # Not a power of two: the 4 slopes of 4 heads, then every other slope of 8 heads (the paper's rule).
    four, eight = [2.0 ** (-2 * (i + 1)) for i in range(4)], [2.0 ** -(i + 1) for i in range(8)]
    assert torch.allclose(alibi_slopes(6), torch.tensor(four + eight[0::2][:2]))


def test_sliding_window_limits_reach():
    model = GPT(tiny(sliding_window=3, n_layers=1)).eval()
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 97
    a, b = model(ids), model(changed)
    assert not torch.allclose(a[:, 2:5], b[:, 2:5])  # positions 2..4 see token 2
    assert torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)  # one layer: position 5 only sees 3..5


def test_moe_routing_weights_topk_and_aux_loss():
    config = tiny(n_experts=4, experts_top_k=2, d_ff=16, moe_aux_loss_coef=1.0, moe_z_loss_coef=0.5)
    moe = MixtureOfExperts(config)
    x = torch.randn(3, 5, 32)
    out, aux_loss = moe(x)
    assert out.shape == x.shape
    tokens = x.reshape(-1, 32)
    weights, experts, logits = moe.route(tokens)
    assert torch.allclose(weights.sum(-1), torch.ones(15))
    probs = logits.softmax(-1)
    assert torch.equal(experts.sort(-1).values, probs.topk(2, dim=-1).indices.sort(-1).values)
    # Output is the weighted sum of the chosen experts, token by token.
    manual = torch.stack([sum(weights[n, j] * moe.experts[int(experts[n, j])](tokens[n]) for j in range(2))
                          for n in range(15)])
    assert torch.allclose(out.reshape(-1, 32), manual, atol=1e-5)
    # Aux loss = E * sum_e f_e P_e + z * mean(logsumexp^2), from first principles.
    counts = torch.zeros(4)
    for n in range(15):
        for j in range(2):
            counts[int(experts[n, j])] += 1
    balance = 4 * ((counts / 30) * probs.mean(0)).sum()
    z_loss = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.allclose(aux_loss, balance + 0.5 * z_loss, atol=1e-5)


def test_moe_model_trains_and_reports_aux_loss():
    model = build_model(get_preset("moe-tiny", vocab_size=97, d_model=32, d_ff=32, n_layers=2))
    ids = torch.randint(0, 97, (2, 8))
    output = model(ids, return_output=True)
    assert output.aux_loss is not None and output.aux_loss.ndim == 0
    loss = F.cross_entropy(output.logits.flatten(0, 1), ids.flatten()) + output.aux_loss
    loss.backward()
    assert model.transformer.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients():
    model = GPT(tiny()).train()
    ids = torch.randint(0, 97, (2, 8))
    model(ids).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.transformer.gradient_checkpointing = True
    model(ids).sum().backward()
    for expected, parameter in zip(reference, model.parameters()):
        assert torch.allclose(expected, parameter.grad, atol=1e-6)


def test_weight_tying_and_scaled_init():
    model = GPT(tiny(n_layers=8))
    assert model.lm_head.weight is model.transformer.embed_tokens.weight
    out_std = model.transformer.blocks[0].attn.out.weight.std().item()
    assert abs(out_std - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8)


@pytest.mark.parametrize("bad", [dict(n_heads=3), dict(position="nope"), dict(n_kv_heads=3), dict(mlp="tanh")])
def test_bad_configs_are_clear_errors(bad):
    with pytest.raises(UserError):
        GPT(tiny(**bad))


@pytest.mark.parametrize("bad, message", [
    (dict(n_heads=0), "must be positive"),            # used to be a ZeroDivisionError in validate()
    (dict(n_kv_heads=0), "n_kv_heads must be at least 1"),
    (dict(head_dim=0), "head_dim must be at least 1"),
    (dict(d_ff=0), "d_ff must be at least 1"),
    (dict(sliding_window=0), "sliding_window must be at least 1"),
    (dict(sliding_window=-4), "sliding_window must be at least 1"),
    (dict(norm_eps=0.0), "norm_eps must be positive"),
    (dict(init_std=-0.1), "init_std must be zero or positive"),
])
def test_degenerate_sizes_are_named_errors(bad, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{**tiny().to_dict(), **bad}).validate()


def test_unset_optional_sizes_keep_their_defaults():
    config = ModelConfig(**{**tiny().to_dict(), "head_dim": None, "d_ff": None, "sliding_window": None}).validate()
    assert config.head_dim == config.d_model // config.n_heads and config.d_ff > 0
    assert ModelConfig(**{**tiny().to_dict(), "init_std": 0.0}).validate().init_std == 0.0


def test_unknown_preset_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'gpt2-124m'"):
        get_preset("gpt2-124")


def test_rope_tables_extend_past_their_initial_length():
    rotary = RotaryEmbedding(8, max_positions=4)
    x = torch.randn(1, 1, 1, 8)
    rotary.extend(10)
    assert rotary.cos.shape[0] >= 10
    reference = RotaryEmbedding(8, max_positions=16)
    assert torch.allclose(rotary(x, torch.tensor([[9]])), reference(x, torch.tensor([[9]])))
    model = GPT(tiny(max_seq_len=4)).eval()
    assert model(torch.randint(0, 97, (1, 9))).shape == (1, 9, 97)  # RoPE has no hard length limit
