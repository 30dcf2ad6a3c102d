"""The package's shape: imports go one way inside the tokenizer layer, the tokenizer layer never
imports the model layer, one GGUF header reader, one process pool, and modules of readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmforge

PACKAGE = Path(lmforge.__file__).parent
MAX_LINES = 400
# The modules this layout is kept for (other modules have their own owners and checks).
SIZED = ["config.py", "io.py", "gguf_file.py", "workers.py", "data/shards.py", "data/shard_meta.py",
         "data/loaders.py", "data/commands.py", "data/corpora.py", "track/runs.py", "track/commands.py",
         "model/gguf.py", "model/commands.py", "model/convert_command.py", "model/info.py",
         *[str(path.relative_to(PACKAGE)) for path in sorted((PACKAGE / "model" / "hf").glob("*.py"))],
         *[str(path.relative_to(PACKAGE)) for path in sorted((PACKAGE / "tokenizer").glob("*.py"))],
         *[str(path.relative_to(PACKAGE)) for path in sorted((PACKAGE / "labs").glob("*.py"))]]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the lmforge modules a file imports anywhere (top level or inside functions)."""
    package = ".".join(("lmforge", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)   # `from . import formats`
    return {name for name in names if name.startswith("lmforge")}


def test_imports_inside_the_tokenizer_layer_go_one_way():
    modules = {f"lmforge.tokenizer.{path.stem}": path for path in (PACKAGE / "tokenizer").glob("*.py")
               if path.stem != "__init__"}
    graph = {name: imported_modules(path) & set(modules) for name, path in modules.items()}

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(name):] + [name])}")
        for imported in graph[name]:
            visit(imported, trail + [name])

    for name in graph:
        visit(name, [])
    # The file formats produce data that bpe consumes, never the other way round.
    for reader in ("formats", "gguf_import", "parts"):
        assert "lmforge.tokenizer.bpe" not in graph[f"lmforge.tokenizer.{reader}"]


def test_the_tokenizer_layer_never_imports_the_model_layer():
    for path in (PACKAGE / "tokenizer").glob("*.py"):
        assert not any(name.startswith("lmforge.model") for name in imported_modules(path)), path.name


def test_one_gguf_header_reader_serves_the_model_and_the_tokenizer(tmp_path, monkeypatch):
    import gguf

    import lmforge.gguf_file as gguf_file
    from lmforge.model.gguf import read_header
    from lmforge.tokenizer import BPETokenizer, train_bpe_on_texts
    from lmforge.tokenizer.byte_level import bytes_to_token_string

    tokenizer = train_bpe_on_texts(["the winter of our discontent"] * 4, vocab_size=280)
    tokens = [bytes_to_token_string(token) for token, _ in sorted(tokenizer.vocab.items(), key=lambda item: item[1])]
    tokens += sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), arch="llama")
    writer.add_block_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [1] * len(tokenizer.merges) + [3] * len(tokenizer.special_tokens))
    writer.add_token_merges([f"{bytes_to_token_string(a)} {bytes_to_token_string(b)}" for a, b in tokenizer.merges])
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    calls = []
    real_parse = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda *args: calls.append(args[1:]) or real_parse(*args))
    header = read_header(tmp_path / "t.gguf")
    assert header.metadata["llama.block_count"] == 2 and header.tensor_shapes["token_embd.weight"] == [8, 4]
    assert "tokenizer.ggml.tokens" not in header.metadata   # arrays are skipped unless asked for
    assert BPETokenizer.from_gguf(tmp_path / "t.gguf").fingerprint() == tokenizer.fingerprint()
    assert calls == [((), True), (("tokenizer.",), False)]
    for module in ("model/gguf.py", "tokenizer/gguf_import.py"):   # neither parses bytes itself
        assert "lmforge.gguf_file" in imported_modules(PACKAGE / module)
        assert "unpack" not in (PACKAGE / module).read_text(encoding="utf-8")


def test_both_process_pools_use_the_one_spawn_helper():
    from lmforge import workers

    assert workers.START_METHOD == "spawn"
    for module in ("tokenizer/train.py", "data/shards.py"):
        source = (PACKAGE / module).read_text(encoding="utf-8")
        assert "multiprocessing" not in source and "lmforge.workers" in imported_modules(PACKAGE / module), module
    # Results come back in task order, (task, result) pairs; a worker's exception reaches the caller.
    assert list(workers.ordered_map(abs, [-3, 1, -2, 5, -8], num_workers=2)) == [(-3, 3), (1, 1), (-2, 2), (5, 5),
                                                                                (-8, 8)]
    with pytest.raises(ValueError):
        list(workers.ordered_map(int, ["1", "x"], num_workers=2))


@pytest.mark.parametrize("module", SIZED)
def test_modules_stay_readable_in_one_sitting(module):
    lines = len((PACKAGE / module).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"lmforge/{module} has {lines} lines; split it by concern"
