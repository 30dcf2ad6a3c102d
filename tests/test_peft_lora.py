"""LoRA / rsLoRA / DoRA from scratch (lmforge.peft) against Hugging Face PEFT on our own HF exports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import peft          # the `test` extra pins it: the reference these tests compare against
import pytest
import torch
import transformers
from torch import nn

from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.model.loading import export
from lmforge.peft import (LoRAConfig, LoRALinear, apply_lora, load_adapter, load_lora_state_dict, lora_parameters,
                          lora_state_dict, merge_lora, merged_state_dict, save_adapter, unload_lora, unmerge_lora)

from train_support import CountingBatches, parameters_of

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
Q_V = ["q_proj", "v_proj"]


def _model(preset: str = "nano", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(get_preset(preset, vocab_size=VOCAB, **overrides)).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """HF directories of the base models (built from fixed seeds), exported by lmforge."""
    root = tmp_path_factory.mktemp("hf")
    made = {}

    def get(preset: str = "nano", **overrides) -> str:
        key = (preset, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = str(export(_model(preset, **overrides), None, root / f"{preset}-{len(made)}", "hf"))
        return made[key]

    return get


def _hf(directory: str) -> nn.Module:
    config = json.loads((Path(directory) / "config.json").read_text())
    auto = transformers.AutoModelForMaskedLM if config["model_type"] == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(directory).eval()


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 2) -> None:
    """Non-zero B (and DoRA magnitudes off their initial norms), so every parity check can fail."""
    generator = torch.Generator().manual_seed(seed)
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for _, adapter in module.adapted():
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.05)
                if adapter.magnitude is not None:
                    adapter.magnitude.mul_(1 + 0.1 * torch.randn(adapter.magnitude.shape, generator=generator))


# ----------------------------------------------------------------------------- our adapters in PEFT

PARITY_CASES = [
    pytest.param("nano", {}, Q_V, False, False, id="llama-q-v"),
    pytest.param("nano", {}, "all-linear", False, False, id="llama-all-linear"),
    pytest.param("nano", {}, "all-linear", True, False, id="llama-rslora"),
    pytest.param("nano", {}, Q_V, False, True, id="llama-dora-q-v"),
    pytest.param("nano", {}, "all-linear", True, True, id="llama-dora-rslora-all-linear"),
    pytest.param("nano", {"rope_interleaved": True}, ["q_proj", "k_proj"], False, True, id="llama-interleaved-rope"),
    pytest.param("nano", {"qkv_bias": True, "attn_out_bias": False}, "all-linear", False, True, id="qwen2-biases"),
    pytest.param("gpt2-nano", {}, ["c_attn", "c_proj"], False, False, id="gpt2-conv1d"),
    pytest.param("gpt2-nano", {}, "all-linear", False, True, id="gpt2-dora"),
    pytest.param("bert-nano", {}, ["query", "value"], False, True, id="bert-dora"),
]


@pytest.mark.parametrize("preset, overrides, targets, rslora, dora", PARITY_CASES)
def test_our_adapter_loads_into_peft_with_our_logits(exports, tmp_path, preset, overrides, targets, rslora, dora):
    model = _model(preset, **overrides)
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids)
    apply_lora(model, LoRAConfig(r=4, alpha=12, target_modules=targets, use_rslora=rslora, use_dora=dora))
    _randomize(model)
    with torch.no_grad():
        ours = model(ids)
    assert (ours - base_logits).abs().max() > 1e-3          # the adapters do something
    hf_dir = exports(preset, **overrides)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=hf_dir)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is dora and config["use_rslora"] is rslora
    theirs = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-4, rtol=0)
        # And back: the saved adapter on a fresh base is the same model (RoPE row order undone too).
        reloaded = load_adapter(_model(preset, **overrides), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(ids), ours, atol=1e-6, rtol=0)


def test_training_mode_with_dropout_matches_peft_logits_and_gradients(exports, tmp_path):
    """Dropout masks drawn in the same order (q, k, v, o, gate, up, down), DoRA's detached norm:
    the same loss and the same gradient for every A, B and magnitude as PEFT's."""
    hf_dir = exports()
    model = apply_lora(_model(), LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear",
                                            use_rslora=True, use_dora=True))
    _randomize(model)
    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter", is_trainable=True)
    model.train()
    theirs.train()
    ids = _ids()
    torch.manual_seed(5)
    our_loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.manual_seed(5)
    their_loss = theirs(ids, labels=ids).loss
    torch.testing.assert_close(our_loss, their_loss, atol=1e-5, rtol=0)
    our_loss.backward()
    their_loss.backward()
    from lmforge.peft.lora import lora_layers

    their_grads = {name.replace(".default", ""): p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for path, layer in lora_layers(model):
        for piece, adapter in layer.adapted():
            key = f"base_model.model.{piece.hf_name}"
            for ours_name, their_name in (("A", "lora_A.weight"), ("B", "lora_B.weight"),
                                          ("magnitude", "lora_magnitude_vector.weight")):
                torch.testing.assert_close(getattr(adapter, ours_name).grad, their_grads[f"{key}.{their_name}"],
                                           atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked == 2 * 7 * 3


def test_q_and_v_only_split_the_fused_qkv_per_slice(tmp_path):
    model = _model()
    attn = model.transformer.blocks[0].attn
    weight = attn.qkv.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=2, target_modules=Q_V))
    _randomize(model)
    assert set(attn.qkv.lora) == {"q", "v"} and not isinstance(attn.out, LoRALinear)
    assert not isinstance(model.transformer.blocks[0].mlp.gate_up, LoRALinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        delta = attn.qkv(x) - x @ weight.T
    q, k, v = delta.split([64, 32, 32], dim=-1)
    assert q.abs().max() > 1e-4 and v.abs().max() > 1e-4
    assert torch.equal(k, torch.zeros_like(k))              # the untargeted slice gets no update
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        f"transformer.blocks.{i}.attn.qkv.lora.{s}.{p}" for i in range(2) for s in "qv" for p in "AB"]


