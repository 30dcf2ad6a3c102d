"""Fuzzing the commands of the tokenizer, data, model, convert, inspect and runs stages, and every
file they (and pretrain) parse: config YAML, meta.json, shards, tokenizer files, HF config.json /
safetensors / .bin, GGUF files and metrics logs.

Each case damages a copy of a valid tiny artifact (see fuzz_support) or passes odd arguments, runs
`lmforge.cli.main` in-process and requires exit code 0 or 2 -- 2 with one `lmforge CMD: error:`
line -- never a traceback (any exception other than argparse's SystemExit fails the test).
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from lmforge import cli

from fuzz_support import build_artifacts, copy, edit_json, write_gguf, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")

Setup = Callable[[Path, Path, dict], list[str]]   # (base, work, artifacts) -> argv
CASES: dict[str, Setup] = {}


def case(name: str, setup: Setup) -> None:
    assert name not in CASES, name
    CASES[name] = setup


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz-base")
    return root, build_artifacts(root)


# ----------------------------------------------------------------------------- config YAML (pretrain --config)

def _config_file(data: bytes, *overrides: str) -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        (work / "recipe.yaml").write_bytes(data)
        return ["pretrain", "--config", str(work / "recipe.yaml"), "--print-config", *overrides]
    return setup


_YAML = "max_steps: 3\nlr: 0.001\n"
case("config-utf16-bom", _config_file(_YAML.encode("utf-16")))
case("config-utf16-no-bom", _config_file(_YAML.encode("utf-16-le")))
case("config-latin1", _config_file("name: caf\xe9\n".encode("latin-1")))
case("config-utf8-bom", _config_file(_YAML.encode("utf-8-sig")))
case("config-binary", _config_file(bytes(range(256))))
case("config-deep-nesting", _config_file(b"[" * 5000 + b"]" * 5000))
case("config-a-list", _config_file(b"- 1\n- 2\n"))
case("config-unhashable-key", _config_file(b"? [1, 2]\n: 3\n"))
case("config-int-inf", _config_file(b"max_steps: .inf\n"))
case("config-int-huge-float", _config_file(b"max_steps: 1.0e+999\n"))
case("config-section-is-a-value", _config_file(b"model: 5\n"))
case("config-override-value-and-section", _config_file(b"{}\n", "max_steps=1", "max_steps.x=2"))
case("config-override-inf", _config_file(b"{}\n", "max_steps=.inf"))
case("config-override-empty-key", _config_file(b"{}\n", "=3"))
case("config-override-no-equals", _config_file(b"{}\n", "max_steps"))
case("config-override-list-for-float", _config_file(b"{}\n", "lr=[1, 2]"))


# ----------------------------------------------------------------------------- tokenizer files

def _tokenizer_dir(change: Callable[[Path], None], command: str = "encode") -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        directory = copy(base, "tok", work)
        change(directory)
        if command == "encode":
            return ["tokenizer", "encode", "To be, or not", "--tokenizer", str(directory)]
        if command == "stats":
            return ["tokenizer", "stats", "--tokenizer", str(directory), "--input", str(base / "corpus")]
        return ["data", "prepare", "--corpus", str(base / "corpus"), "--tokenizer", str(directory),
                "--out", str(work / "shards"), "--quiet", "--workers", "1"]
    return setup


def _tokenizer_json(change: Callable) -> Callable[[Path], None]:
    return lambda directory: edit_json(directory / "tokenizer.json", change)


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        target = directory / name
        target.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return change


def _set(path: str, value) -> Callable:
    """Set a dotted path ("model.vocab") inside a JSON document."""
    def change(data):
        node, *keys, last = [data, *path.split(".")]
        for key in keys:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


for name, data in {
    "empty": b"", "null": b"null", "list": b"[]", "object": b"{}", "truncated": None, "binary": bytes(range(256)) * 4,
    "utf16": None, "deep": b"[" * 100_000, "5000-digit-int": b'{"version": 1' + b"0" * 5000 + b"}",
}.items():
    def _damage(directory: Path, name=name, data=data) -> None:
        text = (directory / "tokenizer.json").read_bytes()
        if name == "truncated":
            data = text[: len(text) // 2]
        elif name == "utf16":
            data = text.decode("utf-8").encode("utf-16")
        (directory / "tokenizer.json").write_bytes(data)
    case(f"tokenizer.json-{name}", _tokenizer_dir(_damage))

for name, change in {
    "model-a-list": _set("model", []),
    "vocab-a-list": _set("model.vocab", ["a", "b"]),
    "vocab-a-string": _set("model.vocab", "abc"),
    "vocab-string-id": lambda d: d["model"]["vocab"].update({"Ġzz": "x"}),
    "vocab-negative-id": lambda d: d["model"]["vocab"].update({"Ġzz": -5}),
    "vocab-huge-id": lambda d: d["model"]["vocab"].update({"Ġzz": 1 << 40}),
    "vocab-float-id": lambda d: d["model"]["vocab"].update({"Ġzz": 3.5}),
    "vocab-not-byte-level": lambda d: d["model"]["vocab"].update({"\u4e00\u4e01": 299}),
    "merges-a-number": _set("model.merges", 5),
    "merges-three-parts": lambda d: d["model"]["merges"].append(["a", "b", "c"]),
    "merges-unknown-token": lambda d: d["model"]["merges"].append(["Ġqqq", "zzz"]),
    "merges-ints": lambda d: d["model"]["merges"].append([1, 2]),
    "merges-duplicate": lambda d: d["model"]["merges"].append(d["model"]["merges"][0]),
    "added-tokens-an-object": _set("added_tokens", {"a": 1}),
    "added-token-no-content": lambda d: d["added_tokens"].append({"id": 400}),
    "added-token-list-content": lambda d: d["added_tokens"].append({"id": 400, "content": ["x"]}),
    "added-token-negative-id": lambda d: d["added_tokens"].append({"id": -1, "content": "<x>"}),
    "added-token-id-taken": lambda d: d["added_tokens"].append({"id": 100, "content": "<x>"}),
    "pre-tokenizer-a-string": _set("pre_tokenizer", "ByteLevel"),
    "pre-tokenizer-regex-number": _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": 5}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
    "pre-tokenizer-bad-regex": _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
    "pre-tokenizer-sequence-not-list": _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": 5}),
    "pre-tokenizer-steps-not-objects": _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [1, 2]}),
    "decoder-missing": _set("decoder", None),
    "model-wordpiece-garbage": _set("model", {"type": "WordPiece", "vocab": 5}),
    "normalizer-garbage": _set("normalizer", {"type": "NoSuchNormalizer"}),
}.items():
    case(f"tokenizer.json-{name}", _tokenizer_dir(_tokenizer_json(change)))

for name, data in {
    "list": "[]", "bos-a-number": '{"bos_token": 5}', "template-a-number": '{"chat_template": 5}',
    "template-list": '{"chat_template": [{"name": "default", "template": 5}, 7]}',
    "eos-content-list": '{"eos_token": {"content": [1]}}', "latin1": b'{"bos_token": "\xe9"}', "truncated": '{"bos',
}.items():
    case(f"tokenizer_config.json-{name}", _tokenizer_dir(_write("tokenizer_config.json", data)))
case("tokenizer-dir-for-stats-truncated", _tokenizer_dir(_write("tokenizer.json", b'{"model": {'), "stats"))
case("tokenizer-dir-for-prepare-bad-vocab", _tokenizer_dir(_tokenizer_json(_set("model.vocab", [])), "prepare"))


def _gpt2_files(change: Callable[[Path], None]) -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        directory = copy(base, "gpt2-files", work)
        change(directory)
        return ["tokenizer", "encode", "To be", "--tokenizer", str(directory)]
    return setup


case("gpt2-vocab-string-ids", _gpt2_files(lambda d: edit_json(d / "vocab.json", lambda v: {k: str(i) for k, i in v.items()})))
case("gpt2-vocab-a-list", _gpt2_files(_write("vocab.json", "[1, 2]")))
case("gpt2-vocab-empty", _gpt2_files(_write("vocab.json", "{}")))
case("gpt2-merges-latin1", _gpt2_files(_write("merges.txt", b"#version: 0.2\n\xe9 \xe8\n")))
case("gpt2-merges-three-parts", _gpt2_files(_write("merges.txt", "#version: 0.2\na b c\n")))
case("gpt2-merges-unknown-tokens", _gpt2_files(_write("merges.txt", "#version: 0.2\nqq zz\n")))


# ----------------------------------------------------------------------------- GGUF files

def _gguf_bytes(change: Callable[[bytes], bytes], command: str) -> Setup:
    """A damaged copy of the tiny GGUF, read by `command` ("info", "convert" or "tokenizer")."""
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        path = work / "model.gguf"
        path.write_bytes(change((base / "model.gguf").read_bytes()))
        return _gguf_argv(path, command, work)
    return setup


def _gguf_argv(path: Path, command: str, work: Path) -> list[str]:
    if command == "info":
        return ["model", "info", str(path)]
    if command == "convert":
        return ["convert", str(path), "--to", str(work / "out")]
    return ["tokenizer", "encode", "To be", "--tokenizer", str(path)]


def _gguf_written(metadata: dict | None = None, drop: tuple[str, ...] = (), tensors: dict | None = None,
                  command: str = "info") -> Setup:
    def setup(base: Path, work: Path, artifacts: dict) -> list[str]:
        from gguf import GGUFValueType as V

        resolved = {key: tuple(V[item] if isinstance(item, str) and item in V.__members__ else item
                               for item in value) for key, value in (metadata or {}).items()}
        path = work / "model.gguf"
        write_gguf(path, artifacts["llama"], artifacts["tokenizer"], resolved, drop, tensors)
        return _gguf_argv(path, command, work)
    return setup


for command in ("info", "convert", "tokenizer"):
    for size in (0, 3, 8, 23, 24, 40, 200, 2000):
        case(f"gguf-{command}-truncated-{size}", _gguf_bytes(lambda data, size=size: data[:size], command))
    case(f"gguf-{command}-truncated-half", _gguf_bytes(lambda data: data[: len(data) // 2], command))
    case(f"gguf-{command}-wrong-magic", _gguf_bytes(lambda data: b"GGUX" + data[4:], command))
    case(f"gguf-{command}-version-99", _gguf_bytes(lambda data: data[:4] + struct.pack("<I", 99) + data[8:], command))
    case(f"gguf-{command}-huge-kv-count", _gguf_bytes(lambda data: data[:16] + struct.pack("<Q", 1 << 62) + data[24:],
                                                        command))
    case(f"gguf-{command}-huge-tensor-count", _gguf_bytes(lambda data: data[:8] + struct.pack("<Q", 1 << 62) + data[16:],
                                                            command))
    case(f"gguf-{command}-huge-key-length", _gguf_bytes(lambda data: data[:24] + struct.pack("<Q", 1 << 60) + data[32:],
                                                          command))
    case(f"gguf-{command}-unknown-value-type", _gguf_bytes(
        lambda data: data[:data.index(b"general.architecture") + 20] + struct.pack("<I", 77)
        + data[data.index(b"general.architecture") + 24:], command))
    case(f"gguf-{command}-random-bytes", _gguf_bytes(lambda data: b"GGUF" + bytes(range(256)) * 8, command))

for name, metadata in {
    "block-count-string": {"llama.block_count": ("x", "STRING")},
    "block-count-huge": {"llama.block_count": (10**9, "UINT32")},
    "block-count-zero": {"llama.block_count": (0, "UINT32")},
    "embedding-zero": {"llama.embedding_length": (0, "UINT32")},
    "embedding-float": {"llama.embedding_length": (32.5, "FLOAT32")},
    "heads-zero": {"llama.attention.head_count": (0, "UINT32")},
    "heads-more-than-width": {"llama.attention.head_count": (64, "UINT32")},
    "kv-heads-not-a-divisor": {"llama.attention.head_count_kv": (3, "UINT32")},
    "key-length-odd": {"llama.attention.key_length": (3, "UINT32")},
    "eps-string": {"llama.attention.layer_norm_rms_epsilon": ("small", "STRING")},
    "eps-negative": {"llama.attention.layer_norm_rms_epsilon": (-1.0, "FLOAT32")},
    "rope-base-nan": {"llama.rope.freq_base": (float("nan"), "FLOAT32")},
    "context-huge": {"llama.context_length": (1 << 40, "UINT64")},
    "context-bool": {"llama.context_length": (True, "BOOL")},
    "vocab-mismatch": {"llama.vocab_size": (999, "UINT32")},
    "architecture-number": {"general.architecture": (5, "UINT32")},
    "rope-scaling": {"llama.rope.scaling.type": ("yarn", "STRING")},
    "feed-forward-array": {"llama.feed_forward_length": ([1, 2], "ARRAY", "UINT32")},
    "padding-id-string": {"tokenizer.ggml.padding_token_id": ("x", "STRING")},
}.items():
    for command in ("info", "convert"):
        case(f"gguf-meta-{command}-{name}", _gguf_written(metadata, command=command))
case("gguf-meta-info-no-block-count", _gguf_written(drop=("llama.block_count",)))
case("gguf-meta-convert-no-embedding", _gguf_written(tensors={"token_embd.weight": None}, command="convert"))
case("gguf-meta-convert-1d-embedding", _gguf_written(tensors={"token_embd.weight": np.zeros(32, np.float32)},
                                                     command="convert"))
case("gguf-meta-convert-q-wrong-shape", _gguf_written(tensors={"blk.0.attn_q.weight": np.zeros((5, 32), np.float32)},
                                                      command="convert"))
case("gguf-meta-convert-missing-layer", _gguf_written(tensors={"blk.1.ffn_up.weight": None}, command="convert"))
for name, metadata in {
    "tokens-ints": {"tokenizer.ggml.tokens": ([1, 2, 3], "ARRAY", "INT32")},
    "tokens-a-string": {"tokenizer.ggml.tokens": ("abc", "STRING")},
    "merges-ints": {"tokenizer.ggml.merges": ([1, 2], "ARRAY", "INT32")},
    "merges-three-parts": {"tokenizer.ggml.merges": (["a b c"], "ARRAY", "STRING")},
    "merges-unknown": {"tokenizer.ggml.merges": (["qq zz"], "ARRAY", "STRING")},
    "types-strings": {"tokenizer.ggml.token_type": (["x"] * 300, "ARRAY", "STRING")},
    "pre-an-array": {"tokenizer.ggml.pre": (["gpt2"], "ARRAY", "STRING")},
    "pre-unknown": {"tokenizer.ggml.pre": ("no-such-pre", "STRING")},
    "model-number": {"tokenizer.ggml.model": (7, "UINT32")},
    "eos-out-of-range": {"tokenizer.ggml.eos_token_id": (10**6, "UINT32")},
    "template-number": {"tokenizer.chat_template": (5, "UINT32")},
}.items():
    case(f"gguf-tokenizer-{name}", _gguf_written(metadata, command="tokenizer"))
    case(f"gguf-convert-tokenizer-{name}", _gguf_written(metadata, command="convert"))


# ----------------------------------------------------------------------------- HF directories

def _hf_dir(family: str, change: Callable[[Path], None], command: str) -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        directory = copy(base, f"hf-{family}", work)
        change(directory)
        if command == "info":
            return ["model", "info", str(directory)]
        return ["convert", str(directory), "--to", str(work / "out")]
    return setup


def _config(change: Callable) -> Callable[[Path], None]:
    return lambda directory: edit_json(directory / "config.json", change)


_HF_CONFIG_DAMAGE = {
    "gpt2": {"n_layer": ["x", 2.5, -1, 1e999, 10**9, True, None], "n_embd": [0, "32"], "n_head": [0, 3],
             "vocab_size": [10**30, 0], "activation_function": [5, "relu"], "tie_word_embeddings": ["yes"],
             "n_positions": [10**12], "layer_norm_epsilon": ["x", -1], "pad_token_id": [[1], "x", 10**9]},
    "bert": {"num_hidden_layers": ["2"], "hidden_act": [["gelu"]], "type_vocab_size": [0, "x"],
             "position_embedding_type": ["relative_key"], "max_position_embeddings": [0, 10**12]},
    "llama": {"num_hidden_layers": [0, 4.0], "rope_parameters": ["x", {"rope_type": 5}, {"rope_theta": "x"}],
              "layer_types": [[[1]], "x"], "num_key_value_heads": [3, 0], "head_dim": [3, 10**6],
              "hidden_act": ["gelu"], "rms_norm_eps": [0, "x"], "max_position_embeddings": [10**12],
              "intermediate_size": [10**9]},
}
for family, fields in _HF_CONFIG_DAMAGE.items():
    for field, values in fields.items():
        for value in values:
            for command in ("info", "convert"):
                case(f"hf-{family}-{command}-{field}={value!r}"[:90], _hf_dir(family, _config(_set(field, value)), command))
# (A config.json that is a JSON list is refused in model/loading.py, which another change covers.)
for name, data in {"architectures-a-string": '{"architectures": "GPT2LMHeadModel"}',
                   "architectures-numbers": '{"architectures": [5]}', "architectures-nested": '{"architectures": [[1]]}',
                   "model-type-list": '{"model_type": ["gpt2"]}', "truncated": '{"archi', "latin1": b'{"\xe9": 1}',
                   "deep": b'{"a": ' + b"[" * 100_000, "5000-digit-int": b'{"n_layer": 1' + b"0" * 5000 + b"}"}.items():
    case(f"hf-config-{name}", _hf_dir("gpt2", _write("config.json", data), "info"))


def _weights(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Replace model.safetensors by whatever change writes (e.g. a pytorch_model.bin)."""
    def damage(directory: Path) -> None:
        (directory / "model.safetensors").unlink()
        change(directory)
    return damage


