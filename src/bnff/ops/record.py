"""A debug mode that records the bytes bnff's fused operators really move, group by group.

Independent of the fusion plan: a ``TorchDispatchMode`` sees every operator the fused operators
dispatch (the ``bnff::*`` kernels of the ``cpu`` backend, and any ATen op such as a gradient sum or
a layout conversion) with its actual input and output tensors, and ``saved_tensors_hooks`` see
what autograd keeps. The fused operators name the group they run for (``scope``), so the bytes
can be compared, group by group, with the plan's ``bnff`` schedule (``tests/test_plan_bytes.py``).

Counted: feature maps (tensors of 4 or more dimensions); per-channel vectors are not. An operator
reads each distinct input feature map once and writes each output once (an in-place operator's
output is its input, written). Views and allocations move nothing. What a consumer (convolution,
pool) does runs in a scope of its own (``consumer``), and so does making a user's non-dense
gradient dense (``user``): that traffic is those layers', in the plan too.
Parameters are not activations and are left out of what is kept.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_active: list["Recorder"] = []
_scope: list[tuple[str, str]] = []

def _maps(x: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.dim() >= 4]


class Recorder(TorchDispatchMode):
    """``with Recorder(model) as rec:`` run a training step; then ``rec.moved[(group, phase)]`` is the
    bytes read plus written by the group's operators in that phase ("fp", "bp"), ``rec.kept[group]``
    the bytes of feature maps its forward saved for the backward, ``rec.ops[(group, phase)]`` the
    operators by name."""

    def __init__(self, *models: torch.nn.Module) -> None:
        super().__init__()
        self._params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
        self.moved: Counter = Counter()
        self.kept: Counter = Counter()
        self.ops: dict[tuple[str, str], Counter] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if _scope and _scope[-1][1] == "fp" and t.dim() >= 4 and t.untyped_storage().data_ptr() not in self._params:
            self.kept[_scope[-1][0]] += t.numel() * t.element_size()
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if _scope and not func.is_view and "empty" not in name:
            ins = list({id(t): t for t in _maps((args, kwargs))}.values())
            outs = [t for t in _maps(out) if not any(t is i for i in ins)]
            inplace = [t for t in _maps(out) if any(t is i for i in ins)]
            key = _scope[-1]
            self.moved[key] += sum(t.numel() * t.element_size() for t in ins + outs + inplace)
            self.ops.setdefault(key, Counter())[name] += 1
        return out

    def __enter__(self) -> "Recorder":
        _active.append(self)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        _active.remove(self)


class _Scope:
    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key

    def __enter__(self) -> None:
        _scope.append(self.key)

    def __exit__(self, *exc) -> None:
        _scope.pop()


_OFF = contextlib.nullcontext()


def active() -> bool:
    """Whether a ``Recorder`` is recording (the fused operators then run their steps one by one)."""
    return bool(_active)


def scope(group: str, phase: str):
    """Attribute what runs inside to ``group`` in ``phase`` while a ``Recorder`` is active (a shared
    no-op context otherwise: the fused operators call this on every step)."""
    return _Scope((group, phase)) if _active else _OFF


def user(group: str, phase: str):
    """The scope of work done for a user of ``group``'s materialized result (its layer's, in the plan)."""
    return scope(f"{group}/user", phase)


def consumer(group: str, index: int, phase: str):
    """The scope of consumer ``index`` of ``group`` (kept apart from the group's own sweeps)."""
    return scope(f"{group}/consumer{index}", phase)


__all__ = ["Recorder", "active", "consumer", "scope", "user"]
