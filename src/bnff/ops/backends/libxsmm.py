"""Finding libxsmm, the optional GEMM micro-kernel library of the fused pointwise convolution.

libxsmm (BSD-3, https://github.com/libxsmm/libxsmm) JIT-generates small GEMM kernels for AVX2,
AVX-512 and avx512_bf16. bnff links its static libraries into the cpu backend's kernels
(``csrc/bnff_pointwise.cpp``) when they are installed: on Debian and Ubuntu ``apt-get install
libxsmm-dev`` (version 1.17: ``/usr/include/libxsmm.h``, ``/usr/lib/libxsmm.a``). It is found through
``pkg-config libxsmm``, else under the prefixes ``/usr`` and ``/usr/local``; ``BNFF_LIBXSMM=0``
builds without it. Whether it was found, and its version, are part of the kernels' build key.

Without it everything runs as before: 1x1 convolutions are ATen's, and ``find().why`` says why.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIXES = (Path("/usr"), Path("/usr/local"))
# The static archives, in link order: the library, then its stand-ins for the BLAS it would call on
# shapes it has no kernel for (bnff never asks it for those: a missing kernel is a null dispatch).
ARCHIVES = ("libxsmm.a", "libxsmmnoblas.a")
SYSTEM_LIBS = ("-lpthread", "-ldl", "-lrt", "-lm")
# libxsmm's target architecture for each of the cpu backend's ISA levels (``cpu.isa()``), so the
# micro-kernels never use instructions ATen was told not to (``ATEN_CPU_CAPABILITY``); "" lets
# libxsmm detect the CPU. LIBXSMM_TARGET, when set, wins (libxsmm's own rule).
TARGETS = {"avx512_bf16": "", "avx512": "skx", "avx2": "hsw", "default": "generic"}


@dataclass(frozen=True)
class Found:
    """Where libxsmm is, or why it is not used.

    Attributes:
        version: "1.17.0" etc., or None when not used.
        include: the folder holding ``libxsmm.h``.
        archives: the static libraries to link, in order.
        why: None when found, else the reason (and the way out).
    """

    version: str | None
    include: Path | None = None
    archives: tuple[Path, ...] = ()
    why: str | None = None

    @property
    def cflags(self) -> list[str]:
        """The compiler flags of a build with it (none without it)."""
        if self.version is None:
            return []
        major, minor, update = (int(v) for v in self.version.split("."))
        return [f"-DBNFF_LIBXSMM={major * 10000 + minor * 100 + update}", f"-I{self.include}"]

    @property
    def ldflags(self) -> list[str]:
        """The linker flags of a build with it (none without it)."""
        return [] if self.version is None else [*map(str, self.archives), *SYSTEM_LIBS]


def _version(include: Path) -> str | None:
    try:
        text = (include / "libxsmm_version.h").read_text()
    except OSError:
        return None
    parts = [re.search(rf"#define LIBXSMM_CONFIG_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "UPDATE")]
    return ".".join(p.group(1) for p in parts) if all(parts) else None


def _pkg_config() -> tuple[Path, Path] | None:
    if shutil.which("pkg-config") is None:
        return None
    try:
        out = [subprocess.run(["pkg-config", "--variable", v, "libxsmm"], capture_output=True, text=True,
                              timeout=30).stdout.strip() for v in ("includedir", "libdir")]
    except (OSError, subprocess.SubprocessError):
        return None
    return (Path(out[0]), Path(out[1])) if all(out) else None


_disabled: list[str] = []  # why this process builds without it (``disable``)


def disable(why: str) -> None:
    """Build without libxsmm from now on in this process (``find`` answers ``why``): the cpu backend's
    fallback when its kernels do not link with it."""
    _disabled[:] = [why]
    find.cache_clear()


@functools.cache
def find() -> Found:
    """libxsmm's headers and static libraries (``pkg-config libxsmm``, else ``PREFIXES``), once per process.

    Returns:
        a ``Found``; its ``why`` names what is missing and how to install it when it is not used.
    """
    if os.environ.get("BNFF_LIBXSMM", "1") == "0":
        return Found(None, why="BNFF_LIBXSMM=0 is set")
    if _disabled:
        return Found(None, why=_disabled[0])
    places = [p for p in [_pkg_config()] if p] + [(pre / "include", pre / "lib") for pre in PREFIXES]
    for include, libdir in places:
        archives = tuple(libdir / a for a in ARCHIVES)
        if (include / "libxsmm.h").is_file() and all(a.is_file() for a in archives):
            version = _version(include)
            if version is not None:
                return Found(version, include, archives)
    return Found(None, why="libxsmm not found (libxsmm.h and " + ", ".join(ARCHIVES) + " under pkg-config's "
                 "libxsmm or " + ", ".join(map(str, PREFIXES)) + "); install it with `apt-get install libxsmm-dev` "
                 "for bnff's fused pointwise convolutions")
