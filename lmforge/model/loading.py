"""`load(ref)`: every kind of model reference behind one call, and the lmforge model format.

    from lmforge import load
    model, tokenizer = load("smollm2-135m-instruct")     # bundled GGUF (Llama family)
    model, tokenizer = load("minilm-l6")                 # bundled BERT (HF directory)
    model, tokenizer = load("runs/shakespeare-gpt")      # our run: best (else latest) checkpoint
    model, tokenizer = load("path/to/hf-model")          # HF: GPT-2, BERT, Llama, Mistral, Qwen2
    model, tokenizer = load("model.Q8_0.gguf")           # GGUF, Llama family
    model, _ = load("tiny")                              # a preset, randomly initialised
    logits = model(input_ids)                            # [B, T, V]

A reference is, in the order they are tried:
1. a bundled model name (`smollm2-135m-instruct`, `minilm-l6`);
2. a preset name (`tiny`, `gpt2-124m`, ...): random weights; the tokenizer is None unless you
   pass one (`load("tiny", tokenizer="artifacts/tok")`), which also sets the vocabulary size;
3. a path: a `.gguf` file, an lmforge model/checkpoint directory, a run directory
   (`runs/<name>/`, whose `checkpoints/` holds the checkpoints), or an HF model directory.
   Write `./tiny` to load a directory that shares a preset's name.

The lmforge format (`save_pretrained`, `lmforge convert --format lmforge`, training runs):

    DIR/config.json        the ModelConfig as JSON, plus "format": "lmforge"
    DIR/model.safetensors  the weights; a tied output head is stored once (as the embedding)
    DIR/tokenizer/         the tokenizer (tokenizer.json + tokenizer_config.json), if any

A checkpoint directory (`runs/<name>/checkpoints/step-NNNNNN/`) has the same two files (plus
the trainer state); its `ema.safetensors`, when present, is what loads: those are the weights
its validation loss was measured with. Its tokenizer is the run's (`runs/<name>/tokenizer/`).

Weights the source does not have keep their random initialisation and are listed in
`model.missing_weights` (a BertModel has no MLM head, which `load` warns about; a
BertForMaskedLM has no pooler).
"""
from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import assets
from ..errors import UserError
from ..io import apply_default_modes, ensure_writable_dir, read_json, write_json_atomic
from .config import ModelConfig
from .presets import PRESETS, get_preset

FORMAT = "lmforge"
# Bundled real models: name -> (what it is, where its files are).
BUNDLED: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct, a Llama-family chat model (Q4_1 GGUF)", assets.smollm2_gguf_path),
    "minilm-l6": ("all-MiniLM-L6-v2, a 6-layer BERT (HF directory, BertModel)", assets.minilm_dir),
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ModelSource:
    """What a reference points to, found without reading any weights."""

    kind: str                       # "lmforge" | "hf" | "gguf" | "preset"
    description: str                # for people: what was found (and which checkpoint was picked)
    path: Path | None = None        # the model directory or .gguf file; None for presets
    weights: Path | None = None     # lmforge: the safetensors file to load
    tokenizer: Path | None = None   # lmforge: the tokenizer directory, if there is one
    preset: str | None = None


# ----------------------------------------------------------------------------- finding a reference


