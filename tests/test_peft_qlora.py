"""QLoRA (lmforge.peft.qlora): LoRA on an NF4 base dequantized on the fly, against bitsandbytes and peft."""
from __future__ import annotations

import json

import bitsandbytes as bnb            # the `test` extra pins 0.50.2, whose CPU backend works
import bitsandbytes.functional as bnbF
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from lmforge import cli
from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.model.loading import export
from lmforge.peft import LoRAConfig, LoRALinear, apply_lora, lora_parameters, save_adapter
from lmforge.peft.qlora import (NF4FrozenLinear, NF4Weight, QLoRALinear, apply_qlora, bits_per_parameter,
                                dequantize_fast, qlora_merged_state_dict)
from lmforge.quant.nf4 import dequantize_nf4, quantize_nf4

from train_support import CountingBatches, make_shakespeare_shards, parameters_of, write_arithmetic_chats

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def _model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(get_preset("nano", vocab_size=VOCAB, **overrides)).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for _, adapter in module.adapted():
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("shape, blocksize", [((96, 64), 64), ((37, 50), 64), ((64, 512), 256)])
def test_fast_dequantization_equals_ours_and_bitsandbytes(shape, blocksize):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02
    q = quantize_nf4(weight, blocksize=blocksize)
    assert torch.equal(dequantize_fast(q), dequantize_nf4(q))
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(dequantize_fast(q), bnbF.dequantize_4bit(packed, state))


def test_nf4_matmul_matches_bitsandbytes_forward_and_input_gradient():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(6))
    # bitsandbytes repacks 4-bit weights after a no-grad eval forward on AVX512-BF16 CPUs, after
    # which its matmul's input gradients are silently zero: its backward runs first, on a fresh
    # quantization, and its gradient is checked to be non-zero so the comparison can fail.
    theirs = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    theirs.backward(grad)
    their_grad = x.grad.clone()
    assert their_grad.abs().max() > 0
    x.grad = None
    ours = NF4Weight(weight).matmul(x)
    ours.backward(grad)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, their_grad, atol=1e-5, rtol=1e-5)


def test_the_dequantized_weight_is_not_kept_for_backward():
    layer = NF4Weight(torch.randn(256, 128) * 0.05)
    saved = []
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer.matmul(x).sum().backward()
    assert torch.Size([256, 128]) not in saved        # F.linear(x, dequantize(q)) would save it
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("targets, dora", [("all-linear", False), (["q_proj", "v_proj"], False), (["o_proj"], True)])
def test_qlora_grads_equal_lora_on_the_dequantized_base(targets, dora):
    """QLoRA's loss and adapter gradients are LoRA's on the base it dequantizes to: the 4-bit
    storage changes nothing but the memory."""
    config = LoRAConfig(r=4, alpha=8, target_modules=targets, use_dora=dora)
    qlora = apply_qlora(_model(), config)
    assert all(isinstance(m, (QLoRALinear, NF4FrozenLinear)) for n, m in qlora.named_modules()
               if n.endswith((".qkv", ".out", ".gate_up", ".down")))
    reference = _model()
    reference.load_state_dict(_dequantized_base(qlora))
    apply_lora(reference, config)
    torch.manual_seed(9)
    _randomize(qlora)
    reference.load_state_dict({**reference.state_dict(), **{k: v for k, v in qlora.state_dict().items()
                                                            if ".lora." in k}})
    ids = _ids()
    losses = []
    for model in (qlora, reference):
        model.train()
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.roll(-1, 1).reshape(-1))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.requires_grad) for m in (qlora, reference)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name] is not None and grads[0][name].abs().max() > 0, f"{name}: zero grad"
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def _dequantized_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights a QLoRA model computes with (dequantized), under the base model's keys."""
    state = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    for path, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            state[f"{path}.weight"] = module.base_weight().detach()
        elif isinstance(module, NF4FrozenLinear):
            state[f"{path}.weight"] = module.dequantized_weight()
    return state


