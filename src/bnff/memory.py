"""Measuring the activations a training step keeps for its backward pass (docs/design.md section 5).

Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``; we count
the bytes of each distinct storage once. Parameters, and the casts autocast makes of them (a
``ToCopyBackward0`` straight from a leaf), are weights, not activations, and are not counted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


def _is_weight(t: Tensor, weight_storages: set[int]) -> bool:
    if t.untyped_storage().data_ptr() in weight_storages:
        return True
    fn = t.grad_fn
    return (fn is not None and type(fn).__name__ == "ToCopyBackward0"
            and all(type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions if nxt is not None))


class SavedActivations:
    """Context manager that counts the activation bytes autograd saves while it is active.

    Attributes:
        bytes: distinct saved storages' sizes summed, in bytes.
        tensors: number of distinct storages counted.

    Example::

        with SavedActivations(model) as saved:
            loss = model(x).sum()
        print(saved.bytes)
    """

    def __init__(self, *models: nn.Module) -> None:
        self._weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if not _is_weight(t, self._weights):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
                self.tensors += 1
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(model: nn.Module, *inputs: Tensor, forward: Callable[..., Tensor] | None = None) -> int:
    """Bytes of activations autograd keeps for the backward of one forward pass of ``model``.

    Args:
        model: the network (its parameters are excluded from the count).
        inputs: its inputs, e.g. one (N, 3, H, W) image batch.
        forward: optional callable run instead of ``model(*inputs)`` (e.g. under autocast).
    Returns:
        Bytes, counting each saved storage once.
    """
    with SavedActivations(model) as saved:
        out = forward(*inputs) if forward is not None else model(*inputs)
        del out
    return saved.bytes
