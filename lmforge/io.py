"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename.

A crash or kill mid-write leaves the previous file intact (rename is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import UserError


def ensure_writable_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create `path` (and parents) and check we can write there, with a clear error that names the
    setting (`option`) the user chose it with if not."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(
            f"cannot write to output directory '{directory}' ({error.strerror or error}); "
            f"choose a writable path with {option} or fix its permissions"
        ) from None
    return directory


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read once. Linux shows it in /proc (a read that changes nothing); elsewhere
    the only way is to set it and put it back, which is done once so threads rarely see the blip."""
    # latin-1 decodes any byte (the process name on the first line may be anything).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="latin-1") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything under it) the modes open() and mkdir() would:
    0666 / 0777 less the umask. mkstemp, mkdtemp and safetensors create owner-only files, which
    other users (or a container's non-root user reading a mounted run) could not read."""
    file_mode, dir_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    root = Path(path)
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    for directory, _, files in os.walk(root):
        os.chmod(directory, dir_mode)
        for name in files:
            os.chmod(os.path.join(directory, name), file_mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write (by any library); on success rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.close(fd)
        yield Path(tmp_name)
        apply_default_modes(tmp_name)   # after writing: a library may have replaced the file
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """open() a temporary sibling of `path` for writing; on success it replaces `path`."""
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as handle:
        yield handle


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=indent, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON with a clear error naming the file on failure."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} '{file}' does not exist; check the path")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} '{file}' is not valid JSON ({error}); regenerate or fix it") from None
    except (ValueError, RecursionError) as error:   # an integer of over 4300 digits; nesting too deep
        raise UserError(f"{what} '{file}' cannot be read as JSON ({type(error).__name__}); regenerate or fix it") from None
    except OSError as error:   # a directory named like the file, no permission, ...
        raise UserError(f"{what} '{file}' cannot be read ({error.strerror or error}); check the file") from None
