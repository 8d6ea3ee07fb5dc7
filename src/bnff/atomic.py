"""Atomic file writes: a crash mid-write never leaves a half-written file at the destination."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit flush it to disk and
    rename it onto ``path`` (``os.replace``); on an exception delete it and leave ``path`` as it was.

    Args:
        path: destination; its folder is created if missing.
        mode: "w" (text, newline="" so CSV writers control line ends) or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["atomic_open"]