def locate(ref: str | os.PathLike) -> ModelSource:
    """Classify a model reference (see the module docstring) or explain what is accepted."""
    text = str(ref)
    if text in BUNDLED:
        description, where = BUNDLED[text]
        path = where()
        return ModelSource("gguf" if path.suffix == ".gguf" else "hf", description, path=path)
    if text in PRESETS:
        return ModelSource("preset", f"preset '{text}' (random weights)", preset=text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return ModelSource("gguf", f"GGUF file '{path}'", path=path)
        raise UserError(f"'{path}' is a file but not a .gguf model; pass the model directory that contains it "
                        "(with config.json), or a .gguf file")
    if path.is_dir():
        return _locate_directory(path)
    raise UserError(_unknown_ref_message(text))


def _unknown_ref_message(ref: str) -> str:
    names = list(BUNDLED) + list(PRESETS)
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    looks_like_path = os.sep in ref or ref.endswith((".gguf", ".safetensors")) or ref.startswith(".")
    what = f"'{ref}' does not exist" if looks_like_path else f"'{ref}' is not a known model{hint}"
    return (f"{what}; a model reference is an lmforge run, checkpoint or model directory, a Hugging Face model "
            f"directory, a .gguf file, a bundled model ({', '.join(BUNDLED)}) or a preset "
            f"({', '.join(PRESETS)})")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def is_lmforge_config(data: Any) -> bool:
    """Our config.json says "format": "lmforge"; a bare ModelConfig dict (arch, no model_type) counts too."""
    if not isinstance(data, dict):
        raise UserError("a model's config.json must be a JSON object of settings, not "
                        f"{type(data).__name__}; re-export the model")
    return data.get("format") == FORMAT or ("arch" in data and "model_type" not in data)


def _locate_directory(directory: Path) -> ModelSource:
    if (directory / "checkpoints").is_dir():
        return _locate_run(directory)
    return _locate_model_directory(directory)


def _locate_model_directory(directory: Path) -> ModelSource:
    """A directory with config.json: ours (model or checkpoint) or Hugging Face's."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"'{directory}' has no config.json; give a model directory (config.json + "
                        "model.safetensors), a run directory (with checkpoints/) or a .gguf file")
    data = read_json(config_file, "model config")
    if not is_lmforge_config(data):
        return ModelSource("hf", f"Hugging Face model directory '{directory}'", path=directory)
    is_checkpoint = (directory / "checkpoint.json").is_file()
    ema = directory / "ema.safetensors"
    weights = ema if is_checkpoint and ema.is_file() else directory / "model.safetensors"
    tokenizer = directory / "tokenizer"
    if not tokenizer.is_dir() and directory.parent.name == "checkpoints":
        tokenizer = directory.parent.parent / "tokenizer"      # a checkpoint uses its run's tokenizer
    kind = "checkpoint" if is_checkpoint else "model directory"
    description = f"lmforge {kind} '{directory}'" + (" (EMA weights)" if weights == ema else "")
    return ModelSource("lmforge", description, path=directory, weights=weights,
                       tokenizer=tokenizer if tokenizer.is_dir() else None)


def _locate_run(run_dir: Path) -> ModelSource:
    """A run directory: its best checkpoint (best.json), else its latest, else its final export."""
    from ..rundir import list_checkpoints, read_best

    best = read_best(run_dir)
    checkpoints = dict(list_checkpoints(run_dir))
    if best is not None and best.get("step") in checkpoints:
        chosen, why = checkpoints[best["step"]], f"best, val_loss {best.get('val_loss', float('nan')):.4f}"
    elif checkpoints:
        chosen, why = checkpoints[max(checkpoints)], "latest"
    elif (run_dir / "config.json").is_file() and (run_dir / "model.safetensors").is_file():
        source = _locate_model_directory(run_dir)
        source.description = f"lmforge run '{run_dir}' (final weights; no checkpoint)"
        return source
    else:
        raise UserError(f"run directory '{run_dir}' has no complete checkpoint in checkpoints/ yet; "
                        "train longer or point to another run")
    source = _locate_model_directory(chosen)
    source.description = f"lmforge run '{run_dir}': {chosen.name} ({why})"
    if source.tokenizer is None and (run_dir / "tokenizer").is_dir():
        source.tokenizer = run_dir / "tokenizer"
    return source


# ----------------------------------------------------------------------------- configs (cheap)


def resolve_config(ref: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a reference, from config.json, GGUF metadata or the preset; no weights are read."""
    source = locate(ref)
    if source.kind == "preset":
        return get_preset(source.preset)
    if source.kind == "gguf":
        from .gguf import gguf_config

        return gguf_config(source.path)
    if source.kind == "hf":
        from .hf import config_from_hf

        config_file = source.path / "config.json"
        return config_from_hf(read_json(config_file, "Hugging Face config"), f"'{config_file}'")
    return _lmforge_config(source.path)


def _lmforge_config(directory: Path) -> ModelConfig:
    config_file = directory / "config.json"
    from .hf.families import checked_types

    data = read_json(config_file, "model config")
    is_lmforge_config(data)                          # a JSON object, or a clear error
    data = dict(data)
    for key in ("format", "base_model", "peft", "quantization"):   # an adapter checkpoint also names its base
        data.pop(key, None)
    try:
        config = ModelConfig.from_dict(data)
    except UserError as error:
        raise UserError(f"'{config_file}': {error}") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as error:
        raise UserError(f"'{config_file}' is not a valid lmforge model config ({error}); re-export the model") from None
    # JSON may say 2.5 layers or 1e999 tokens: the types are checked before anything is built.
    return checked_types(config, f"'{config_file}'")


# ----------------------------------------------------------------------------- loading


def load(ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for any reference (see the module docstring).

    dtype: None keeps fp32 (GGUF tensors are dequantized to fp32; HF bf16/fp16 weights are
    upcast); pass torch.bfloat16 or "bf16" to halve the memory. `tokenizer` (an object or a
    path for `load_tokenizer`) overrides the reference's own tokenizer.
    """
    source = locate(ref)
    dtype = _as_dtype(dtype)
    explicit_tokenizer = _as_tokenizer(tokenizer)
    source_tokenizer = None
    missing: list[str] = []
    if source.kind == "preset":
        overrides = {"vocab_size": explicit_tokenizer.vocab_size} if explicit_tokenizer is not None else {}
        from .builders import build_model

        model = build_model(get_preset(source.preset, **overrides))
    elif source.kind == "lmforge":
        model = _load_lmforge(source)
        if explicit_tokenizer is None and source.tokenizer is not None:
            source_tokenizer = _as_tokenizer(source.tokenizer)
    elif source.kind == "hf":
        from .hf import load_hf_model

        model, missing = load_hf_model(source.path)
        if explicit_tokenizer is None and _has_tokenizer_files(source.path):
            source_tokenizer = _as_tokenizer(source.path)
    else:
        from ..tokenizer import BPETokenizer
        from .gguf import load_gguf_model, open_gguf

        reader = open_gguf(source.path)   # parsing a GGUF's metadata takes seconds: share the reader
        model = load_gguf_model(source.path, reader=reader)
        if explicit_tokenizer is None:
            source_tokenizer = BPETokenizer.from_gguf(reader)
    final_tokenizer = explicit_tokenizer if explicit_tokenizer is not None else source_tokenizer
    _check_vocabulary(model.config, final_tokenizer, ref)
    head = [name for name in missing if name.startswith("mlm_")]
    if head:
        # A BertModel checkpoint: the trunk is real but model(input_ids) would use a random MLM head.
        warnings.warn(f"{ref}: the checkpoint has no MLM head ({', '.join(head)}), so those weights are random "
                      "and model(input_ids) logits are meaningless; use model.hidden_states(input_ids)",
                      stacklevel=2)
    model.missing_weights = missing
    if getattr(model, "quantization", None):
        # Casting would also cast the kernels' bf16 copies of the scales: a quantized model keeps its dtypes.
        if dtype != torch.float32:
            raise UserError(f"'{ref}' is a {model.quantization}-quantized model, which loads as saved; "
                            "leave out the dtype (or load the float model it came from)")
        return model.to(device=device).eval(), final_tokenizer
    return model.to(device=device, dtype=dtype).eval(), final_tokenizer


def _load_adapted(source: ModelSource, data: dict[str, Any]) -> nn.Module:
    """A LoRA checkpoint: its base (`base_model`, any reference) with the adapters it holds."""
    from ..peft.lora import LoRAConfig, apply_lora, load_lora_state_dict
    from .hf import read_safetensors

    peft = dict(data.get("peft") or {})
    kind = peft.pop("type", None)
    if kind not in ("lora", "qlora", "prompt", "prefix", "ptuning"):
        raise UserError(f"'{source.path / 'config.json'}' names a base model but no LoRA settings; re-export it")
    base, _ = load(data["base_model"])
    if kind in ("prompt", "prefix", "ptuning"):     # a prompt adapter: the base wrapped, the prompt loaded
        from ..peft.prompt import PromptConfig, apply_prompt_tuning

        adapted = apply_prompt_tuning(base, PromptConfig(**{**peft, "init": "random"}))
        state = read_safetensors(source.weights)
        adapted.load_state_dict({**adapted.state_dict(), **state})
        return adapted
    blocksize = peft.pop("blocksize", 64)
    apply_lora(base, LoRAConfig(**peft).validate())
    load_lora_state_dict(base, read_safetensors(source.weights))
    if kind == "qlora":                             # the base re-quantized as in training (deterministic)
        from ..peft.qlora import quantize_base

        quantize_base(base, blocksize)
    return base


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _as_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer                # None, or already a tokenizer object
    from ..tokenizer import load_tokenizer

    return load_tokenizer(tokenizer)


def _has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()


def _check_vocabulary(config: ModelConfig, tokenizer: Any, ref: Any) -> None:
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model '{ref}' has an embedding for "
                        f"{config.vocab_size}; use the tokenizer the model was trained with")


def _load_lmforge(source: ModelSource) -> nn.Module:
    from .builders import build_model
    from .builders import tied_names
    from .hf import read_safetensors

    data = read_json(source.path / "config.json", "model config")
    if "base_model" in data:
        return _load_adapted(source, data)
    config = _lmforge_config(source.path)
    file = source.weights
    if not file.is_file():
        raise UserError(f"'{source.path}' has no {file.name}; the model directory is incomplete (re-export it)")
    from .hf.importing import expected_shapes

    state = read_safetensors(file)
    if "quantization" in data:               # saved after --quantize: its layers rebuilt, then loaded
        from ..quant.quantize import load_quantized

        return load_quantized(build_model(config), data["quantization"], state,
                              f"'{source.path / 'config.json'}'", f"'{source.weights}'")
    blocks = {int(name.split(".")[2]) for name in state if name.startswith("transformer.blocks.")}
    if len(blocks) != config.n_layers:      # checked first: building 10^8 layers, even on meta, never ends
        raise UserError(f"'{source.path / 'config.json'}' says n_layers={config.n_layers} but '{file}' holds "
                        f"{len(blocks)} blocks; the weights and config.json do not match")
    expected = expected_shapes(config)      # on the meta device: a bad config costs no memory
    for name, shape in expected.items():    # in model order, so the first mismatch is reported
        if name in state and state[name].shape != shape:
            raise UserError(f"tensor '{name}' in '{file}' has shape {list(state[name].shape)} but config.json "
                            f"implies {list(shape)}; the weights and config.json do not match")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"'{file}' has a tensor '{unexpected[0]}' that the model in config.json does not have; "
                        "the weights and config.json do not match")
    model = build_model(config)
    absent = sorted(set(expected) - set(state) - tied_names(model))
    if absent:
        raise UserError(f"'{file}' lacks the tensor '{absent[0]}' ({len(absent)} missing); "
                        "the file is incomplete or belongs to another model")
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------- saving


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target`; when the block succeeds it replaces `target`.

    A failure (or a kill) leaves `target` as it was. An existing `target` is replaced only if it
    is empty or a model directory (has config.json), so a typo cannot wipe unrelated files.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir() or (any(target.iterdir()) and not (target / "config.json").is_file()):
            raise UserError(f"'{target}' exists and is not a model directory; choose a new output path "
                            "(an existing model directory there would be replaced)")
    ensure_writable_dir(target.parent)
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield temporary
        apply_default_modes(temporary)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def save_pretrained(model: nn.Module, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write `model` (and `tokenizer`, if not None) in the lmforge format; `load(directory)` reads it back."""
    from safetensors.torch import save_file

    from .builders import tied_names

    from ..quant.quantize import saved_quantization

    aliases = tied_names(model)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
             if name not in aliases}
    quantization = saved_quantization(model)            # codes and scales, as the layers hold them
    extra = {} if quantization is None else {"quantization": quantization}
    with atomic_directory(directory) as temporary:
        save_file(state, str(temporary / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(temporary / "config.json", {"format": FORMAT, **model.config.to_dict(), **extra})
        if tokenizer is not None:
            tokenizer.save(temporary / "tokenizer")
    return Path(directory)


def export(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, format: str = FORMAT) -> Path:
    """Save as `format` "lmforge" (save_pretrained) or "hf" (transformers-loadable), atomically."""
    if format == FORMAT:
        return save_pretrained(model, tokenizer, directory)
    if format != "hf":
        raise UserError(f"unknown format '{format}'; use 'lmforge' or 'hf'")
    if getattr(model, "quantization", None):
        raise UserError(f"a {model.quantization}-quantized model saves in the lmforge format only (transformers "
                        "has no reader for it); use --format lmforge, or leave out --quantize")
    from .hf import export_hf, hf_family_for

    hf_family_for(model.config)   # fail before touching the output directory
    with atomic_directory(directory) as temporary:
        export_hf(model, tokenizer, temporary)
    return Path(directory)
