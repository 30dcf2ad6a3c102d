"""Static checks of the Dockerfile and its entrypoint (there is no Docker engine to build it here).

They catch what usually breaks an image silently: a COPY of a missing or ignored file, a pin that
drifted from pyproject.toml/Makefile, a root user, and an entrypoint that runs CLI flags which do
not exist. The entrypoint is run for real, with a stand-in `lmforge` on PATH that records its
arguments, and those arguments are parsed by the real `lmforge serve` / `lmforge web` parsers.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import build_command_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and `\\` continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        result.append((instruction.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns we use: a pattern matches the path or one of its parents."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(Path(prefix).name, bare):
                return True
    return False


def test_base_image_user_ports_and_entrypoint():
    steps = instructions()
    names = [name for name, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert "EXPOSE" in names and set(dict(steps)["EXPOSE"].split()) == {"8000", "7860"}
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["lmforge-entrypoint"]
    assert json.loads(dict(steps)["CMD"]) == ["serve"]


def test_every_copied_file_exists_and_is_not_dockerignored():
    patterns = dockerignore_patterns()
    copies = [args for name, args in instructions() if name == "COPY"]
    assert copies
    sources = []
    for args in copies:
        words = [word for word in shlex.split(args) if not word.startswith("--")]
        sources += words[:-1]
    assert {"pyproject.toml", "README.md", "lmforge", "configs", "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies '{source}', which does not exist"
        assert not ignored(source, patterns), f"Dockerfile copies '{source}', but .dockerignore drops it"
    # And the ignore file does keep bulky or private things out of the build context.
    for path in (".venv", ".git", "runs", "lmforge/__pycache__", "tests"):
        assert ignored(path, patterns), f"'{path}' should be in .dockerignore"


def test_pins_match_pyproject_and_makefile():
    text = " ".join(args for name, args in instructions() if name in ("RUN", "ARG"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"TORCH_VERSION={torch_pin}" in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assets = re.search(r"^ASSETS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()
    assert f"pip install --no-deps -r {assets}" in text
    assert any(name == "COPY" and assets in args for name, args in instructions())
    # torch is installed before lmforge, so lmforge's torch pin is already satisfied by the CPU build.
    runs = [args for name, args in instructions() if name == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if "torch==" in args)
    lmforge_step = next(i for i, args in enumerate(runs) if "pip install -e ." in args)
    assert torch_step < lmforge_step


def test_entrypoint_is_executable_posix_sh():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


def run_entrypoint(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run the entrypoint with a stand-in `lmforge` that prints the arguments it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "lmforge"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("args, expected", [
    ((), ["serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"]),
    (("serve",), ["serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"]),
    (("web",), ["web", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "7860"]),
    (("web", "--server-url", "http://api:8000/v1"),
     ["web", "--host", "0.0.0.0", "--port", "7860", "--server-url", "http://api:8000/v1"]),
    (("serve", "--model", "nano"), ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "nano"]),
])
def test_entrypoint_runs_commands_the_cli_accepts(tmp_path, args, expected):
    argv = run_entrypoint(tmp_path, *args)
    assert argv == expected
    parser = build_command_parser(argv[0])
    parsed = parser.parse_args(argv[1:])   # exits (fails the test) on an unknown flag
    assert parsed.host == "0.0.0.0" and parsed.port == int(expected[expected.index("--port") + 1])
    assert callable(parsed.func)


def test_entrypoint_model_comes_from_environment(tmp_path):
    argv = run_entrypoint(tmp_path, "serve", env={"LMFORGE_MODEL": "/models/my-run"})
    assert argv[argv.index("--model") + 1] == "/models/my-run"


def test_entrypoint_runs_other_commands_as_given(tmp_path):
    assert run_entrypoint(tmp_path, "lmforge", "generate", "--model", "nano", "hi") == [
        "generate", "--model", "nano", "hi"]
