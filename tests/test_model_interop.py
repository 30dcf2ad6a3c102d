"""Hugging Face and GGUF interoperability on tiny random models: parity with transformers (fp32,
atol 1e-5) on import, on export + transformers reload, and on export + our reload."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers as T

from lmforge.errors import UserError
from lmforge.model import ModelConfig, build_model
from lmforge.model.loading import export, load, resolve_config

VOCAB = 61
ATOL = 1e-5


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves norms at 1 and biases at 0, which would hide mapping mistakes."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; the second is right-padded after 7 tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask[..., None]).max())


_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              intermediate_size=48, max_position_embeddings=64)
_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, intermediate_size=48,
             max_position_embeddings=32, type_vocab_size=3)
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=None, eos_token_id=None)

# (name, HF class, config, which output to compare)
HF_CASES = [
    ("gpt2", T.GPT2LMHeadModel, T.GPT2Config(**_GPT2), "logits"),
    ("gpt2-untied-exact-gelu", T.GPT2LMHeadModel,
     T.GPT2Config(**_GPT2, activation_function="gelu", tie_word_embeddings=False, n_inner=40), "logits"),
    ("bert-model", T.BertModel, T.BertConfig(**_BERT), "hidden"),
    ("bert-mlm", T.BertForMaskedLM, T.BertConfig(**_BERT), "logits"),
    ("bert-mlm-gelu-tanh", T.BertForMaskedLM, T.BertConfig(**_BERT, hidden_act="gelu_pytorch_tanh"), "logits"),
    ("bert-pretraining", T.BertForPreTraining, T.BertConfig(**_BERT), "prediction_logits"),
    ("llama", T.LlamaForCausalLM, T.LlamaConfig(**_LLAMA, rope_theta=500.0), "logits"),
    ("llama-tied-biases", T.LlamaForCausalLM,
     T.LlamaConfig(**_LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=16), "logits"),
    ("mistral-sliding-mqa", T.MistralForCausalLM,
     T.MistralConfig(**{**_LLAMA, "num_key_value_heads": 1}, sliding_window=4), "logits"),
    ("qwen2", T.Qwen2ForCausalLM, T.Qwen2Config(**_LLAMA, tie_word_embeddings=True), "logits"),
]
AUTO_CLASS = {"logits": T.AutoModelForCausalLM, "hidden": T.AutoModel, "prediction_logits": T.AutoModelForMaskedLM}


def hf_output(model: torch.nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor,
              types: torch.Tensor | None) -> torch.Tensor:
    extra = {"token_type_ids": types} if types is not None else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **extra)
    return {"hidden": lambda: out.last_hidden_state, "prediction_logits": lambda: out.prediction_logits}.get(
        kind, lambda: out.logits)()


def our_output(model: torch.nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor,
               types: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if model.config.arch == "bert":
            hidden = model.hidden_states(ids, mask, types)
            return hidden if kind == "hidden" else model.mlm_logits(hidden)
        return model(ids, mask)


@pytest.mark.parametrize("name,hf_class,hf_config,kind", HF_CASES, ids=[case[0] for case in HF_CASES])
def test_import_export_parity_with_transformers(tmp_path, name, hf_class, hf_config, kind):
    torch.manual_seed(0)
    reference = perturb(hf_class(hf_config))
    reference.save_pretrained(tmp_path / "hf")
    ids, mask = batch()
    types = torch.randint(0, 3, ids.shape) if "bert" in name else None
    expected = hf_output(reference, kind, ids, mask, types)

    # Import.
    model, tokenizer = load(tmp_path / "hf")
    assert tokenizer is None and not model.training
    assert max_diff(our_output(model, kind, ids, mask, types), expected, mask) < ATOL
    assert resolve_config(tmp_path / "hf") == model.config

    # Export, then transformers loads it; its MLM export is BertForMaskedLM, so compare like with like.
    export(model, None, tmp_path / "exported", "hf")
    auto = T.AutoModelForMaskedLM if kind == "prediction_logits" else AUTO_CLASS[kind]
    reloaded = auto.from_pretrained(tmp_path / "exported").eval()
    reloaded_kind = "logits" if kind == "prediction_logits" else kind
    assert max_diff(hf_output(reloaded, reloaded_kind, ids, mask, types), expected, mask) < ATOL

    # Export, then we load it again: identical weights.
    again, _ = load(tmp_path / "exported")
    assert max_diff(our_output(again, kind, ids, mask, types), expected, mask) < ATOL


def test_bert_model_import_reports_the_missing_mlm_head(tmp_path):
    perturb(T.BertModel(T.BertConfig(**_BERT))).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="mlm_transform.weight"):
        model, _ = load(tmp_path)
    assert "mlm_decoder.bias" in model.missing_weights and "pooler.weight" not in model.missing_weights


def test_bert_pooler_matches_transformers_and_the_classifier_head_trains(tmp_path):
    """The pooled [CLS] vector equals BertModel's pooler_output; classify() gives [B, n_labels] logits
    whose head learns (reward models use it with n_labels=1)."""
    reference = perturb(T.BertModel(T.BertConfig(**_BERT)))
    reference.save_pretrained(tmp_path)
    ids, mask = batch()
    types = torch.randint(0, 3, ids.shape)
    with pytest.warns(UserWarning):
        model, _ = load(tmp_path)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        pooled = model.pooled(model.hidden_states(ids, mask, types))
    assert (pooled - expected).abs().max() < ATOL

    classifier = build_model(ModelConfig(arch="bert", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4,
                                         max_seq_len=32, type_vocab_size=3, n_labels=3))
    targets = torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = classifier.classify(ids, mask, types)
        assert logits.shape == (2, 3)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gpt2_base_model_names_without_prefix_are_accepted(tmp_path):
    """The original GPT-2 files name tensors 'h.0.attn...' (GPT2Model), not 'transformer.h.0...'."""
    reference = perturb(T.GPT2LMHeadModel(T.GPT2Config(**_GPT2)))
    reference.transformer.save_pretrained(tmp_path)
    config = dict(json.loads((tmp_path / "config.json").read_text()), architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, mask = batch()
    model, _ = load(tmp_path)
    assert max_diff(our_output(model, "logits", ids, mask, None), hf_output(reference, "logits", ids, mask, None),
                    mask) < ATOL


def test_pytorch_bin_checkpoints_load_with_weights_only(tmp_path):
    reference = perturb(T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA)))
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    ids, mask = batch()
    model, _ = load(tmp_path)
    assert max_diff(our_output(model, "logits", ids, mask, None), hf_output(reference, "logits", ids, mask, None),
                    mask) < ATOL


def _bin_with_bad_memo(path) -> None:
    """A torch zip checkpoint whose pickle reads a memo entry that was never stored (BINGET 99)."""
    import zipfile

    torch.save({"x": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[next(name for name in members if name.endswith("data.pkl"))] = b"\x80\x02h\x63."
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("damage", ["random-bytes", "bad-memo", "dict-of-ints", "int-keys", "a-list"])
def test_damaged_pytorch_bin_files_are_user_errors(tmp_path, monkeypatch, damage):
    T.LlamaConfig(**_LLAMA).save_pretrained(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    state = {"model.embed_tokens.weight": torch.zeros(VOCAB, 32)}
    if damage == "random-bytes":
        path.write_bytes(bytes(range(256)) * 16)
    elif damage == "bad-memo":
        _bin_with_bad_memo(path)
    else:
        torch.save({"dict-of-ints": {name: 1 for name in state}, "int-keys": {0: torch.zeros(2)},
                    "a-list": [torch.zeros(2)]}[damage], path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))
    with pytest.raises(UserError, match=r"pytorch_model.bin' (is not a loadable PyTorch weights file|does not hold|holds)"):
        load(tmp_path)
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)   # never a pickle of code


def test_a_config_claiming_more_layers_than_the_weights_is_refused_before_building(tmp_path, monkeypatch):
    perturb(T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    import lmforge.model.builders as builders

    monkeypatch.setattr(builders, "build_model", lambda config: pytest.fail("a model was built"))
    with pytest.raises(UserError, match="says 1000000000 layers but the weights hold 2"):
        load(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 2.5, "num_hidden_layers|n_layers=2.5, which is not an integer"),
    ("intermediate_size", "48", "has an invalid or missing value"),
    ("tie_word_embeddings", "no", "tie_embeddings='no', which is not true or false"),
    ("rope_parameters", "x", "has an invalid or missing value"),
    ("max_position_embeddings", 10**8, "beyond the 16,777,216 lmforge supports"),
    ("vocab_size", 10**30, "beyond any size lmforge can build"),
])
def test_config_json_values_of_the_wrong_type_are_user_errors(tmp_path, field, value, message):
    T.LlamaConfig(**_LLAMA).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=message):
        resolve_config(tmp_path)


def test_shape_checks_run_before_the_model_is_allocated(tmp_path, monkeypatch):
    """A d_ff of a billion that the weights do not have is refused from a meta-device model."""
    perturb(T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 10**9}))
    import lmforge.model.builders as builders

    real_build = builders.build_model

    def build_on_meta_only(model_config):
        assert torch.empty(0).device.type == "meta", "a real model was built before the shapes were checked"
        return real_build(model_config)

    monkeypatch.setattr(builders, "build_model", build_on_meta_only)
    with pytest.raises(UserError, match=r"has shape \[48, 32\] but config.json implies \[1000000000, 32\]"):
        load(tmp_path)


def test_hf_package_keeps_the_old_module_names():
    """`lmforge.model.hf` is a package (one module per family); the names other code imports stay."""
    from lmforge.model import hf

    for name in ("LLAMA", "GPT2", "BERT", "config_from_hf", "import_state_dict", "interleaved_to_half_split",
                 "load_hf_model", "read_safetensors", "export_hf", "hf_family_for", "SUPPORTED_ARCHITECTURES"):
        assert hasattr(hf, name), name


# ----------------------------------------------------------------------------- our models -> HF


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_bpe_on_texts

    return train_bpe_on_texts(["the cat sat on the mat. the dog sat on the log. 123 cats!"] * 10, vocab_size=300)


OUR_CONFIGS = {
    "llama-gqa": dict(arch="gpt", n_kv_heads=2),
    "llama-interleaved-rope": dict(arch="gpt", rope_interleaved=True, rope_theta=300.0),
    "qwen2-style": dict(arch="gpt", qkv_bias=True),
    "mistral-window": dict(arch="gpt", sliding_window=5, tie_embeddings=False),
    "gpt2": dict(arch="gpt", position="learned", norm="layernorm", norm_bias=True, mlp="gelu_tanh",
                 qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "bert": dict(arch="bert", position="learned", norm="layernorm", norm_bias=True, norm_position="post",
                 embedding_norm=True, final_norm=False, mlp="gelu", qkv_bias=True, attn_out_bias=True,
                 mlp_bias=True, norm_eps=1e-12),
}


@pytest.mark.parametrize("name", OUR_CONFIGS)
def test_our_models_export_to_transformers(tmp_path, tokenizer, name):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                         **OUR_CONFIGS[name])
    model = perturb(build_model(config))
    export(model, tokenizer, tmp_path, "hf")
    is_bert = config.arch == "bert"
    reloaded = (T.AutoModelForMaskedLM if is_bert else T.AutoModelForCausalLM).from_pretrained(tmp_path).eval()
    text = "the cat sat on the log"
    ids = torch.tensor([tokenizer.encode(text)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert max_diff(model(ids, mask), reloaded(input_ids=ids, attention_mask=mask).logits, mask) < ATOL
    hf_tokenizer = T.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    again, again_tokenizer = load(tmp_path)
    assert again_tokenizer.encode(text) == ids[0].tolist()
    with torch.no_grad():
        assert max_diff(again(ids, mask), model(ids, mask), mask) < ATOL


@pytest.mark.parametrize("option,value", [
    ("position", "alibi"), ("position", "sinusoidal"), ("n_experts", 4), ("qk_norm", True), ("norm_position", "post"),
])
def test_options_without_an_hf_equivalent_are_named(tmp_path, option, value):
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, d_ff=64,
                         **{option: value})
    with pytest.raises(UserError, match=f"{option}="):
        export(build_model(config), None, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}')
    with pytest.raises(UserError, match="T5ForConditionalGeneration.*GPT2LMHeadModel, BertModel"):
        load(tmp_path)


def test_unsupported_hf_options_are_clear_errors(tmp_path):
    T.LlamaConfig(**_LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="RoPE scaling 'linear'"):
        resolve_config(tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_corrupt_safetensors_names_the_file(tmp_path):
    T.LlamaConfig(**_LLAMA).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="model.safetensors' is not a valid safetensors file"):
        load(tmp_path)


def test_shape_mismatch_names_the_file_and_tensor(tmp_path):
    perturb(T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' in '.*model.safetensors' "
                                        r"has shape \[48, 32\] but config.json implies \[64, 32\]"):
        load(tmp_path)


def test_missing_weights_file_and_missing_path(tmp_path):
    T.LlamaConfig(**_LLAMA).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no model.safetensors or pytorch_model.bin"):
        load(tmp_path)
    with pytest.raises(UserError, match="does not exist.*bundled model.*preset"):
        load(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(UserError, match="no config.json"):
        load(tmp_path / "..")


def test_unknown_preset_suggests_and_lists_presets():
    with pytest.raises(UserError, match=r"'gpt2-nan' is not a known model \(did you mean 'gpt2-nano'\?\).*nano, tiny"):
        load("gpt2-nan")


# ----------------------------------------------------------------------------- GGUF


def permute_for_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter: HF half-split q/k rows -> interleaved RoPE pairs."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path: os.PathLike, reference: torch.nn.Module, tied: bool) -> None:
    """The HF model as a GGUF, with every supported tensor type (Q4_0, Q4_1, Q8_0, F16, F32) in use."""
    import gguf
    from gguf.quants import quantize

    config, state = reference.config, reference.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)

    def add(name: str, tensor: torch.Tensor, kind: str = "F32") -> None:
        array = tensor.detach().numpy().astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, array)
        elif kind == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            quant_type = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(name, quantize(array, quant_type), raw_dtype=quant_type)

    add("token_embd.weight", state["model.embed_tokens.weight"], "Q8_0")
    add("output_norm.weight", state["model.norm.weight"])
    if not tied:
        add("output.weight", state["lm_head.weight"], "F16")
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[hf + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[hf + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute_for_gguf(state[hf + "self_attn.q_proj.weight"], 4), "Q4_0")
        add(f"blk.{i}.attn_k.weight", permute_for_gguf(state[hf + "self_attn.k_proj.weight"], 2), "Q4_1")
        add(f"blk.{i}.attn_v.weight", state[hf + "self_attn.v_proj.weight"], "Q8_0")
        add(f"blk.{i}.attn_output.weight", state[hf + "self_attn.o_proj.weight"], "F16")
        add(f"blk.{i}.ffn_gate.weight", state[hf + "mlp.gate_proj.weight"], "Q4_1")
        add(f"blk.{i}.ffn_up.weight", state[hf + "mlp.up_proj.weight"], "Q8_0")
        add(f"blk.{i}.ffn_down.weight", state[hf + "mlp.down_proj.weight"], "Q4_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_import_matches_transformers_reading_the_same_file(tmp_path, tied):
    from lmforge.model.gguf import load_gguf_model

    hf_config = T.LlamaConfig(**{**_LLAMA, "hidden_size": 64, "intermediate_size": 128}, rope_theta=5000.0,
                              rms_norm_eps=1e-5, tie_word_embeddings=tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", perturb(T.LlamaForCausalLM(hf_config)), tied)
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = load_gguf_model(tmp_path / "tiny.gguf")
    config = resolve_config(tmp_path / "tiny.gguf")
    assert config == ours.config
    assert (config.rope_theta, config.tie_embeddings, config.n_kv_heads, config.rope_interleaved) == (5000.0, tied, 2, False)
    ids, mask = batch()
    assert max_diff(our_output(ours, "logits", ids, mask, None), hf_output(reference, "logits", ids, mask, None),
                    mask) < ATOL


def test_gguf_errors(tmp_path):
    import gguf

    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(UserError, match="junk.gguf' is not a readable GGUF file"):
        load(tmp_path / "junk.gguf")
    with pytest.raises(UserError, match="junk.gguf' is not a readable GGUF file"):
        resolve_config(tmp_path / "junk.gguf")
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" + b"\x00" * 7 + b"\x05" + b"\x00" * 7
                                              + b"\xff" * 16)
    with pytest.raises(UserError, match="its header is truncated"):
        resolve_config(tmp_path / "truncated.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="is a 'bert' model; lmforge imports GGUF files of the llama architecture"):
        resolve_config(tmp_path / "bert.gguf")


@pytest.mark.parametrize("key, value, kind, message", [
    ("llama.block_count", 10**9, "UINT32", "says llama.block_count = 1000000000 but holds tensors for 2 layers"),
    ("llama.block_count", "two", "STRING", "llama.block_count = 'two', which is not a positive integer"),
    ("llama.attention.head_count", 0, "UINT32", "llama.attention.head_count = 0, which is not a positive integer"),
    ("llama.vocab_size", 999, "UINT32", "token_embd.weight has shape"),
])
def test_gguf_metadata_that_does_not_fit_is_refused_before_building(tmp_path, monkeypatch, key, value, kind, message):
    from gguf import GGUFValueType

    import lmforge.model.builders as builders
    from fuzz_support import write_gguf
    from lmforge.model import get_preset
    from lmforge.tokenizer import train_bpe_on_texts

    tokenizer = train_bpe_on_texts(["the cat sat on the mat"] * 4, vocab_size=280)
    model = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1))
    write_gguf(tmp_path / "m.gguf", model, tokenizer, {key: (value, GGUFValueType[kind])})
    monkeypatch.setattr(builders, "build_model", lambda config: pytest.fail("a model was built"))
    for read in (resolve_config, load):
        with pytest.raises(UserError, match=message):
            read(tmp_path / "m.gguf")
