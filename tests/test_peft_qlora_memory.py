"""QLoRA's memory and speed paths: the base read layer by layer straight into NF4
(peft/qlora_loading.py) and the chunked NF4 dequantization (peft/qlora.py)."""
from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch
from torch import nn

import lmforge.peft.qlora as qlora
from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.model.loading import export, load, locate
from lmforge.peft import LoRAConfig, LoRALinear
from lmforge.peft.qlora import apply_qlora, dequantize_fast, has_qlora
from lmforge.peft.qlora_loading import build_quantized, load_qlora, open_stream
from lmforge.quant.nf4 import dequantize_nf4, quantize_nf4

from fuzz_support import write_gguf
from train_support import make_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(make_shakespeare_shards(tmp_path_factory.getbasetemp() / "qlora-memory")[1])


def _base(tokenizer, preset: str = "nano", seed: int = 0, **overrides) -> nn.Module:
    """A small model with every parameter perturbed (norms at 1 and zero biases would hide mistakes)."""
    torch.manual_seed(seed)
    model = build_model(get_preset(preset, vocab_size=tokenizer.vocab_size, **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _reference(kind: str, tokenizer, tmp_path, **model) -> str:
    """The base written as an HF directory or a GGUF file; the model object is gone on return."""
    base = _base(tokenizer, **model)
    if kind == "gguf":
        write_gguf(tmp_path / "base.gguf", base, tokenizer)
        return str(tmp_path / "base.gguf")
    return str(export(base, tokenizer, tmp_path / "hf", "hf"))


def _randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                for _, adapter in module.adapted():
                    adapter.A.copy_(torch.randn(adapter.A.shape, generator=generator) * 0.1)
                    adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.1)


CASES = [
    ("hf", {}, LoRAConfig(r=4, alpha=8, target_modules="all-linear")),
    ("gguf", {}, LoRAConfig(r=4, alpha=8, target_modules="all-linear")),
    ("hf", {"tie_embeddings": False}, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    ("hf", {"preset": "gpt2-nano"}, LoRAConfig(r=2, alpha=4, target_modules="all-linear", use_rslora=True)),
]


@pytest.mark.parametrize("kind, model, lora", CASES, ids=["llama-hf", "llama-gguf", "untied-dora-q-v", "gpt2-hf"])
def test_layer_by_layer_loading_is_load_then_apply_qlora(tmp_path, tokenizer, kind, model, lora):
    reference = _reference(kind, tokenizer, tmp_path, **model)
    ours, ours_tokenizer = load_qlora(reference, lora, tokenizer=None if kind == "gguf" else tokenizer)
    theirs, _ = load(reference, tokenizer=tokenizer)
    apply_qlora(theirs.float(), lora)
    assert ours_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert not ours.training and has_qlora(ours)
    assert [(path, type(module)) for path, module in ours.named_modules()] == \
           [(path, type(module)) for path, module in theirs.named_modules()]
    # The same NF4 bytes and scales, the same fp32 embedding/norms/head (frozen), the same DoRA magnitudes.
    ours_buffers, theirs_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert ours_buffers.keys() == theirs_buffers.keys()
    for name, tensor in theirs_buffers.items():
        assert torch.equal(ours_buffers[name], tensor), name
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    for name, param in theirs_params.items():
        assert ours_params[name].requires_grad == param.requires_grad == (".lora." in name), name
        assert ours_params[name].shape == param.shape, name
        if ".lora." not in name or name.endswith(".magnitude"):
            assert torch.equal(ours_params[name], param), name
    tied = ours.lm_head.weight is ours.transformer.embed_tokens.weight
    assert tied == (theirs.lm_head.weight is theirs.transformer.embed_tokens.weight)
    assert tied == model.get("tie_embeddings", True)
    assert ours._lora_requires_grad == theirs._lora_requires_grad and ours.qlora_blocksize == theirs.qlora_blocksize
    # With the same adapter values the two models compute the same logits, bit for bit.
    _randomize_adapters(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.tensor([tokenizer.encode("To be, or not to be: that is the question.")])
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))


def test_no_fp32_block_weight_outlives_its_quantization(tmp_path, tokenizer):
    # Tensors other tests left alive (module fixtures) are not this test's: remember them, and hold
    # them so that no new tensor can take one of their ids.
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        earlier = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    known = {id(o) for o in earlier}
    base = _base(tokenizer, n_layers=3)
    shapes = {tuple(m.weight.shape) for path, m in base.named_modules()
              if isinstance(m, nn.Linear) and ".blocks." in f".{path}"}
    assert len(shapes) == 4                                       # qkv, out, gate_up, down

    def fp32_block_weights() -> int:
        gc.collect()
        with warnings.catch_warnings():      # isinstance() on every object touches deprecated aliases
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in known
                       and not o.is_meta and o.dtype == torch.float32 and tuple(o.shape) in shapes)

    assert fp32_block_weights() == 12                             # the probe sees a loaded model's weights
    reference = export(base, tokenizer, tmp_path / "hf", "hf")
    del base
    assert fp32_block_weights() == 0
    seen = []
    model = build_quantized(open_stream(locate(reference)), LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]),
                            on_layer=lambda path: seen.append((path, fp32_block_weights())))
    # Each layer was quantized as soon as it was read, and its fp32 weight was gone at once: at no
    # point did two layers (let alone the whole model) exist in fp32.
    assert [path for path, _ in seen] == [f"transformer.blocks.{i}.{name}" for i in range(3)
                                          for name in ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")]
    assert all(count == 0 for _, count in seen), seen
    assert fp32_block_weights() == 0
    kinds = [type(model.get_submodule(path)).__name__ for path, _ in seen]
    assert kinds == ["QLoRALinear", "NF4FrozenLinear", "NF4FrozenLinear", "QLoRALinear"] * 3


def test_loading_errors_come_before_any_weight_is_read(tmp_path, tokenizer):
    reference = _reference("hf", tokenizer, tmp_path)
    with pytest.raises(UserError, match="blocksize"):
        load_qlora(reference, LoRAConfig(), blocksize=48)
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] += 8
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="gate_proj.weight.*has shape"):
        load_qlora(reference, LoRAConfig())