def _pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _bad_memo_bin(directory: Path) -> None:
    """A torch zip file whose data.pkl asks for a memo entry that was never stored."""
    path = directory / "pytorch_model.bin"
    torch.save({"x": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in members if name.endswith("data.pkl"))
    members[name] = b"\x80\x02h\x63."   # BINGET 99: an index the memo does not have
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def _state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _bin_from_state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        state = _state(directory)
        (directory / "model.safetensors").unlink()
        (directory / "pytorch_model.bin").write_bytes(_pickled(change(state)))
    return damage


def _safetensors_from_state(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(change(_state(directory)), str(directory / "model.safetensors"))
    return damage


_WEIGHT_DAMAGE: dict[str, Callable[[Path], None]] = {
    "bin-random-bytes": _weights(_write("pytorch_model.bin", bytes(range(256)) * 16)),
    "bin-empty": _weights(_write("pytorch_model.bin", b"")),
    "bin-bad-memo": _weights(_bad_memo_bin),
    "bin-plain-pickle-memo": _weights(_write("pytorch_model.bin", b"\x80\x02h\x63.")),
    "bin-dict-of-ints": _bin_from_state(lambda state: {name: 1 for name in state}),
    "bin-dict-int-keys": _bin_from_state(lambda state: {index: tensor for index, tensor in enumerate(state.values())}),
    "bin-a-list": _bin_from_state(lambda state: list(state.values())),
    "bin-truncated": lambda d: (_bin_from_state(lambda s: s)(d),
                                (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:300])),
    "safetensors-garbage": _write("model.safetensors", bytes(range(256)) * 4),
    "safetensors-huge-header": _write("model.safetensors", struct.pack("<Q", 1 << 62) + b"{}"),
    "safetensors-header-not-object": _write("model.safetensors", struct.pack("<Q", 2) + b"[]"),
    "safetensors-bad-dtype": _write("model.safetensors", struct.pack("<Q", 60)
                                    + b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}' + b"\0" * 4),
    "safetensors-shape-overflow": _write("model.safetensors", struct.pack("<Q", 78)
                                         + b'{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}'
                                         + b"\0" * 4),
    "safetensors-truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
    "tensor-int-dtype": _safetensors_from_state(lambda s: {n: t.to(torch.int32) for n, t in s.items()}),
    "tensor-missing": _safetensors_from_state(lambda s: dict(list(s.items())[1:])),
    "tensor-extra": _safetensors_from_state(lambda s: {**s, "extra.weight": torch.zeros(2)}),
    "tensor-wrong-shape": _safetensors_from_state(lambda s: {n: t.reshape(-1) for n, t in s.items()}),
    "no-weights": lambda d: (d / "model.safetensors").unlink(),
    "index-a-list": _weights(_write("model.safetensors.index.json", "[]")),
    "index-map-a-list": _weights(_write("model.safetensors.index.json", '{"weight_map": [1]}')),
    "index-map-numbers": _weights(_write("model.safetensors.index.json", '{"weight_map": {"a": 5}}')),
    "index-map-escapes": _weights(_write("model.safetensors.index.json", '{"weight_map": {"a": "../../x.safetensors"}}')),
    "index-missing-shard": _weights(_write("model.safetensors.index.json", '{"weight_map": {"a": "shard-1.safetensors"}}')),
}
for family in ("gpt2", "bert", "llama"):
    for name, change in _WEIGHT_DAMAGE.items():
        case(f"hf-weights-{family}-{name}", _hf_dir(family, change, "convert"))


# ----------------------------------------------------------------------------- lmforge model + inspect

def _inspect(action: str, *extra: str, text: str = "To be, or not to be") -> Setup:
    """{work} and {file} in `extra` become the case's folder and a regular file."""
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        options = [item.format(work=work, file=base / "corpus" / "doc0.txt") for item in extra]
        argv = ["inspect", action, "--model", str(base / "lm"), "--text", text, *options]
        return argv + (["--out", str(work / "attn.png")] if action == "attention" and "--out" not in extra else [])
    return setup


def _markup_path(base: Path, name: str, work: Path) -> str:
    """A copy of an artifact at a path holding "[/x]", which rich would read as a closing tag."""
    (work / "[").mkdir()
    copy(base, name, work).rename(work / "[" / "x]")
    return f"{work}/[/x]"


for name, extra in {"top-k-zero": ("--top-k", "0"), "top-k-huge": ("--top-k", str(10**9)),
                    "mask-prob-zero": ("--mask-prob", "0"), "mask-prob-one": ("--mask-prob", "1"),
                    "mask-prob-nan": ("--mask-prob", "nan"), "mask-prob-negative": ("--mask-prob", "-1"),
                    "seed-negative": ("--seed", "-1"), "seed-huge": ("--seed", str(10**30)),
                    "top-k-text": ("--top-k", "x"), "json": ("--json",)}.items():
    case(f"inspect-io-{name}", _inspect("io", *extra))
for name, text in {"empty": "", "surrogate": "caf\udcc3", "dollars": "costs $5 $$ and $x^2$", "markup": "[bold]x[/b]",
                   "too-long": "word " * 2000, "control": "\x00\x01\x1b[31m"}.items():
    case(f"inspect-io-text-{name}", _inspect("io", text=text))
    case(f"inspect-attention-text-{name}", _inspect("attention", text=text))
for name, extra in {"layer-99": ("--layer", "99"), "layer-minus-99": ("--layer", "-99"),
                    "out-under-a-file": ("--out", "{file}/x/attn.png"), "out-jpg": ("--out", "{work}/a.jpg")}.items():
    case(f"inspect-attention-{name}", _inspect("attention", *extra))
case("inspect-preset-without-tokenizer", lambda base, work, _: ["inspect", "io", "--model", "nano", "--text", "hi"])
case("inspect-preset-bad-tokenizer", lambda base, work, _: ["inspect", "io", "--model", "nano", "--text", "hi",
                                                            "--tokenizer", str(work)])
case("inspect-model-a-file", lambda base, work, _: ["inspect", "io", "--model", str(base / "corpus" / "doc0.txt"),
                                                    "--text", "hi"])

for name, extra in {"context-zero": ("--context", "0"), "context-huge": ("--context", str(10**15)),
                    "batch-negative": ("--batch-size", "-3"), "context-text": ("--context", "x")}.items():
    case(f"model-info-{name}", lambda base, work, _, extra=extra: ["model", "info", "gpt2-124m", *extra])
case("model-info-markup-path", lambda base, work, _: ["model", "info", _markup_path(base, "lm", work)])
case("model-info-unknown", lambda base, work, _: ["model", "info", "no-such-model"])
case("model-info-empty-dir", lambda base, work, _: ["model", "info", str(work)])
case("convert-bad-dtype", lambda base, work, _: ["convert", str(base / "lm"), "--to", str(work / "o"), "--dtype", "int8"])
case("convert-to-a-file", lambda base, work, _: ["convert", str(base / "lm"), "--to", str(base / "corpus" / "doc0.txt")])
case("convert-bad-tokenizer", lambda base, work, _: ["convert", str(base / "lm"), "--to", str(work / "o"),
                                                     "--tokenizer", str(base / "corpus")])
case("convert-lmforge-to-hf", lambda base, work, _: ["convert", str(base / "lm"), "--to", str(work / "o"), "--format", "hf"])


# ----------------------------------------------------------------------------- tokenizer command arguments

def _train(*extra: str, inputs: Callable[[Path, Path], list[str]] | None = None) -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        files = inputs(base, work) if inputs else [str(base / "corpus" / "doc0.txt")]
        return ["tokenizer", "train", "--input", *files, "--vocab-size", "300", "--out", str(work / "tok"), *extra]
    return setup


def _file(name: str, data: bytes) -> Callable[[Path, Path], list[str]]:
    def make(base: Path, work: Path) -> list[str]:
        (work / name).write_bytes(data)
        return [str(work / name)]
    return make


for name, extra in {"vocab-zero": ("--vocab-size", "0"), "vocab-huge": ("--vocab-size", str(10**12)),
                    "pattern-bad": ("--pattern", "(unclosed"), "pattern-empty": ("--pattern", ""),
                    "special-empty": ("--special-tokens", ""), "workers-zero": ("--workers", "0"),
                    "special-none": ("--special-tokens",), "out-a-file": ("--out", "/dev/null/x")}.items():
    case(f"tokenizer-train-{name}", _train(*extra))
for name, data in {"latin1": "caf\xe9 au lait".encode("latin-1"), "utf16": "hello world".encode("utf-16"),
                   "empty": b"", "nul-bytes": b"\x00" * 100}.items():
    case(f"tokenizer-train-input-{name}", _train(inputs=_file("input.txt", data)))
    case(f"tokenizer-stats-input-{name}", lambda base, work, _, data=data: [
        "tokenizer", "stats", "--tokenizer", str(base / "tok"), "--input", *_file("input.txt", data)(base, work)])
case("tokenizer-train-input-missing", _train(inputs=lambda base, work: [str(work / "missing.txt")]))
case("tokenizer-train-input-empty-dir", _train(inputs=lambda base, work: [str(work)]))
case("tokenizer-encode-surrogate", lambda base, work, _: ["tokenizer", "encode", "caf\udcc3", "--tokenizer", str(base / "tok")])
case("tokenizer-encode-bert-surrogate", lambda base, work, _: ["tokenizer", "encode", "caf\udcc3", "--tokenizer", "minilm"])
case("tokenizer-encode-missing", lambda base, work, _: ["tokenizer", "encode", "x", "--tokenizer", str(work / "none")])
case("tokenizer-encode-a-text-file", lambda base, work, _: ["tokenizer", "encode", "x", "--tokenizer",
                                                            str(base / "corpus" / "doc0.txt")])
case("tokenizer-stats-compare-missing", lambda base, work, _: [
    "tokenizer", "stats", "--tokenizer", str(base / "tok"), "--input", str(base / "corpus"), "--compare", "nope"])
case("tokenizer-stats-markup-name", lambda base, work, _: [
    "tokenizer", "stats", "--tokenizer", _markup_path(base, "tok", work), "--input", str(base / "corpus")])


# ----------------------------------------------------------------------------- data prepare / stats / loaders

def _prepare(corpus: Callable[[Path, Path], str], *extra: str) -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        return ["data", "prepare", "--corpus", corpus(base, work), "--tokenizer", str(base / "tok"),
                "--out", str(work / "shards"), "--quiet", "--workers", "1", *extra]
    return setup


def _corpus_file(name: str, data: bytes) -> Callable[[Path, Path], str]:
    def make(base: Path, work: Path) -> str:
        (work / "c").mkdir(exist_ok=True)
        (work / "c" / name).write_bytes(data)
        (work / "c" / "ok.txt").write_text("a perfectly fine second document", encoding="utf-8")
        return str(work / "c")
    return make


def _saved_dataset(damage: Callable[[Path], None]) -> Callable[[Path, Path], str]:
    def make(base: Path, work: Path) -> str:
        import datasets

        directory = work / "dataset"
        datasets.Dataset.from_dict({"text": ["one document", "another one", "a third"]}).save_to_disk(str(directory))
        damage(directory)
        return str(directory)
    return make


def _saved_dataset_dict(damage: Callable[[Path], None]) -> Callable[[Path, Path], str]:
    def make(base: Path, work: Path) -> str:
        import datasets

        directory = work / "dataset"
        split = datasets.Dataset.from_dict({"text": ["one document", "another one"]})
        datasets.DatasetDict({"train": split}).save_to_disk(str(directory))
        damage(directory)
        return str(directory)
    return make


for name, data in {"latin1.txt": "caf\xe9".encode("latin-1"), "utf16.txt": "hello".encode("utf-16"),
                   "bad.jsonl": b'{"text": "a"}\n{oops\n', "list.jsonl": b"[1, 2]\n", "number-text.jsonl": b'{"text": 5}\n',
                   "latin1.jsonl": b'{"text": "caf\xe9"}\n', "garbage.parquet": bytes(range(256)),
                   "empty.parquet": b"", "deep.jsonl": b"[" * 100000 + b"\n"}.items():
    case(f"data-prepare-{name}", _prepare(_corpus_file(name, data)))


def _parquet(kind: str) -> Callable[[Path, Path], str]:
    def make(base: Path, work: Path) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = work / "data.parquet"
        if kind == "ints":
            pq.write_table(pa.table({"text": [1, 2, 3]}), path)
        elif kind == "no-column":
            pq.write_table(pa.table({"body": ["a", "b"]}), path)
        else:   # a valid footer with damaged pages
            pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(200)]}), path)
            data = bytearray(path.read_bytes())
            data[100:2000] = bytes(1900)
            path.write_bytes(bytes(data))
        return str(path)
    return make


