"""The layer-graph IR: a traced model with every tensor's shape, from meta tensors (no real compute).

``build(model, input_shape)`` copies the model onto the ``meta`` device (parameters become
shape-only tensors, nothing is allocated or computed), traces it in training mode with
``bnff.graph.trace`` (the same tracing ``bnff.restructure`` uses) and propagates shapes with
``torch.fx.passes.shape_prop.ShapeProp``. ResNet-50 at batch 256 builds in about a second.

Each tensor-producing call becomes a ``Layer`` with its kind (``bnff.graph.kinds``), its tensor
inputs, element counts, weight count and multiply-accumulates. Analyses (``bnff.traffic``) read
this IR and the fusion plan ``bnff.plan`` makes of ``LayerGraph.gm``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from bnff.graph.kinds import SPLITS, Kind, classify, is_inplace, module_name
from bnff.graph.trace import LeafSpec, trace



def _piece_of(node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` is a part of when it is ``parts[i]`` of a split (``x.split``, ``torch.chunk``,
    ...: views of ``x``), else None."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    parts = node.args[0]
    name = parts.target if parts.op == "call_method" else getattr(parts.target, "__name__", None)
    if parts.op not in ("call_method", "call_function") or name not in SPLITS or not parts.args:
        return None
    return parts.args[0] if isinstance(parts.args[0], fx.Node) else None


_VIEW_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous"}


@dataclass(frozen=True)
class Layer:
    """One tensor-producing node of the traced graph.

    Attributes:
        node: the fx node (of ``LayerGraph.gm``).
        name: the module's qualified name ("layer1.0.conv1"), or the fx node name for functions.
        kind: the layer kind.
        act: an activation's kind (``bnff.activations``: "relu", "silu", "leaky_relu(0.1)", ...), else None.
        inputs: the tensor-valued input nodes, in argument order.
        out_shape: output shape, e.g. (N, C, H, W).
        weight_numel: elements of the layer's parameters (conv/linear weight and bias, BN gamma/beta).
        macs: multiply-accumulates of the forward pass (convolutions and linear layers; else 0).
        window: elements each output element reads from the input (pools: kernel area), else 0.
        inplace: the result overwrites the first input's storage (``ReLU(inplace=True)``, ``+=``).
        view: the result is a view of the first input (flatten, reshape): no data moves.
        dropout: a dropout layer (its backward keeps a one-byte mask per element).
        resize: an interpolation (``nn.Upsample``, ``F.interpolate``; nearest, linear, cubic): its backward
            needs only the input's size, so it keeps nothing.
        global_pool: an adaptive average pool to 1x1, which PyTorch computes as a mean over H and W.
        block: the outermost enclosing module that is not a plain container ("layer1.0" for
            "layer1.0.downsample.0", "features.denseblock1", "Mixed_5b"), for per-block sums.
    """

    node: fx.Node
    name: str
    kind: Kind
    act: str | None
    inputs: tuple[fx.Node, ...]
    out_shape: tuple[int, ...]
    weight_numel: int = 0
    macs: int = 0
    window: int = 0
    inplace: bool = False
    view: bool = False
    dropout: bool = False
    resize: bool = False
    global_pool: bool = False
    block: str = ""

    @property
    def out_numel(self) -> int:
        """Elements of the output tensor."""
        return math.prod(self.out_shape)


@dataclass
class LayerGraph:
    """A model as layers with shapes.

    Attributes:
        gm: the traced graph module on the meta device (its nodes carry ``meta["tensor_meta"]``).
        layers: tensor-producing call nodes in graph order.
        by_node: node -> layer.
        input_shape: the model input's shape (N, C, H, W).
    """

    gm: fx.GraphModule
    layers: list[Layer]
    by_node: dict[fx.Node, Layer] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    def numel(self, node: fx.Node) -> int:
        """Elements of the tensor ``node`` produces (the input placeholder included)."""
        return math.prod(_tensor_meta(node).shape)

    def node(self, name: str) -> fx.Node:
        """The node of ``gm`` called ``name`` (the names a fusion plan uses).

        Raises:
            KeyError: no such node.
        """
        return self._nodes[name]

    def layer(self, name: str) -> Layer:
        """The layer of the node called ``name``.

        Raises:
            KeyError: no such node, or it produces no tensor.
        """
        return self.by_node[self._nodes[name]]

    def storage(self, node: fx.Node) -> fx.Node:
        """The node whose output storage ``node``'s result lives in (in-place ops and views share it)."""
        layer = self.by_node.get(node)
        while layer is not None and (layer.inplace or layer.view) and layer.inputs:
            node = layer.inputs[0]
            layer = self.by_node.get(node)
        return node

    def requires_grad(self, node: fx.Node) -> bool:
        """Whether a gradient flows to ``node`` (it depends on a parameter); the input does not."""
        return node in self._needs_grad

    def __post_init__(self) -> None:
        self.by_node = {layer.node: layer for layer in self.layers}
        self._nodes = {n.name: n for n in self.gm.graph.nodes}
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):  # pragma: no cover - fx node names are unique
            raise ValueError(f"layer names are not unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
        self._needs_grad: set[fx.Node] = set()
        for layer in self.layers:
            if layer.weight_numel or any(i in self._needs_grad for i in layer.inputs):
                self._needs_grad.add(layer.node)


def _tensor_meta(node: fx.Node) -> TensorMetadata:
    tm = node.meta.get("tensor_meta")
    if not isinstance(tm, TensorMetadata):
        raise ValueError(f"node '{node.name}' does not produce a single tensor")
    return tm


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (nothing is copied)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta = copy.deepcopy(model, memo)
    for m in meta.modules():
        # shapes must not depend on what a BN does with its buffers: momentum=None reads
        # num_batches_tracked as a number (1 / count), which a meta tensor does not have
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            m.momentum = 0.0
    return meta


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The outermost module enclosing ``node`` whose type is not exactly a plain container (the
    types fx recorded while tracing: the graph module's own containers are rebuilt as nn.Module)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())  # (path, type) outermost first
    if node.op == "call_module" and (not stack or stack[-1][0] != node.target):
        stack.append((node.target, type(modules[node.target])))
    for path, cls in stack:
        if cls not in _CONTAINERS:
            return path
    return stack[-1][0] if stack else node.name


def _macs(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return math.prod(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return math.prod(out_shape) * m.in_features
    return 0


def _window(node: fx.Node, m: nn.Module | None, in_numel: int, out_numel: int) -> int:
    k = getattr(m, "kernel_size", None) if m is not None else (node.args[1] if len(node.args) > 1 else
                                                                  node.kwargs.get("kernel_size"))
    if isinstance(k, int):
        return k * k
    if isinstance(k, (tuple, list)) and all(isinstance(v, int) for v in k):
        return math.prod(k)
    return max(1, in_numel // max(1, out_numel))  # adaptive pools: each input element is read once


def _run_error(meta: nn.Module, shape: tuple[int, ...]) -> Exception | None:
    """What the meta-device ``meta`` raises on an input of ``shape``, or None (nothing is computed)."""
    try:
        with torch.no_grad():
            meta(torch.empty(shape, device="meta"))
        return None
    except Exception as exc:  # the model's own complaint: a kernel larger than its input, one value per channel...
        return exc


def check_input_size(model: nn.Module, input_shape: tuple[int, ...], largest: int = 2048) -> None:
    """Raise a clear error, before any tracing, when ``model`` (in training mode) cannot take an input of
    ``input_shape`` (N, C, S, S) because S is too small for its downsampling, naming the smallest
    square size that works (found by bisection over S on meta tensors; nothing is computed).

    Raises:
        ValueError: the model rejects ``input_shape``; the message gives the model's reason and the
            smallest size that works, or says that no size up to ``largest`` does (a wrong channel
            count, say).
    """
    _check_meta_input(_meta_copy(model).train(), type(model).__name__, input_shape, largest)


def _check_meta_input(meta: nn.Module, name: str, input_shape: tuple[int, ...], largest: int = 2048) -> None:
    """``check_input_size`` on ``meta``, a training-mode meta copy of the model called ``name``."""
    shape = tuple(int(s) for s in input_shape)
    exc = _run_error(meta, shape)
    if exc is None:
        return
    why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    at = lambda s: shape[:2] + (s,) * (len(shape) - 2)  # noqa: E731
    lo, hi = shape[-1], 2 * shape[-1]
    while _run_error(meta, at(hi)) is not None:  # doubling up to a size that runs
        if hi >= largest:
            raise ValueError(f"{name} cannot run on input of shape {shape}: {why}")
        lo, hi = hi, min(2 * hi, largest)
    while hi - lo > 1:  # the smallest size that runs: a model's strides and kernels only ever need more
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _run_error(meta, at(mid)) is None else (mid, hi)
    raise ValueError(f"{name} cannot run on {shape[-1]}-pixel images ({why}); the smallest "
                     f"size that works is {hi}")


def build(model: nn.Module, input_shape: tuple[int, ...], leaf_modules: LeafSpec = ()) -> LayerGraph:
    """Trace ``model`` in training mode and give every layer its shapes, without computing anything.

    Args:
        model: any ``nn.Module`` taking one image batch (it is copied; the original is untouched).
        input_shape: the input batch shape, (N, C, H, W).
        leaf_modules: modules not to trace into (see ``bnff.graph.trace``).
    Returns:
        The ``LayerGraph``.
    Raises:
        TraceError: the model cannot be traced.
        ValueError: ``input_shape`` is not (N, C, *spatial) with 1 to 3 spatial dimensions, or the model
            rejects it (the message is the model's).
    """
    if not 3 <= len(input_shape) <= 5 or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be a positive (N, C, H, W) (or (N, C, L), (N, C, D, H, W)), "
                         f"got {tuple(input_shape)}")
    meta = _meta_copy(model).train()
    if len(input_shape) == 4 and input_shape[-1] == input_shape[-2]:
        _check_meta_input(meta, type(model).__name__, input_shape)
    gm = trace(meta, leaf_modules).gm
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback it then raises
            ShapeProp(gm).propagate(torch.empty(tuple(int(s) for s in input_shape), device="meta"))
    except Exception as exc:  # the model's own error (wrong channel count, too small an image...)
        root = exc.__cause__ or exc  # ShapeProp wraps it in a dump of the failing node
        raise ValueError(f"{type(model).__name__} cannot run on input of shape {tuple(input_shape)}: "
                         f"{type(root).__name__}: {str(root).splitlines()[0]}") from exc
    modules = dict(gm.named_modules())
    layers: list[Layer] = []
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            continue  # tuples, sizes, namedtuple outputs
        info = classify(node, modules)
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        inputs = [i for i in inputs if isinstance(i.meta.get("tensor_meta"), TensorMetadata)]
        piece = _piece_of(node)
        if piece is not None:  # one part of x.split(...) / x.chunk(...): a view of x
            inputs = [piece]
        m = modules.get(node.target) if node.op == "call_module" else info.module
        out_shape = tuple(_tensor_meta(node).shape)
        in_numel = math.prod(_tensor_meta(inputs[0]).shape) if inputs else 0
        name = module_name(node)
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:  # a module called several times (ResNet's shared ReLU): "layer1.0.relu:2"
            name = f"{name}:{calls[name]}"
        view = info.kind == Kind.FLATTEN or (node.op == "call_method" and node.target in _VIEW_METHODS) or piece is not None
        dropout = isinstance(m, nn.Dropout) or node.target is nn.functional.dropout
        resize = isinstance(m, nn.Upsample) or node.target is nn.functional.interpolate
        adaptive = isinstance(m, nn.AdaptiveAvgPool2d) or node.target is nn.functional.adaptive_avg_pool2d
        layers.append(Layer(
            node=node, name=name, kind=info.kind, act=info.act, inputs=tuple(inputs), out_shape=out_shape,
            weight_numel=sum(p.numel() for p in m.parameters(recurse=False)) if m is not None else 0,
            macs=_macs(m, out_shape) if m is not None else 0,
            window=_window(node, m, in_numel, math.prod(out_shape)) if info.kind in (Kind.MAXPOOL, Kind.AVGPOOL) else 0,
            inplace=is_inplace(node, modules), view=view, dropout=dropout, resize=resize,
            global_pool=adaptive and tuple(out_shape[-2:]) == (1, 1), block=_block(node, modules)))
    return LayerGraph(gm, layers, input_shape=tuple(int(s) for s in input_shape))


__all__ = ["Layer", "LayerGraph", "build", "check_input_size"]
