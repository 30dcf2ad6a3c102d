"""The lmforge model format, run and checkpoint directories, presets, and atomic saving."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.model.builders import tied_names
from lmforge.model.loading import atomic_directory, load, locate, resolve_config, save_pretrained


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_bpe_on_texts

    return train_bpe_on_texts(["the cat sat on the mat. the dog sat on the log."] * 10, vocab_size=290)


def ids_for(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("the cat sat on the log")])


@pytest.mark.parametrize("preset", ["nano", "gpt2-nano", "bert-nano", "moe-tiny"])
def test_save_and_load_round_trip(tmp_path, tokenizer, preset):
    model, _ = load(preset, tokenizer=tokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size
    save_pretrained(model, tokenizer, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["format"] == "lmforge" and config["arch"] == model.config.arch
    stored = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert tied_names(model) and not tied_names(model) & set(stored), "a tied head must be stored once"
    again, again_tokenizer = load(tmp_path / "saved")
    assert again.config == model.config
    assert again_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert tied_names(again) == tied_names(model)
    with torch.no_grad():
        assert torch.equal(again(ids_for(tokenizer)), model(ids_for(tokenizer)))
    assert resolve_config(tmp_path / "saved") == model.config


def test_presets_without_a_tokenizer_and_dtype(tmp_path, tokenizer):
    model, no_tokenizer = load("nano")
    assert no_tokenizer is None and model.config == get_preset("nano") and not model.training
    half, _ = load("nano", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        load("nano", dtype="fp8")
    with pytest.raises(UserError, match=f"the tokenizer has {tokenizer.vocab_size} tokens but model .* has an embedding for 100"):
        small = build_model(get_preset("nano", vocab_size=100))
        save_pretrained(small, None, tmp_path / "small")
        load(tmp_path / "small", tokenizer=tokenizer)


def _checkpoint(run_dir, step, model, ema_model=None, tokenizer=None):
    from lmforge.train.checkpoint import save_checkpoint

    aliases = tied_names(model)
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in aliases}
    ema = {name: tensor for name, tensor in ema_model.state_dict().items() if name not in aliases} if ema_model else None
    return save_checkpoint(run_dir, step, state, {}, {}, ema_state=ema, model_config=model.config.to_dict())


def test_run_directory_picks_the_best_then_the_latest_checkpoint(tmp_path, tokenizer):
    from lmforge.train.checkpoint import record_best

    run = tmp_path / "runs" / "demo"
    config = get_preset("nano", vocab_size=tokenizer.vocab_size)
    models = {step: build_model(config).eval() for step in (10, 20)}
    for step, model in models.items():
        _checkpoint(run, step, model)
    tokenizer.save(run / "tokenizer")
    x = ids_for(tokenizer)

    record_best(run, 10, 1.25)
    source = locate(run)
    assert "step-000010 (best, val_loss 1.2500)" in source.description
    best, best_tokenizer = load(run)
    assert best_tokenizer.fingerprint() == tokenizer.fingerprint()
    with torch.no_grad():
        assert torch.equal(best(x), models[10](x))

    (run / "best.json").unlink()
    latest, _ = load(run)
    with torch.no_grad():
        assert torch.equal(latest(x), models[20](x))

    # A checkpoint directory on its own uses the run's tokenizer.
    _, checkpoint_tokenizer = load(run / "checkpoints" / "step-000010")
    assert checkpoint_tokenizer.fingerprint() == tokenizer.fingerprint()


def test_checkpoint_with_ema_loads_the_ema_weights(tmp_path):
    config = get_preset("nano")
    raw, ema = build_model(config).eval(), build_model(config).eval()
    path = _checkpoint(tmp_path / "run", 5, raw, ema_model=ema)
    loaded, _ = load(path)
    x = torch.randint(0, config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x), ema(x))
    assert "EMA weights" in locate(path).description


def test_trainer_config_json_without_format_key_is_accepted(tmp_path):
    """The training loop writes ModelConfig.to_dict() as config.json (no "format" key)."""
    model = build_model(get_preset("nano"))
    save_pretrained(model, None, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data.pop("format")
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    assert locate(tmp_path / "m").kind == "lmforge"


def test_bad_lmforge_directories_are_clear_errors(tmp_path):
    model = build_model(get_preset("nano"))
    save_pretrained(model, None, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    good = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**good, "d_model": 32}))
    with pytest.raises(UserError, match=r"tensor 'transformer.embed_tokens.weight' in '.*model.safetensors' has "
                                        r"shape \[512, 64\] but config.json implies \[512, 32\]"):
        load(tmp_path / "m")

    config_file.write_text(json.dumps({**good, "n_layers": 3}))
    with pytest.raises(UserError, match="says n_layers=3 but '.*model.safetensors' holds 2 blocks"):
        load(tmp_path / "m")
    config_file.write_text(json.dumps({**good, "n_layers": 10**8}))     # refused before anything is built
    with pytest.raises(UserError, match="holds 2 blocks"):
        load(tmp_path / "m")
    config_file.write_text(json.dumps({**good, "n_layers": 2.5}))
    with pytest.raises(UserError, match="n_layers=2.5, which is not an integer"):
        load(tmp_path / "m")
    config_file.write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a JSON object"):
        load(tmp_path / "m")

    config_file.write_text(json.dumps({**good, "n_layerz": 3}))
    with pytest.raises(UserError, match="unknown keys \\['n_layerz'\\]"):
        resolve_config(tmp_path / "m")

    config_file.write_text(json.dumps(good))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="is not a valid safetensors file"):
        load(tmp_path / "m")


def test_atomic_directory_keeps_the_old_model_on_failure_and_protects_other_files(tmp_path):
    model = build_model(get_preset("nano"))
    save_pretrained(model, None, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "m") as temporary:
            (temporary / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "the temporary directory must be removed"

    save_pretrained(build_model(get_preset("nano")), None, tmp_path / "m")   # replacing a model dir is fine
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a model directory"):
        save_pretrained(model, None, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