for kind in ("ints", "no-column", "damaged-pages"):
    case(f"data-prepare-parquet-{kind}", _prepare(_parquet(kind)))
for name, damage in {
    "info-truncated": lambda d: (d / "dataset_info.json").write_text('{"features": '),
    "info-a-list": lambda d: (d / "dataset_info.json").write_text("[]"),
    "info-bad-features": lambda d: (d / "dataset_info.json").write_text('{"features": {"text": {"_type": "Nope"}}}'),
    "state-missing": lambda d: (d / "state.json").unlink(),
    "state-garbage": lambda d: (d / "state.json").write_text("not json"),
    "arrow-garbage": lambda d: next(d.glob("*.arrow")).write_bytes(bytes(range(256)) * 4),
    "arrow-missing": lambda d: next(d.glob("*.arrow")).unlink(),
}.items():
    case(f"data-prepare-dataset-{name}", _prepare(_saved_dataset(damage)))
case("data-prepare-dataset-dict-truncated", _prepare(_saved_dataset_dict(
    lambda d: (d / "dataset_dict.json").write_text('{"splits": '))))
case("data-prepare-dataset-dict-missing-split", _prepare(_saved_dataset_dict(
    lambda d: (d / "dataset_dict.json").write_text('{"splits": ["train", "nope"]}'))))