def test_target_names_peft_style_ours_and_regex():
    def structure(targets):
        model = apply_lora(_model(), LoRAConfig(r=2, target_modules=targets))
        return {path: sorted(module.lora) for path, module in model.named_modules() if isinstance(module, LoRALinear)}

    assert structure(["qkv"]) == structure(["q_proj", "k_proj", "v_proj"])
    assert structure(["gate_proj", "up_proj"]) == structure(["gate_up"])
    assert structure(["o_proj", "down_proj"]) == structure(["attn.out", "mlp.down"])
    assert structure(r"model\.layers\.0\.self_attn\.(q|v)_proj") == {"transformer.blocks.0.attn.qkv": ["q", "v"]}
    all_linear = structure("all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 8
    assert all_linear["transformer.blocks.1.mlp.gate_up"] == ["gate", "up"]
    assert all_linear["transformer.blocks.1.attn.qkv"] == ["k", "q", "v"]
    # A Kaiming-uniform A (PEFT's lora_A init) and a zero B: the model starts as the base.
    model = apply_lora(_model(), LoRAConfig(r=4, target_modules="all-linear"))
    adapter = model.transformer.blocks[0].attn.qkv.lora["q"]
    assert torch.equal(adapter.B, torch.zeros_like(adapter.B))
    assert adapter.A.abs().max() <= 1 / math.sqrt(64) and adapter.A.std() > 0.3 / math.sqrt(64)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), _model()(_ids()), atol=0, rtol=0)


def test_bad_targets_and_configs_are_user_errors():
    with pytest.raises(UserError, match="'q_prj' match no linear layer.*q_proj"):
        apply_lora(_model(), LoRAConfig(target_modules=["q_prj", "v_proj"]))
    with pytest.raises(UserError, match="tied to the input embedding"):
        apply_lora(_model(), LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(UserError, match="r must be a positive integer"):
        apply_lora(_model(), LoRAConfig(r=0))
    with pytest.raises(UserError, match="bias='all' is not supported"):
        apply_lora(_model(), LoRAConfig(bias="all"))
    model = apply_lora(_model(), LoRAConfig())
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


# ----------------------------------------------------------------------------- PEFT's adapters in lmforge


@pytest.mark.parametrize("targets, rslora, dora", [
    pytest.param(Q_V, False, False, id="q-v"),
    pytest.param("all-linear", True, True, id="all-linear-rslora-dora"),
])
def test_an_adapter_trained_with_peft_loads_into_lmforge(exports, tmp_path, targets, rslora, dora):
    from lmforge import load

    hf_dir = exports()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora, use_dora=dora))
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for step in range(3):
        batch = _ids(10 + step)
        theirs(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.eval().save_pretrained(tmp_path / "adapter")

    model, _ = load(hf_dir)
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids)
        load_adapter(model, tmp_path / "adapter")
        ours, expected = model(ids), theirs(ids).logits
    assert (expected - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert all(not p.requires_grad for name, p in model.named_parameters() if ".lora." not in name)


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_equals_unmerged_and_unmerge_restores_the_base(dora):
    model = apply_lora(_model(), LoRAConfig(r=4, alpha=16, target_modules="all-linear", use_dora=dora))
    _randomize(model)
    base = {name: t.clone() for name, t in _model().state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids)
        exported = merged_state_dict(model)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=0)
    state = model.state_dict()
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=0)

    # The merged export has exactly the base model's keys, and loads into a plain model.
    assert set(exported) == set(base)
    plain = _model(seed=9)
    plain.load_state_dict(exported)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), unmerged, atol=1e-5, rtol=0)
    unloaded = unload_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in unloaded.modules())
    assert set(unloaded.state_dict()) == set(base)
    assert all(p.requires_grad for p in unloaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(ids), unmerged, atol=1e-5, rtol=0)


