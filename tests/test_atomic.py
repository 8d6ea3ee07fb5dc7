"""Atomic writes: checkpoints, metrics and reports are never left half-written."""

import pytest

from bnff.atomic import atomic_open


def test_crash_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("new, half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_clean_exit_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with atomic_open(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
