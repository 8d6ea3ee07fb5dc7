"""What each fx node is, in the field's terms: conv, BN, activation, add, pool, concat, linear.

This classification is shared by ``bnff.restructure`` (pattern matching) and the analyses
(traffic model), so that every part of bnff agrees on what counts as, say, a ReLU: the module
``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place spellings. Which calls are
activations, and of which kind, is the activation table's to say (``bnff.activations.recognize``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnff import activations
from bnff.graph import bn_forms
from bnff.modules import SyncBatchNorm


class Kind(str, Enum):
    """Layer kinds of the layer-graph IR."""

    INPUT = "input"
    OUTPUT = "output"
    CONV = "conv"
    BN = "bn"
    ACT = "act"
    ADD = "add"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    CAT = "cat"
    LINEAR = "linear"
    FLATTEN = "flatten"
    OTHER = "other"


@dataclass(frozen=True)
class NodeInfo:
    """Classification of one fx node.

    Attributes:
        kind: the layer kind.
        act: the activation kind (``bnff.activations``: "relu", "silu", "leaky_relu(0.1)", ...) of an
            activation; calls the table does not know are ``Kind.OTHER``.
        operands: the tensor inputs that matter for the kind (the BN/act input; the two addends).
        module: the called module for ``call_module`` nodes.
    """

    kind: Kind
    act: str | None = None
    operands: tuple[fx.Node, ...] = ()
    module: nn.Module | None = None


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Convolutions over (N, C, L), (N, C, H, W) and (N, C, D, H, W) maps: producers and consumers of groups."""
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""BN modules fused (with ``SyncBatchNorm``); a ``BatchNorm1d`` only on a convolution's (N, C, L) output."""
SPLITS = frozenset({"split", "chunk", "tensor_split", "unbind", "split_with_sizes"})
"""Functions and methods (by name) that cut a tensor into views of its parts, taken by ``operator.getitem``."""

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MAXPOOL_FUNCS = {F.max_pool2d, F.adaptive_max_pool2d}
_AVGPOOL_FUNCS = {F.avg_pool2d, F.adaptive_avg_pool2d}


def _plain_forward(m: nn.Module, base: type) -> bool:
    return type(m).forward is base.forward


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> NodeInfo:
    """Classify ``node`` of a graph whose submodules are ``modules`` (qualified name -> module)."""
    args, kwargs = node.args, node.kwargs
    first = tuple(a for a in args[:1] if isinstance(a, fx.Node))
    if node.op == "placeholder":
        return NodeInfo(Kind.INPUT)
    if node.op == "output":
        return NodeInfo(Kind.OUTPUT)
    act = activations.recognize(node, modules)
    if act is not None and first:
        return NodeInfo(Kind.ACT, act, first, modules.get(node.target) if node.op == "call_module" else None)
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, CONVS) and _plain_forward(m, next(c for c in CONVS if isinstance(m, c))):
            return NodeInfo(Kind.CONV, operands=first, module=m)
        if (isinstance(m, BATCH_NORMS) and _plain_forward(m, _BatchNorm)) or \
                (isinstance(m, nn.SyncBatchNorm) and _plain_forward(m, nn.SyncBatchNorm)) or \
                (isinstance(m, SyncBatchNorm) and _plain_forward(m, SyncBatchNorm)):
            return NodeInfo(Kind.BN, operands=first, module=m)
        if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            return NodeInfo(Kind.MAXPOOL, operands=first, module=m)
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return NodeInfo(Kind.AVGPOOL, operands=first, module=m)
        if isinstance(m, nn.Linear):
            return NodeInfo(Kind.LINEAR, operands=first, module=m)
        if isinstance(m, nn.Flatten):
            return NodeInfo(Kind.FLATTEN, operands=first, module=m)
        return NodeInfo(Kind.OTHER, module=m)
    if node.op == "call_function":
        fn = node.target
        named = bn_forms.bn_module(node, modules)
        if named is not None:  # BN written another way (bnff.graph.bn_forms)
            m = named[1]
            kind = Kind.BN if isinstance(m, (*BATCH_NORMS, nn.SyncBatchNorm, SyncBatchNorm)) else Kind.OTHER
            return NodeInfo(kind, operands=first, module=m)
        if fn in _ADD_FUNCS and _tensor_add(args, kwargs):
            return NodeInfo(Kind.ADD, operands=(args[0], args[1]))
        if fn in _MAXPOOL_FUNCS:
            return NodeInfo(Kind.MAXPOOL, operands=first)
        if fn in _AVGPOOL_FUNCS:
            return NodeInfo(Kind.AVGPOOL, operands=first)
        if fn is torch.cat:
            return NodeInfo(Kind.CAT, operands=tuple(a for a in args[0] if isinstance(a, fx.Node)))
        if fn is torch.flatten:
            return NodeInfo(Kind.FLATTEN, operands=first)
        return NodeInfo(Kind.OTHER)
    if node.op == "call_method":
        if node.target in ("add", "add_") and _tensor_add(args, kwargs):
            return NodeInfo(Kind.ADD, operands=(args[0], args[1]))
        if node.target == "flatten":
            return NodeInfo(Kind.FLATTEN, operands=first)
    return NodeInfo(Kind.OTHER)


def is_mul(node: fx.Node) -> bool:
    """A product ``a * b``, ``torch.mul(a, b)`` or ``a.mul(b)`` (its operands not checked)."""
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or \
        (node.op == "call_method" and node.target == "mul")


def is_mean(node: fx.Node) -> bool:
    """A mean over dimensions, ``x.mean(...)`` or ``torch.mean(x, ...)``."""
    return (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)


def module_name(node: fx.Node) -> str:
    """The qualified name of the module a layer node calls: its target for ``call_module``, the BN module
    of a ``bn_forms.batch_norm`` call; else the node's own name."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function" and node.target is bn_forms.batch_norm:
        return str(node.args[1].target)
    return node.name


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes its result into its (first) input's storage: ``nn.ReLU(inplace=True)``,
    ``nn.SiLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``relu_``, ``out += identity``."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return (node.op == "call_function" and node.target is operator.iadd) or activations.is_inplace_call(node)


def cat_dim(node: fx.Node) -> int | None:
    """The ``dim`` argument of a ``torch.cat`` node (default 0), or None if it is not a constant."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def _tensor_add(args: tuple, kwargs: dict) -> bool:
    """A plain a + b of two graph values (no alpha, no out=)."""
    return (len(args) == 2 and all(isinstance(a, fx.Node) for a in args)
            and not kwargs and args[0] is not args[1])
