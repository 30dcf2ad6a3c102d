"""A QLoRA base loaded straight into NF4: the whole fp32 model never exists.

    model, tokenizer = load_qlora("smollm2-135m-instruct", LoRAConfig(r=16, target_modules="all-linear"))
    # = load(ref) then apply_qlora(model, config): the same model, a third of the peak memory

Why. `load(ref)` then `apply_qlora(model)` holds the checkpoint's tensors and the whole fp32 model
(for SmolLM2-135M ~1.3 GB at the peak) before the first layer is quantized, for a base whose block
weights end up taking 55 MB in NF4. Here:

1. the model is built with its parameters on the meta device (no memory; buffers such as the RoPE
   tables are computed as usual, since no checkpoint holds them), and the LoRA layers are added;
2. the checkpoint is read one tensor at a time, in model order: each linear layer gets its fp32
   weight, is quantized to NF4 (with its adapters drawn first) and drops the fp32 copy before the
   next tensor is read. The embedding, norms and output head stay fp32, as in `apply_qlora`.

The peak is then the fp32 embedding + the NF4 blocks + one fused weight and its parts.

The result is `apply_qlora`'s: the same fp32 weights (read and renamed by the same tables as
`lmforge.load`: `hf_state_from_gguf`, the HF family rules) quantized by the same function, so the
NF4 bytes and the logits are identical (tested). One difference: the LoRA A matrices are drawn
right after the seed rather than after a random initialisation of the base (which is skipped), so
a run starts from other (equally seeded, deterministic) adapter values than load + apply_qlora.

Read this way: GGUF files (the bundled SmolLM2) and Hugging Face directories with safetensors
weights (GPT-2, Llama, Mistral, Qwen2). Anything else (a preset, an lmforge run or checkpoint,
pytorch_model.bin weights, a BERT) is loaded whole and then quantized (`apply_qlora`).
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .lora import LoRAAdapter, LoRAConfig, LoRALinear, apply_lora
from .qlora import NF4FrozenLinear, QLoRALinear, apply_qlora, check_blocksize
from .targets import OUTPUT_HEADS, parent_of


@dataclass
class TensorStream:
    """A checkpoint read one tensor at a time, under our names (nothing is read until `read`)."""

    config: Any                                  # the ModelConfig
    shapes: dict[str, torch.Size]                # our tensor name -> shape, checked against the model
    read: Callable[[str], torch.Tensor]          # our tensor name -> its values in fp32
    tokenizer: Callable[[], Any]                 # the source's own tokenizer (or None)
    maps_file: bool = False                      # `read` returns views of a memory-mapped file


def load_qlora(reference: str | os.PathLike, config: LoRAConfig | None = None, blocksize: int = 64,
               double_quant: bool = True, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model with LoRA adapters on an NF4 base, in eval mode, tokenizer or None): what
    `load(reference, tokenizer=tokenizer)` + `apply_qlora(model, config, blocksize)` give."""
    from ..model.loading import _as_tokenizer, _check_vocabulary, load, locate

    check_blocksize(blocksize)
    stream = open_stream(locate(reference))
    if stream is None:                               # not streamable: whole, then quantized
        model, tokenizer = load(reference, tokenizer=tokenizer)
        return apply_qlora(model.float(), config, blocksize, double_quant), tokenizer
    explicit = _as_tokenizer(tokenizer)
    final_tokenizer = explicit if explicit is not None else stream.tokenizer()
    _check_vocabulary(stream.config, final_tokenizer, reference)
    model = build_quantized(stream, config, blocksize, double_quant)
    model.missing_weights = []
    return model.eval(), final_tokenizer