def test_bits_per_parameter_and_memory():
    model = apply_qlora(_model(d_model=128), LoRAConfig(r=4, target_modules=["q_proj"]))
    assert 4.12 < bits_per_parameter(model) < 4.14        # 4 + 8/64 + 32/(64*256), plus one offset per tensor
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("transformer"))
    # The 4-bit buffers are not persistent: a state dict (and a checkpoint) holds no base linear weight.
    assert not any(k.endswith(("qkv.weight", "out.weight", "gate_up.weight", "down.weight"))
                   for k in model.state_dict())
    with pytest.raises(UserError, match="cannot be merged"):
        next(m for m in model.modules() if isinstance(m, QLoRALinear)).merge()
    with pytest.raises(UserError, match="blocksize"):
        apply_qlora(_model(), LoRAConfig(), blocksize=48)


def test_only_the_adapters_change_through_the_trainer(tmp_path):
    from lmforge.train import CausalLMObjective, Trainer, TrainConfig

    model = apply_qlora(_model(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    before = parameters_of(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, log_interval=1, eval_interval=0,
                         checkpoint_interval=0, progress=False)
    trainer = Trainer(model, CausalLMObjective(), CountingBatches(4, 12), config, run_dir=tmp_path)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in lora_parameters(model)}
    trainer.fit()
    after = parameters_of(model)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) != (".lora." in name), name
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, buffers[name]), f"4-bit {name} changed"


def test_the_qlora_adapter_loads_into_peft_on_the_unquantized_base(tmp_path):
    base_dir = export(_model(), None, tmp_path / "hf", "hf")
    model = apply_qlora(_model(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # On the fp32 base the adapter is LoRA's: our LoRA with the same adapter weights gives peft's logits.
    ours = apply_lora(_model(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    ours.load_state_dict({**ours.state_dict(), **{k: v for k, v in model.state_dict().items() if ".lora." in k}})
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)
        # and the 4-bit model is close to it (NF4's error), not equal
        gap = (model(ids) - ours(ids)).abs().max()
    assert 0 < gap < 0.5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "qlora-shakespeare")[1]


def _sft_args(tokenizer_dir, data, out_dir, name, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, data=data, out_dir=out_dir, name=name, seq_len=64,
                    batch_size=4, max_steps=6, lr=1e-2, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=3, checkpoint_interval=3, val_examples=8, eval_prompts=4, answer_tokens=4,
                    progress=False, peak_flops=1e12)
    settings.update(extra)
    return ["sft", *(f"{k}={v}" for k, v in settings.items()),
            "peft=qlora", "lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear"]


def test_qlora_sft_checkpoints_adapters_only_resumes_exactly_and_writes_a_peft_adapter(tokenizer_dir, tmp_path):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "straight")) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed", max_steps=3)) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed") + ["--resume"]) == 0
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000006"
    stored = load_file(checkpoint / "model.safetensors")
    assert stored and all(".lora." in name for name in stored)
    meta = json.loads((checkpoint / "config.json").read_text())
    assert meta["peft"]["type"] == "qlora" and meta["peft"]["blocksize"] == 64
    exported = load_file(tmp_path / "straight" / "model.safetensors")
    assert not any(".lora." in name for name in exported)
    for name, tensor in exported.items():
        assert torch.equal(tensor, load_file(tmp_path / "resumed" / "model.safetensors")[name]), name
    adapter = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    # The checkpoint loads (its base re-quantized, its adapters) and gives the merged export's logits.
    from lmforge.model.loading import load, resolve_config

    final, tokenizer = load(checkpoint)
    assert any(isinstance(m, QLoRALinear) for m in final.modules())
    merged = build_model(resolve_config(checkpoint)).eval()
    assert not merged.load_state_dict(exported, strict=False).unexpected_keys
    ids = torch.tensor([tokenizer.encode("What is 2 plus 3?")])
    with torch.no_grad():
        torch.testing.assert_close(final(ids), merged(ids), atol=1e-4, rtol=1e-4)
