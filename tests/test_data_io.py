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
