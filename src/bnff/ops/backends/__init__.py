"""Backends: interchangeable implementations of the element-wise sweeps of restructured BN.

A backend is a module implementing the ``Backend`` protocol (the signatures and mathematics of
``bnff.ops.backends.reference``). The autograd logic (``bnff.ops.fused``) is written once against
this seam; a fast backend only replaces the sweeps, and hands what its kernels do not cover back to
``reference`` in one place of its own. ``reference`` is plain PyTorch (the oracle); ``cpu`` is fused
C++ kernels, the default when they build; ``triton`` is Triton kernels for CUDA tensors (the ``cpu``
backend hands it every call on CUDA tensors, so a model restructured on the CPU trains on a GPU).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from bnff.names import BACKEND_NAMES
from bnff.ops.backends import cpu, reference, triton


@runtime_checkable
class Backend(Protocol):
    """The element-wise sweeps of restructured BN (each one pass over its feature maps), and the
    per-channel vectors between them (``scale``, ``backward_vectors``, ``running_update``: ``bn_math``'s
    formulas).

    Feature maps are (N, C, H, W), NCHW or channels_last; a BN input is given as its sources (the
    maps its channel concatenation is made of); vectors are (C,) in the accumulation dtype. See
    ``bnff.ops.backends.reference`` for each sweep's equation (seed 002 eq. 1, 9, 12, 16-20).
    """

    COVERAGE: str  # which dtypes and layouts run where, for the fusion report

    def dense_like(self, t: Tensor, like: Tensor) -> Tensor: ...

    def channel_stats(self, c: Tensor) -> tuple[Tensor, Tensor]: ...

    def apply(self, sources: list[list[Tensor]], means: list[Tensor], f1s: list[Tensor], betas: list[Tensor | None],
              residuals: list[Tensor], act: str | None, out_dtype: torch.dtype) -> Tensor: ...

    def grad_stats(self, g_a: Tensor, a: Tensor | None, act: str | None, sources: list[list[Tensor]],
                   means: list[Tensor], f1s: list[Tensor] | None = None, betas: list[Tensor | None] | None = None,
                   residuals: list[Tensor] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]: ...

    def grad_stats_x(self, g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                     beta: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]: ...

    def input_grad(self, dy: Tensor, sources: list[Tensor], mean: Tensor, f1: Tensor, b: Tensor | None,
                   s1: Tensor) -> list[Tensor]: ...

    def input_grad_x(self, g_a: Tensor, act: str | None, sources: list[Tensor], mean: Tensor, f1: Tensor,
                     beta: Tensor | None, out_dtype: torch.dtype, b: Tensor | None, s1: Tensor) -> list[Tensor]: ...

    def scale(self, var: Tensor, gamma: Tensor | None, eps: float) -> Tensor: ...

    def backward_vectors(self, var: Tensor, f1: Tensor, s1: Tensor, s2c: Tensor, s2c_dx: Tensor, m: int, eps: float,
                         batch: bool) -> tuple[Tensor | None, Tensor, Tensor]: ...

    def running_update(self, running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float,
                       m: int) -> None: ...


_BACKENDS: dict[str, Backend] = {name: globals()[name] for name in BACKEND_NAMES}
for _name, _module in _BACKENDS.items():
    if not isinstance(_module, Backend):  # pragma: no cover - a new backend missing a sweep
        raise TypeError(f"bnff backend {_name!r} does not implement bnff.ops.backends.Backend")


_default: str | None = None


def default() -> str:
    """The backend ``restructure`` uses when none is named: "cpu" when its kernels build (once
    per process, then cached by torch; it hands CUDA tensors to "triton"), else "triton" when a CUDA
    device and Triton are there, else "reference" (after one warning saying why)."""
    global _default
    if _default is None:
        _default = "cpu" if cpu.available() else "triton" if triton.available("cuda") else "reference"
    return _default


def resolve(name: str | None) -> str:
    """``name``, or ``default()`` for None, checked.

    Raises:
        ValueError: ``name`` is not a known backend; the message lists the known ones.
    """
    name = default() if name is None else name
    get(name)
    return name


def get(name: str) -> Backend:
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
