"""Backends: interchangeable implementations of the element-wise sweeps of restructured BN.

A backend is a module exposing ``channel_stats``, ``apply``, ``grad_stats`` and ``input_grad``
with the signatures of ``bnff.ops.backends.reference``. The autograd logic (``bnff.ops.fused``)
is written once against this seam; a fast backend only replaces the sweeps.
"""

from __future__ import annotations

from types import ModuleType

from bnff.ops.backends import reference

_BACKENDS: dict[str, ModuleType] = {"reference": reference}


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
