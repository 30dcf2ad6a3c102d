"""Several LoRA adapters on one base model, one per batch row (lmforge.peft.multi_lora), in the
engine, the server and the CLI: each row must give exactly what that adapter merged alone gives,
and PEFT's mixed-batch inference (`adapter_names=`) is the reference."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import httpx
import peft
import pytest
import torch
import transformers
from torch import nn

from infer_support import load_tiny
from lmforge import cli
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.commands import load_engine
from lmforge.model import build_model, get_preset
from lmforge.model.loading import export, save_pretrained
from lmforge.peft import LoRAConfig, apply_lora, load_adapter, save_adapter, unload_lora
from lmforge.peft.multi_lora import MultiLoRALinear, load_adapters, parse_adapter_arguments
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
# (target modules, DoRA, rsLoRA, rank): different targets, ranks and scalings on one base.
KINDS = [(["q_proj", "v_proj"], False, False, 4), ("all-linear", False, True, 2), (["gate_proj", "down_proj"], False, False, 8)]
DORA = ("all-linear", True, False, 4)


def _save_adapters(base: nn.Module, root: Path, kinds, scale: float = 0.3) -> dict[str, str]:
    """One adapter per kind, with random non-zero B (and DoRA magnitudes off the row norms)."""
    directories = {}
    for index, (targets, dora, rslora, rank) in enumerate(kinds):
        model = copy.deepcopy(base)
        apply_lora(model, LoRAConfig(r=rank, alpha=8, target_modules=targets, use_dora=dora, use_rslora=rslora))
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
                elif name.endswith(".magnitude"):
                    param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        directories[f"adapter{index}"] = str(save_adapter(model, root / f"adapter{index}"))
    return directories


def _merged(base: nn.Module, directory: str) -> nn.Module:
    return unload_lora(load_adapter(copy.deepcopy(base), directory), merge=True).eval()


@pytest.mark.parametrize("overrides, kinds", [
    pytest.param({}, KINDS, id="llama"),
    pytest.param({"qkv_bias": True, "attn_out_bias": False}, KINDS + [DORA], id="qwen2-biases-dora"),
])
def test_each_row_gets_its_own_adapter_in_one_forward(tmp_path, overrides, kinds):
    torch.manual_seed(0)
    base = build_model(get_preset("nano", vocab_size=VOCAB, **overrides)).eval()
    directories = _save_adapters(base, tmp_path, kinds)
    multi = load_adapters(copy.deepcopy(base), directories).eval()
    ids = torch.randint(0, VOCAB, (2 * (len(kinds) + 1), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        references = [base(ids)] + [_merged(base, directory)(ids) for directory in directories.values()]
        for adapter, reference in enumerate(references):          # every row on one adapter
            with multi.adapter_set.routed([adapter] * len(ids)):
                torch.testing.assert_close(multi(ids), reference, atol=2e-5, rtol=1e-5)
            with multi.adapter_set.routed([adapter] * len(ids), mixed=True):   # the compiled step's path
                torch.testing.assert_close(multi(ids), reference, atol=2e-5, rtol=1e-5)
        mix = [row % len(references) for row in range(len(ids))]
        with multi.adapter_set.routed(mix):
            mixed = multi(ids)
        for row, adapter in enumerate(mix):
            torch.testing.assert_close(mixed[row], references[adapter][row], atol=2e-5, rtol=1e-5)
        for adapter in range(1, len(references)):                 # each adapter really changes the model
            assert not torch.allclose(references[adapter], references[0], atol=1e-3)
        assert torch.equal(multi(ids), references[0])             # outside `routed`: the base model
    # One copy of the base weights serves every adapter; the adapters are buffers beside it.
    assert sum(p.numel() for p in multi.parameters()) == sum(p.numel() for p in base.parameters())
    assert sum(isinstance(m, MultiLoRALinear) for m in multi.modules()) == 4 * base.config.n_layers  # fused qkv, gate_up


def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    """PEFT's own mixed-batch inference on our HF export, with our adapters, row by row."""
    torch.manual_seed(0)
    base = build_model(get_preset("nano", vocab_size=VOCAB)).eval()
    directories = _save_adapters(base, tmp_path, KINDS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export(base, None, tmp_path / "hf", "hf"))).eval()
    names = list(directories)
    reference = peft.PeftModel.from_pretrained(hf, directories[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        reference.load_adapter(directories[name], adapter_name=name)
    multi = load_adapters(copy.deepcopy(base), directories).eval()
    ids = torch.randint(0, VOCAB, (6, 11), generator=torch.Generator().manual_seed(2))
    mix = [0, 1, 2, 3, 2, 1]
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=[(["__base__"] + names)[a] for a in mix]).logits
        with multi.adapter_set.routed(mix):
            torch.testing.assert_close(multi(ids), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The tiny trained model, two adapters for it, and each adapter merged (the reference)."""
    root = tmp_path_factory.mktemp("multi-lora")
    base, tokenizer = load_tiny()
    base.eval()
    save_pretrained(base, tokenizer, root / "base")
    directories = _save_adapters(base, root, KINDS[:2], scale=0.5)
    merged = {name: _merged(base, directory) for name, directory in directories.items()}
    return root, base, tokenizer, directories, merged


PROMPTS = ["ROMEO: What light", "JULIET: O Romeo", "To be or not"]


def _greedy(model, tokenizer, prompt: str, tokens: int = 10) -> list[int]:
    return Engine(model, tokenizer, max_batch_size=1).generate(
        [prompt], SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("engine_options", [{}, {"prompt_lookup": 3}], ids=["plain", "prompt-lookup"])
def test_engine_decodes_requests_for_different_adapters_in_one_batch(served_model, engine_options):
    _, base, tokenizer, directories, merged = served_model
    multi = load_adapters(copy.deepcopy(base), directories).eval()
    engine = Engine(multi, tokenizer, max_batch_size=12, **engine_options)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    requests = [(prompt, adapter) for prompt in PROMPTS for adapter in [None, *directories]]
    sequences = [engine.submit(prompt, params, adapter=adapter) for prompt, adapter in requests]
    while not all(sequence.finished for sequence in sequences):
        engine.step()
    assert engine.stats.peak_running == len(requests)       # all of them decoded together
    outputs = {}
    for (prompt, adapter), sequence in zip(requests, sequences):
        expected = _greedy(base if adapter is None else merged[adapter], tokenizer, prompt)
        assert sequence.token_ids == expected, (prompt, adapter)
        outputs.setdefault(prompt, set()).add(tuple(sequence.token_ids))
    # The same prompt for different adapters was prefilled for each (not shared) and differs.
    assert all(len(texts) > 1 for texts in outputs.values())
    assert engine.generate([PROMPTS[0]], params, adapter="adapter1")[0].token_ids == \
        _greedy(merged["adapter1"], tokenizer, PROMPTS[0])


def test_compiled_decode_step_routes_each_row(served_model):
    _, base, tokenizer, directories, merged = served_model
    multi = load_adapters(copy.deepcopy(base), directories).eval()
    engine = Engine(multi, tokenizer, max_batch_size=4, compile=True)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    requests = [(PROMPTS[0], None), (PROMPTS[0], "adapter0"), (PROMPTS[1], "adapter1")]
    sequences = [engine.submit(prompt, params, adapter=adapter) for prompt, adapter in requests]
    while not all(sequence.finished for sequence in sequences):
        engine.step()
    for (prompt, adapter), sequence in zip(requests, sequences):
        assert sequence.token_ids == _greedy(base if adapter is None else merged[adapter], tokenizer, prompt, 8)


def test_quantized_base_keeps_the_adapters(served_model):
    from lmforge.quant.quantize import apply_precision

    _, base, tokenizer, directories, _ = served_model
    multi = apply_precision(load_adapters(copy.deepcopy(base), directories), quantize="q4_0")
    plain = apply_precision(copy.deepcopy(base), quantize="q4_0")
    layer = multi.transformer.blocks[0].attn.qkv
    assert isinstance(layer, MultiLoRALinear) and not isinstance(layer.base, nn.Linear)   # the base is packed
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(multi(ids), plain(ids))
        with multi.adapter_set.routed([1]):
            assert not torch.allclose(multi(ids), plain(ids), atol=1e-3)


def test_bad_adapters_and_names_are_user_errors(served_model, tmp_path):
    root, base, tokenizer, directories, _ = served_model
    multi = load_adapters(copy.deepcopy(base), directories)
    engine = Engine(multi, tokenizer, max_batch_size=2)
    with pytest.raises(UserError, match="no adapter named 'other'.*adapter0, adapter1"):
        engine.submit("x", adapter="other")
    with pytest.raises(UserError, match="has no adapters loaded"):
        Engine(base, tokenizer, max_batch_size=1).submit("x", adapter="adapter0")
    with pytest.raises(UserError, match="already has adapters"):
        load_adapters(multi, directories)
    with pytest.raises(UserError, match="not usable as a model name"):
        load_adapters(copy.deepcopy(base), {"bad name": directories["adapter0"]})
    with pytest.raises(UserError, match="missing"):
        load_adapters(copy.deepcopy(base), {"a": str(tmp_path / "missing")})
    from lmforge.peft.prompt import PromptConfig, apply_prompt_tuning, save_prompt_adapter

    prompted = apply_prompt_tuning(copy.deepcopy(base), PromptConfig(num_virtual_tokens=2))
    save_prompt_adapter(prompted, tmp_path / "prompt")
    with pytest.raises(UserError, match="prompt-learning adapter"):
        load_adapters(copy.deepcopy(base), {"p": str(tmp_path / "prompt")})
    with pytest.raises(UserError, match="names 'a' twice"):
        parse_adapter_arguments(["a=x", "a=y"])
    with pytest.raises(UserError, match="is not NAME=DIR"):
        parse_adapter_arguments(["=x"])
    assert parse_adapter_arguments("dir") == [(None, "dir")]
    with pytest.raises(UserError, match="also the model's name"):
        create_app(engine, "adapter0")


def test_server_serves_each_adapter_under_its_name(served_model):
    _, base, tokenizer, directories, merged = served_model
    multi = load_adapters(copy.deepcopy(base), directories).eval()
    engine = Engine(multi, tokenizer, max_batch_size=8, context_policy="error")
    with BackgroundServer(create_app(engine, "tiny")) as server:
        listed = httpx.get(server.url + "/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [("tiny", None), ("adapter0", "tiny"), ("adapter1", "tiny")]
        for model_id in ["tiny", "adapter0", "adapter1"]:
            body = {"model": model_id, "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0}
            reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
            assert reply["model"] == model_id
            reference = base if model_id == "tiny" else merged[model_id]
            expected = Engine(reference, tokenizer, max_batch_size=1).generate(
                [PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0))[0].text
            assert reply["choices"][0]["text"] == expected
        refused = httpx.post(server.url + "/v1/completions", json={"model": "other", "prompt": "x"}, timeout=60)
        assert refused.status_code == 400
        assert "'tiny' or 'adapter0' or 'adapter1'" in refused.json()["error"]["message"]


def test_cli_loads_named_adapters_for_serve_and_refuses_several_elsewhere(served_model, capsys):
    root, _, tokenizer, directories, merged = served_model
    pairs = [f"{name}={directory}" for name, directory in directories.items()]
    args = argparse.Namespace(model=str(root / "base"), adapter=pairs, device="cpu", context_policy="error")
    engine = load_engine(args, max_batch_size=4, several=True)
    assert engine.adapters.names == list(directories)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert engine.generate([PROMPTS[2]], params, adapter="adapter1")[0].token_ids == \
        _greedy(merged["adapter1"], tokenizer, PROMPTS[2], 6)
    unnamed = argparse.Namespace(**{**vars(args), "adapter": [pairs[0], directories["adapter1"]]})
    with pytest.raises(UserError, match="has no name"):
        load_engine(unnamed, several=True)
    arguments = ["generate", "--model", str(root / "base"), "--prompt", "x", "--max-new-tokens", "2"]
    assert cli.main(arguments + [item for pair in pairs for item in ("--adapter", pair)]) == 2
    err = capsys.readouterr().err
    assert "lmforge serve --adapter NAME=DIR" in err and "Traceback" not in err
    # One NAME=DIR outside serve is merged, as a bare DIR is.
    assert cli.main(arguments + ["--adapter", pairs[0]]) == 0
    assert json.loads((Path(directories["adapter0"]) / "adapter_config.json").read_text())["peft_type"] == "LORA"
