"""The one atomic-write helper: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from captioner.atomic import _UMASK, AtomicFile, atomic_write_bytes


def test_commit_publishes_the_whole_file_and_discard_leaves_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(path, b"old")
    file = AtomicFile(path)
    file.tmp.write_bytes(b"new, not yet published")
    assert path.read_bytes() == b"old" and file.tmp.parent == path.parent
    file.discard()
    assert path.read_bytes() == b"old" and not file.tmp.exists()

    with AtomicFile(path) as file:
        file.tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and list(path.parent.iterdir()) == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_UMASK  # the usual permissions, not mkstemp's 0600


def test_an_exception_in_the_block_discards(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), AtomicFile(path) as file:
        file.tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
