"""Backends: interchangeable implementations of the element-wise sweeps of restructured BN.

A backend is a module exposing ``COVERAGE`` (which dtypes and layouts run where, for the fusion
report), ``channel_stats``, ``apply``, ``grad_stats``, ``input_grad``,
``grad_stats_x`` and ``input_grad_x`` with the signatures of ``bnff.ops.backends.reference``. The autograd logic (``bnff.ops.fused``)
is written once against this seam; a fast backend only replaces the sweeps. ``reference`` is
plain PyTorch (the oracle); ``cpu`` is fused C++ kernels, the default when they build.
"""

from __future__ import annotations

from types import ModuleType

from bnff.names import BACKEND_NAMES
from bnff.ops.backends import cpu, reference

_BACKENDS: dict[str, ModuleType] = {name: globals()[name] for name in BACKEND_NAMES}


_default: str | None = None


def default() -> str:
    """The backend ``restructure`` uses when none is named: "cpu" when its kernels build (once
    per process, then cached by torch), else "reference" (after one warning saying why)."""
    global _default
    if _default is None:
        _default = "cpu" if cpu.available() else "reference"
    return _default


def resolve(name: str | None) -> str:
    """``name``, or ``default()`` for None, checked.

    Raises:
        ValueError: ``name`` is not a known backend; the message lists the known ones.
    """
    name = default() if name is None else name
    get(name)
    return name


def get(name: str) -> ModuleType:
    """Return the backend called ``name``.

    Raises:
        ValueError: ``name`` is not a known backend; the message lists the known ones.
    """
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown bnff backend {name!r}; available: {sorted(_BACKENDS)}") from None


def available() -> list[str]:
    """Names of the registered backends."""
    return sorted(_BACKENDS)