def build_quantized(stream: TensorStream, config: LoRAConfig | None, blocksize: int = 64,
                    double_quant: bool = True, on_layer: Callable[[str], None] | None = None) -> nn.Module:
    """The model of `stream.config` with LoRA (`config`) on an NF4 base, filled from `stream` layer
    by layer. `on_layer(path)` is called after each linear layer is quantized (tests count on it)."""
    from ..errors import UserError
    from ..model.builders import build_model

    with parameters_on_meta():
        model = build_model(stream.config)
    apply_lora(model, config)                         # adapters on meta too: drawn below, with their layer
    aliases = _tied_aliases(model)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()
                if name not in aliases and ".lora." not in name}
    for name, shape in expected.items():              # in model order: the first problem is the one named
        if stream.shapes.get(name) != shape:
            found = "lacks it" if name not in stream.shapes else f"has shape {list(stream.shapes[name])}"
            raise UserError(f"the checkpoint {found} for '{name}' but the model needs {list(shape)}; "
                            "the weights and their config do not match")
    unexpected = sorted(set(stream.shapes) - set(expected))
    if unexpected:
        raise UserError(f"the checkpoint has a tensor '{unexpected[0]}' the model does not have; "
                        "the weights and their config do not match")
    if set(expected) - {name for name, _ in model.named_parameters()}:      # a model bug, not user input
        raise RuntimeError("layer-by-layer loading fills parameters only; this model has persistent buffers")
    paths = [path for path, _ in model.named_modules() if ".lora" not in f".{path}"]
    for path in paths:                                # paths, not modules: a replaced layer is freed at once
        module = model.get_submodule(path)
        head = path.rsplit(".", 1)[-1] in OUTPUT_HEADS
        quantized = not head and (isinstance(module, LoRALinear) or type(module) is nn.Linear)
        _fill(module, f"{path}." if path else "", stream, aliases, transient="weight" if quantized else None)
        if isinstance(module, LoRALinear):
            _draw_adapters(module)
            if not head:
                QLoRALinear.from_lora(module, blocksize, double_quant)
        elif type(module) is nn.Linear and not head:
            parent, attribute = parent_of(model, path)
            setattr(parent, attribute, NF4FrozenLinear(module, blocksize, double_quant))
            del module
        else:
            continue
        if on_layer is not None and not head:
            on_layer(path)
    for alias, source in aliases.items():             # a tied head is the embedding again
        parent, attribute = parent_of(model, alias)
        setattr(parent, attribute, model.get_parameter(source))
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise RuntimeError(f"layer-by-layer loading left {left[:3]} unfilled")
    model.qlora_blocksize = blocksize
    return model


