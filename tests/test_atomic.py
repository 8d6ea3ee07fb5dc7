"""Atomic writes: checkpoints, metrics and reports are never left half-written."""

import os
import stat

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


def test_written_file_has_the_permissions_open_would_give(tmp_path):
    """mkstemp makes 0600 files; the result must have 0666 less the umask, like a plain open()."""
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "report.json") as f:
            f.write("{}")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644