case("data-prepare-dataset-wrong-split", _prepare(_saved_dataset_dict(lambda d: None), "--dataset-split", "nope"))
for name, extra in {"val-zero": ("--val-fraction", "0"), "val-one": ("--val-fraction", "1"),
                    "val-nan": ("--val-fraction", "nan"), "val-inf": ("--val-fraction", "inf"),
                    "separator-broken-escape": ("--separator", "\\x"), "separator-empty": ("--separator", ""),
                    "separator-unicode-escape": ("--separator", "\\u2028"), "workers-zero": ("--workers", "0"),
                    "text-field-missing": ("--text-field", "nope")}.items():
    case(f"data-prepare-arg-{name}", _prepare(lambda base, work: str(base / "corpus"), *extra))
case("data-prepare-out-a-file", lambda base, work, _: ["data", "prepare", "--corpus", str(base / "corpus"), "--tokenizer",
                                                       str(base / "tok"), "--out", str(base / "corpus" / "doc0.txt"),
                                                       "--quiet"])
case("data-prepare-corpus-missing", _prepare(lambda base, work: str(work / "nope.txt")))
case("data-prepare-corpus-hub-name", _prepare(lambda base, work: "no-such-owner/no-such-dataset"))


def _meta(change: Callable, command: str = "stats") -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        directory = copy(base, "shards", work)
        if isinstance(change, bytes):
            (directory / "meta.json").write_bytes(change)
        else:
            edit_json(directory / "meta.json", change)
        return ["data", "stats", "--data", str(directory)]
    return setup


