"""lmforge.io: atomic writes give files the usual permissions."""
from __future__ import annotations

import os
import stat

import pytest

from lmforge import io


@pytest.fixture()
def umask():
    """Run with a known umask, read afresh by lmforge.io."""
    def set_umask(mask: int) -> None:
        os.umask(mask)
        io._umask.cache_clear()

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)
    io._umask.cache_clear()


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask_not_mkstemps_0600(tmp_path, umask, mask):
    umask(mask)
    io.write_text_atomic(tmp_path / "a.txt", "hello")
    io.write_json_atomic(tmp_path / "b.json", {"a": 1})
    with io.atomic_path(tmp_path / "c.bin") as temporary:
        temporary.write_bytes(b"\x00")
    for name in ("a.txt", "b.json", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    # Same mode as a plain open() would give.
    (tmp_path / "plain").write_text("x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~mask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin", "plain"]


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert io._umask() == 0o027
    assert os.umask(0o027) == 0o027  # still in force


def test_weights_and_directories_written_by_libraries_get_the_usual_modes(tmp_path, umask):
    """safetensors and mkdtemp create owner-only files and folders; a model directory or checkpoint
    must still be readable by others (e.g. the Docker image's non-root user reading a mounted run)."""
    import torch
    from safetensors.torch import save_file

    from lmforge.model import get_preset
    from lmforge.model.loading import export
    from lmforge.model.builders import build_model
    from lmforge.train.checkpoint import save_checkpoint

    umask(0o022)
    with io.atomic_path(tmp_path / "w.safetensors") as temporary:
        save_file({"w": torch.zeros(2)}, str(temporary))
    model = build_model(get_preset("nano", vocab_size=64, tie_embeddings=False))
    export(model, None, tmp_path / "model", "lmforge")
    export(model, None, tmp_path / "hf", "hf")
    checkpoint = save_checkpoint(tmp_path / "run", 1, model.state_dict(), {"step": 1}, {"a": 1})
    written = [tmp_path / "w.safetensors", tmp_path / "model", tmp_path / "hf", checkpoint,
               *(tmp_path / "model").rglob("*"), *(tmp_path / "hf").rglob("*"), *checkpoint.rglob("*")]
    for path in written:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
