"""Atomic file writes: a crash mid-write never leaves a half-written file at the destination."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit flush it to disk, give it
    the permissions a plain ``open`` would (0o666 less the umask), rename it onto ``path``
    (``os.replace``) and sync the folder, so the rename itself survives a power cut; on an exception
    delete it and leave ``path`` as it was.

    Args:
        path: destination; its folder is created if missing.
        mode: "w" (text, newline="" so CSV writers control line ends) or "wb".
    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON at ``path``, atomically (``atomic_open``)."""
    import json

    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys, in order) as CSV with a header row, atomically."""
    import csv

    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_figure(path: str | Path, fig, **kwargs) -> None:
    """A matplotlib ``Figure`` at ``path``, in the format its suffix names (PNG, SVG, PDF; no suffix:
    PNG), atomically."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".").lower() or "png", **kwargs)


__all__ = ["atomic_open", "save_figure", "write_csv", "write_json"]