_META_DAMAGE = {
    "vocab_size": ["x", -1, 0, 2.5, None, True, 1e999, 10**50], "dtype": ["float64", 5, "uint8", "uint32"],
    "eot_id": ["x", -1, 10**9], "tokenizer_fingerprint": [5, None], "tokenizer": [5, ""],
    "special_tokens": [[1], {"a": "x"}, "x"], "source": [[1], "x"], "val_fraction": ["x", None],
    "train": ["x", [1], {}, {"file": 5}, {"file": "../../etc/passwd", "tokens": 1}, {"file": "train.bin", "tokens": -1},
              {"file": "train.bin", "tokens": "many"}, {"file": "train.bin", "extra": 1}],
    "val_document_names": ["x", [1]], "created_at": [5], "lmforge_version": [None], "format_version": [99, "1", 0],
    "mask_id": ["x", 10**9, -2],
}
for field, values in _META_DAMAGE.items():
    for value in values:
        case(f"meta-{field}={value!r}"[:80], _meta(_set(field, value)))
for field in ("vocab_size", "train", "dtype"):
    case(f"meta-missing-{field}", _meta(lambda data, field=field: data.pop(field)))
_DEEP_JSON, _LONG_INT_JSON = b"[" * 100_000, b'{"vocab_size": 1' + b"0" * 5000 + b"}"   # RecursionError, ValueError
for name, data in {"a-list": b"[]", "truncated": b'{"vocab', "utf16": '{"a": 1}'.encode("utf-16"), "binary": bytes(range(256)),
                   "deep": _DEEP_JSON, "5000-digit-int": _LONG_INT_JSON}.items():
    case(f"meta-{name}", _meta(data))