def test_lora_state_dict_round_trip():
    model = apply_lora(_model(), LoRAConfig(r=2, target_modules=Q_V, use_dora=True))
    _randomize(model)
    state = lora_state_dict(model)
    assert set(state) == {name for name, p in model.named_parameters() if p.requires_grad}
    other = apply_lora(_model(), LoRAConfig(r=2, target_modules=Q_V, use_dora=True))
    load_lora_state_dict(other, state)
    with torch.no_grad():
        torch.testing.assert_close(other(_ids()), model(_ids()), atol=0, rtol=0)
    with pytest.raises(UserError, match="do not fit"):
        load_lora_state_dict(apply_lora(_model(), LoRAConfig(r=2)), {})


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("objective_name, dora", [("causal", False), ("sft", True)])
def test_only_the_adapters_change_through_the_trainer(tmp_path, objective_name, dora):
    from lmforge.train import CausalLMObjective, Trainer, TrainConfig
    from lmforge.train.objectives import SFTObjective

    model = _model()
    model.train()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear", use_dora=dora))
    before = parameters_of(model)
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, log_interval=1, eval_interval=0,
                         checkpoint_interval=0, progress=False, ema_decay=0.5)
    objective = CausalLMObjective() if objective_name == "causal" else SFTObjective()
    trainer = Trainer(model, objective, CountingBatches(4, 12), config, run_dir=tmp_path)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in lora_parameters(model)}
    result = trainer.fit()
    assert result.step == 3
    after = parameters_of(model)
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora." in name for name in adapters)
    for name, tensor in after.items():
        if name in adapters:
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"frozen {name} changed"


# ----------------------------------------------------------------------------- bad adapters


def _saved(tmp_path, **config) -> tuple[nn.Module, object]:
    model = apply_lora(_model(), LoRAConfig(r=4, **({"target_modules": Q_V} | config)))
    _randomize(model)
    return model, save_adapter(model, tmp_path / "adapter")


def test_a_bad_adapter_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(_model(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(_model(), tmp_path / "empty")

    _, directory = _saved(tmp_path)
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    good_config, good_weights = config_file.read_text(), weights_file.read_bytes()

    config_file.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(_model(), directory)
    config_file.write_text(json.dumps({**json.loads(good_config), "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(UserError, match="PREFIX_TUNING adapter"):
        load_adapter(_model(), directory)
    config_file.write_text(json.dumps({**json.loads(good_config), "modules_to_save": ["lm_head"]}))
    with pytest.raises(UserError, match="modules_to_save"):
        load_adapter(_model(), directory)
    config_file.write_text(good_config)

    weights_file.write_bytes(good_weights[:40])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_adapter(_model(), directory)
    weights_file.unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        load_adapter(_model(), directory)

    from safetensors.torch import load_file, save_file

    weights_file.write_bytes(good_weights)
    tensors = load_file(str(weights_file))
    save_file({**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 64)},
              str(weights_file))
    with pytest.raises(UserError, match="lora_embedding_A' that is not a LoRA weight"):
        load_adapter(_model(), directory)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(weights_file))
    with pytest.raises(UserError, match="lacks .*lora_B.weight"):
        load_adapter(_model(), directory)


def test_an_adapter_for_another_base_is_a_user_error(tmp_path):
    _, directory = _saved(tmp_path)
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.q_proj' has A of shape \[4, 64\].*96 inputs"):
        load_adapter(_model(d_model=96), directory)
    with pytest.raises(UserError, match="'model.layers.1.self_attn.q_proj', which this base model"):
        load_adapter(_model(n_layers=1), directory)

    gpt2 = apply_lora(_model("gpt2-nano"), LoRAConfig(r=4, target_modules=["c_attn"]))
    gpt2_dir = save_adapter(gpt2, tmp_path / "gpt2-adapter")
    with pytest.raises(UserError, match="targets c_attn, which this base model \\(LlamaForCausalLM\\) does not have"):
        load_adapter(_model(), gpt2_dir)
    with pytest.raises(UserError, match="no LoRA adapters to save"):
        save_adapter(_model(), tmp_path / "none")
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        save_adapter(apply_lora(_model(n_experts=2, experts_top_k=1), LoRAConfig()), tmp_path / "moe")
