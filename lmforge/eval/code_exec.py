"""Run model-written code against HumanEval's tests, sandboxed. Opt-in only (--allow-code-execution).

HumanEval asks a model to complete a Python function and counts it correct when the problem's
own `check(candidate)` passes. Running untrusted code needs a fence; ours is:

- a separate `python -I` process (isolated mode: no user site, no PYTHON* variables) in an empty
  temporary directory, with a near-empty environment;
- resource limits set in the child before it starts (resource.setrlimit): CPU seconds, address
  space (memory), file size, number of processes; plus a wall-clock timeout that kills its group;
- no network: a private network namespace when `unshare -rn` works on this machine, and in any
  case the socket module's constructors replaced by a function that raises, before any user code.

This keeps an honest mistake (an infinite loop, a memory blow-up, a test that phones home) from
hurting the evaluation. It is not a security boundary against code written to escape it.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

NO_NETWORK = '''
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the lmforge sandbox")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _no_network)
del _socket, _name
'''


@dataclass
class Limits:
    timeout_s: float = 10.0             # wall clock, the whole process
    cpu_s: int = 10
    memory_bytes: int = 1 << 30         # address space
    file_bytes: int = 1 << 24
    processes: int = 64


@dataclass
class ExecResult:
    passed: bool
    status: str                         # "passed" | "failed" | "timeout"
    output: str                         # the last lines of stderr/stdout


def _set_limits(limits: Limits) -> None:   # runs in the child, before exec
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """['unshare', '-rn'] when this machine lets an unprivileged user make a network namespace."""
    tool = shutil.which("unshare")
    if tool is None:
        return ()
    try:
        ok = subprocess.run([tool, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (tool, "-rn") if ok else ()


def run_program(program: str, limits: Limits | None = None) -> ExecResult:
    """Run `program` (Python source) in the sandbox; passed = it exited with status 0 in time."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as directory:
        path = os.path.join(directory, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(NO_NETWORK + "\n" + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": directory, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        command = [*_unshare_prefix(), sys.executable, "-I", path]
        process = subprocess.Popen(command, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: _set_limits(limits))
        try:
            output, _ = process.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)     # the whole group: children of the program too
            output, _ = process.communicate()
            return ExecResult(False, "timeout", _tail(output))
    if process.returncode == -signal.SIGXCPU or process.returncode == -signal.SIGKILL:
        return ExecResult(False, "timeout", _tail(output))
    status = "passed" if process.returncode == 0 else "failed"
    return ExecResult(process.returncode == 0, status, _tail(output))


def _tail(output: bytes | None, lines: int = 8) -> str:
    return "\n".join((output or b"").decode("utf-8", "replace").splitlines()[-lines:])


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, then check(entry_point)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_problem(problem: dict[str, Any], completion: str, limits: Limits | None = None) -> bool:
    return run_program(humaneval_program(problem, completion), limits).passed