# ----------------------------------------------------------------------------- runs list / plot

def _run(rows: list, config: bytes | None = None, name: str = "run", command: str = "list") -> Setup:
    def setup(base: Path, work: Path, _: dict) -> list[str]:
        run = work / "runs" / name
        run.mkdir(parents=True)
        write_rows(run / "metrics.jsonl", rows)
        if config is not None:
            (run / "config.yaml").write_bytes(config)
        if command == "list":
            return ["runs", "list", "--root", str(work / "runs")]
        return ["runs", "plot", str(run), "--out", str(work / "plot.png")]
    return setup


_GOOD = {"step": 1, "loss": 2.0, "tokens_seen": 64}
_ROWS = {
    "step-1e999": [_GOOD, '{"step": 1e999, "loss": 1.0}'], "step-minus-1e999": [_GOOD, '{"step": -1e999, "loss": 1.0}'],
    "loss-string": [_GOOD, {"step": 2, "loss": "y"}], "step-string": [{"step": "x", "loss": 1.0}],
    "step-list": [_GOOD, {"step": [1], "loss": 1.0}], "step-dict": [{"step": {"a": 1}, "loss": 1.0, "tokens_seen": 5}],
    "tokens-1e999": [_GOOD, '{"step": 2, "loss": 1.0, "tokens_seen": 1e999}'],
    "tokens-huge-int": [_GOOD, '{"step": 2, "loss": 1.0, "tokens_seen": ' + "9" * 400 + "}"],
    "loss-huge-int": [_GOOD, '{"step": 2, "loss": ' + "9" * 400 + "}"],
    "loss-nan": [_GOOD, '{"step": 2, "loss": NaN, "val_loss": Infinity}'], "loss-bool": [_GOOD, {"step": 2, "loss": True}],
    "step-null": [{"step": None, "loss": 1.0}], "row-a-list": ["[1, 2]", _GOOD], "garbage": ["\x00\xff garbage", _GOOD],
    "val-loss-string": [_GOOD, {"step": 2, "val_loss": "low", "val_bpb": [1]}], "empty": [],
    "tokens-string": [_GOOD, {"step": 2, "loss": 1.0, "tokens_seen": "many"}],
}
for name, rows in _ROWS.items():
    case(f"runs-list-{name}", _run(rows))
    case(f"runs-plot-{name}", _run(rows, command="plot"))
