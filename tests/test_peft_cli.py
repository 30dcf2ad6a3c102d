"""A PEFT-format LoRA adapter from the command line: `generate/chat/serve --adapter` and
`convert --merge-adapter` give the adapted model's outputs."""
from __future__ import annotations

import pytest
import torch

from lmforge import cli
from lmforge.model.loading import load, save_pretrained
from lmforge.peft import LoRAConfig, apply_lora, save_adapter

from train_support import make_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny model directory, an adapter (random non-zero B) for it, and the adapted model."""
    root = tmp_path_factory.mktemp("peft-cli")
    tokenizer_dir = make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]
    torch.manual_seed(0)
    base, tokenizer = load("nano", tokenizer=tokenizer_dir)
    save_pretrained(base, tokenizer, root / "base")
    model, _ = load(root / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.5)
    save_adapter(model, root / "adapter")
    return root, model.eval(), tokenizer


def test_convert_merge_adapter_writes_the_adapted_model(adapted, tmp_path):
    root, model, tokenizer = adapted
    assert cli.main(["convert", str(root / "base"), "--to", str(tmp_path / "merged"),
                     "--merge-adapter", str(root / "adapter")]) == 0
    merged, _ = load(tmp_path / "merged")
    base, _ = load(root / "base")
    ids = torch.tensor([tokenizer.encode("ROMEO: What light")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids), base(ids), atol=1e-3)     # the adapter changed the model


def test_generate_with_adapter_follows_the_adapted_model(adapted, capsys):
    root, model, tokenizer = adapted
    prompt = "ROMEO:"
    assert cli.main(["generate", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                     "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(6):                                   # greedy decoding of the adapted model by hand
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokenizer.decode(ids[len(tokenizer.encode(prompt)):]) in printed


def test_a_bad_adapter_directory_is_a_clear_error(adapted, tmp_path, capsys):
    root, _, _ = adapted
    assert cli.main(["generate", "--model", str(root / "base"), "--adapter", str(tmp_path / "missing"),
                     "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err and "Traceback" not in err