def _fill(module: nn.Module, prefix: str, stream: TensorStream, aliases: dict[str, str],
          transient: str | None) -> None:
    """Give `module`'s own meta parameters their values (frozen: the base is not trained). Those
    that stay (all but the `transient` one, about to be quantized) are copied out of a mapped file:
    a parameter aliasing the file would change, or fault, if the file were rewritten in place."""
    for leaf, param in list(module._parameters.items()):
        if param is not None and param.is_meta and prefix + leaf not in aliases:
            value = stream.read(prefix + leaf).to(param.dtype)
            if stream.maps_file and leaf != transient:
                value = value.clone()
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _draw_adapters(layer: LoRALinear) -> None:
    """Replace the meta adapters of a now-filled layer by real ones, drawn as LoRAAdapter does
    (DoRA's magnitude from the fp32 rows, exactly as apply_lora on the loaded model)."""
    for piece, adapter in list(layer.adapted()):
        rows = layer.weight[piece.start:piece.stop] if adapter.use_dora else None
        layer.lora[piece.name] = LoRAAdapter(layer.in_features, piece.size, adapter.r, adapter.alpha,
                                             adapter.use_rslora, rows, adapter.A.dtype, layer.weight.device)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are an earlier parameter again (a tied head) -> that parameter's name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init) while
    their buffers stay real: non-persistent buffers (RoPE tables) are computed at construction and
    are in no checkpoint. (The same trick as accelerate's init_empty_weights(include_buffers=False).)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:   # an already-meta one (a tied head) keeps its identity
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ----------------------------------------------------------------------------- sources


def open_stream(source: Any) -> TensorStream | None:
    """A `TensorStream` of a located reference (`loading.locate`), or None for the kinds read whole."""
    if source.kind == "gguf":
        return _gguf_stream(Path(source.path))
    if source.kind == "hf":
        return _hf_stream(Path(source.path))
    return None


def _gguf_stream(path: Path) -> TensorStream:
    from ..model.gguf import (GGUF_TO_HF, config_from_hf, header_from_reader, hf_config_from_gguf,
                              hf_state_from_gguf, open_gguf)
    from ..model.hf import LLAMA

    reader = open_gguf(path)                      # memory-mapped: a tensor is read when dequantized
    where = f"'{path}'"
    config = config_from_hf(hf_config_from_gguf(header_from_reader(reader, where), where), where)
    names = {}
    for gguf_name, hf_name in GGUF_TO_HF.items():
        for i in range(config.n_layers if "{i}" in gguf_name else 1):
            names[gguf_name.format(i=i)] = hf_name.format(i=i)
    tensors = {names[tensor.name]: tensor for tensor in reader.tensors if tensor.name in names}
    shapes = {name: (tuple(int(n) for n in reversed(tensor.shape)), torch.float32) for name, tensor in tensors.items()}

    def read_hf(hf_name: str) -> torch.Tensor:
        # hf_state_from_gguf on a one-tensor view of the file: lmforge.load's dequantization and
        # q/k row order (RoPE layout) for exactly this tensor.
        return hf_state_from_gguf(types.SimpleNamespace(tensors=[tensors[hf_name]]), config, path)[hf_name]

    def tokenizer() -> Any:
        from ..tokenizer import BPETokenizer

        return BPETokenizer.from_gguf(reader)

    return _ruled_stream(config, LLAMA, shapes, read_hf, dict.fromkeys(tensors, path), tokenizer, where)


def _hf_stream(directory: Path) -> TensorStream | None:
    from safetensors import safe_open

    from ..io import read_json
    from ..model.hf.families import SUPPORTED_ARCHITECTURES, config_from_hf, hf_architecture
    from ..model.hf.weights import _shard_files
    from ..model.loading import _as_tokenizer, _has_tokenizer_files

    hf = read_json(directory / "config.json", "Hugging Face config")
    where = f"'{directory / 'config.json'}'"
    family = SUPPORTED_ARCHITECTURES[hf_architecture(hf, where)]
    config = config_from_hf(hf, where)
    if config.arch != "gpt":
        return None
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif (directory / "model.safetensors.index.json").is_file():
        files = _shard_files(directory / "model.safetensors.index.json", directory)
    else:
        return None                                # pytorch_model.bin: torch.load reads it whole anyway
    shapes, origin = {}, {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                floating = piece.get_dtype().startswith(("F", "BF"))
                shapes[name] = (tuple(piece.get_shape()), torch.float32 if floating else torch.int64)
                origin[name] = file

    def read_hf(name: str) -> torch.Tensor:
        with safe_open(str(origin[name]), "pt") as handle:
            return handle.get_tensor(name).float()                 # a view of the mapped file (fp32)

    def tokenizer() -> Any:
        return _as_tokenizer(directory) if _has_tokenizer_files(directory) else None

    stream = _ruled_stream(config, family, shapes, read_hf, origin, tokenizer, where)
    stream.maps_file = True
    return stream


def _ruled_stream(config: Any, family: Any, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  read_hf: Callable[[str], torch.Tensor], origin: dict[str, Path],
                  tokenizer: Callable[[], Any], where: str) -> TensorStream:
    """Our tensors from HF-named ones through the family's rule table (fused layers concatenated,
    GPT-2's Conv1D transposed), checked by `import_state_dict` on meta tensors first: the same names,
    shapes and errors as `lmforge.load`, before a byte of weights is read."""
    from ..model.hf.importing import check_layer_count, expected_shapes, hf_names, import_state_dict

    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}
    renamed = hf_names(dict(zip(meta, meta)), family)          # the rules' names -> the file's names
    check_layer_count(renamed, config, family, where)
    ours, _ = import_state_dict(meta, config, family, expected_shapes(config), origin)
    rules = {rule.ours: rule for rule in family.rules(config)}

    def read(name: str) -> torch.Tensor:
        rule = rules[name]
        parts = [read_hf(renamed[theirs]) for theirs in rule.theirs]
        parts = [part.t() for part in parts] if rule.conv1d else parts
        return (torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]).contiguous()

    return TensorStream(config, {name: tensor.shape for name, tensor in ours.items()}, read, tokenizer)