for name, config in {"utf16": "objective: clm\n".encode("utf-16"), "deep": b"[" * 5000, "arch-list": b"model: {arch: [1]}\n",
                     "model-number": b"model: 5\n", "objective-list": b"objective: [1]\n", "binary": bytes(range(256))}.items():
    case(f"runs-config-{name}", _run([_GOOD], config))
case("runs-markup-name", _run([_GOOD], b"model: {preset: '[bold]x[/b]'}\n", name="[/x]"))
case("runs-root-missing", lambda base, work, _: ["runs", "list", "--root", str(work / "nope")])
case("runs-plot-missing", lambda base, work, _: ["runs", "plot", "nope", "--root", str(work), "--out", str(work / "p.png")])
case("runs-plot-bad-suffix", lambda base, work, _: ["runs", "plot", str(base / "runs" / "run"), "--out", str(work / "p.xyz")])
case("runs-metrics-a-directory", lambda base, work, _: (
    (work / "runs" / "r" / "metrics.jsonl").mkdir(parents=True), ["runs", "list", "--root", str(work / "runs")])[1])


# ----------------------------------------------------------------------------- the test

@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_exit_code_2_with_one_error_line(name, base, tmp_path, capsys):
    root, artifacts = base
    work = tmp_path / "work"
    work.mkdir()
    argv = CASES[name](root, work, artifacts)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit:   # argparse's usage errors (an int where a word was given, ...)
        code = exit.code
    err = capsys.readouterr().err
    assert code in (0, 2), f"exit code {code}: {err[-2000:]}"
    if code == 2 and not err.startswith("usage:"):
        lines = [line for line in err.splitlines() if line.startswith(f"lmforge {argv[0]}: error: ")]
        assert lines and "Traceback" not in err, err[-2000:]