def test_sft_peft_qlora_on_an_hf_base_resumes_exactly(tmp_path, tokenizer, monkeypatch):
    """`lmforge sft peft=qlora` on a real checkpoint goes through the layer-by-layer loader; a resumed
    run redraws the same adapters (seeded) and ends with the same weights as a straight one."""
    from safetensors.torch import load_file

    from lmforge import cli
    from train_support import write_arithmetic_chats

    import lmforge.peft.qlora_loading as loading

    reference = _reference("hf", tokenizer, tmp_path)
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    built = []
    monkeypatch.setattr(loading, "build_quantized", lambda *a, **k: built.append(1) or build_quantized(*a, **k))

    def run(name: str, *extra: str) -> list[str]:
        settings = dict(model=reference, data=data, out_dir=tmp_path, name=name, seq_len=64, batch_size=4,
                        max_steps=4, lr=1e-2, warmup_steps=0, schedule="constant", log_interval=1, eval_interval=2,
                        checkpoint_interval=2, val_examples=8, eval_prompts=2, answer_tokens=4, progress=False,
                        peak_flops=1e12, peft="qlora", **{"lora.r": 4, "lora.target_modules": "all-linear"})
        return ["sft", *(f"{k}={v}" for k, v in settings.items()), *extra]

    assert cli.main(run("straight")) == 0
    assert cli.main(run("resumed", "max_steps=2")) == 0
    assert cli.main(run("resumed") + ["--resume"]) == 0
    assert len(built) == 3                                        # each run loaded its base layer by layer
    straight, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_preset_is_built_whole_then_quantized(tokenizer):
    torch.manual_seed(5)
    ours, _ = load_qlora("nano", LoRAConfig(r=2), tokenizer=tokenizer)
    torch.manual_seed(5)
    theirs = apply_qlora(load("nano", tokenizer=tokenizer)[0], LoRAConfig(r=2))
    for (name, tensor), (_, other) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(tensor, other), name


def test_peft_qlora_fine_tuning_loads_layer_by_layer(tmp_path, tokenizer):
    from lmforge.train.sft import SFTConfig, _with_adapters, load_causal_lm, qlora_settings

    reference = _reference("hf", tokenizer, tmp_path)
    config = SFTConfig(model=reference, peft="qlora", lora=LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    assert qlora_settings(config) == (config.lora, 64) and qlora_settings(SFTConfig(peft="lora")) is None
    model, _ = load_causal_lm(reference, None, 0, qlora=qlora_settings(config))
    adapters = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert has_qlora(model) and adapters
    adapted, options = _with_adapters(model, config)
    # The adapters are those loaded (not applied a second time) and the run rebuilds the same way.
    assert adapted is model and {n: p for n, p in model.named_parameters() if p.requires_grad} == adapters
    assert options["checkpoint_config"]["peft"]["type"] == "qlora"


@pytest.mark.parametrize("shape, blocksize, chunk", [((96, 64), 64, 128), ((37, 51), 64, 256), ((64, 512), 256, 512),
                                                     ((7, 5), 64, 128), ((300, 64), 64, 1 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_dequantization_is_bit_exact(monkeypatch, shape, blocksize, chunk, dtype):
    """Several chunks, a short last block, an odd count (a padding nibble), a weight shorter than a
    block, and a non-fp32 weight (computed in fp32, then cast) all give dequantize_nf4's values."""
    monkeypatch.setattr(qlora, "DEQUANT_CHUNK", chunk)
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.02).to(dtype)
    q = quantize_nf4(weight, blocksize=blocksize)
    fast = dequantize_fast(q)
    assert fast.dtype == dtype and fast.shape == weight.shape
    assert torch.equal(fast, dequantize_nf4(q))
    assert torch.equal(dequantize_fast(q, torch.float16), dequantize_nf4(q, torch.float16))
