"""torch.fx tracing with bnff's rules for leaf modules and clear errors.

``nn.Identity`` calls are removed from the graph (they return their input). BN written other ways (a
``BatchNorm2d`` subclass that applies its activation in its own forward, as timm's ``BatchNormAct2d``;
functional ``batch_norm`` on a BN module's tensors) becomes ``bn_forms.batch_norm`` calls where it can
(``bnff.graph.bn_forms``); a subclass it cannot map stays an opaque leaf, with the reason. A split into a
number of parts its arguments fix (``list(x.chunk(2, 1))``, as Ultralytics' ``C2f`` writes it) can be
iterated while tracing (``_Parts``). A submodule whose
``forward`` fx cannot trace (data-dependent control flow, unsupported Python)
is kept as an opaque leaf and tracing is retried, so the rest of the model can still be
restructured; the modules kept this way are reported. A model whose *own* ``forward`` cannot be
traced raises ``TraceError`` naming the module, the source line and the ``leaf_modules=`` way out.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from bnff.graph import bn_forms


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the construct and the way out."""


LeafSpec = Iterable[str | type | nn.Module]


def _part_count(node: fx.Node) -> int | None:
    """How many tensors ``node`` returns when it splits a tensor into a number of parts fixed by its
    arguments alone: ``chunk(x, n)`` (n), ``split(x, [sizes])`` and ``split_with_sizes`` (the number of
    sizes), ``tensor_split(x, n)`` (n) or ``tensor_split(x, [indices])`` (indices + 1); None otherwise
    (``split(x, size)`` and ``unbind`` depend on the shape, unknown while tracing)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split", "split_with_sizes",
                                                                        "tensor_split"):
        return None
    if node.op == "call_function" and getattr(torch, name, None) is not node.target:
        return None
    key = {"chunk": "chunks", "split": "split_size_or_sections", "split_with_sizes": "split_sizes",
           "tensor_split": "indices_or_sections"}[name]
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(key, node.kwargs.get("split_size"))
    if isinstance(arg, int) and name in ("chunk", "tensor_split"):
        return arg
    if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        return len(arg) + (name == "tensor_split")
    return None


class _Parts(fx.Proxy):
    """The proxy of a split into a known number of parts (``_part_count``): it can be iterated and
    measured (``list(x.chunk(2, 1))``, ``a, b = x.split([c, c], 1)`` in any form), one ``getitem``
    node per part, as Python would index the real tuple. A tensor with fewer parts than that at run
    time (``chunk`` of a dimension smaller than n) fails there with Python's IndexError."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, count: int) -> None:
        super().__init__(node, tracer)
        self.count = count

    def __iter__(self):
        return iter([self[i] for i in range(self.count)])

    def __len__(self) -> int:
        return self.count


class _Tracer(fx.Tracer):
    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...], leaf_ids: set[int]) -> None:
        super().__init__()
        self.leaf_names, self.leaf_types, self.leaf_ids = leaf_names, leaf_types, leaf_ids
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaf_names or id(m) in self.leaf_ids
                or (bool(self.leaf_types) and isinstance(m, self.leaf_types))
                or bn_forms.is_subclass_with_forward(m)  # expanded after tracing (bn_forms)
                or bn_forms.is_frozen_bn(m)  # one node, listed unfused with its reason
                or super().is_leaf_module(m, module_qualified_name))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        count = _part_count(node)
        return _Parts(node, self, count) if count is not None else super().proxy(node)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        self.stack.pop()
        return out


@dataclass
class Traced:
    """Result of ``trace``: the graph module and the submodules kept opaque.

    Attributes:
        gm: the traced ``fx.GraphModule``; its submodules are the model's own objects.
        leaves: qualified names of modules kept as leaves (user-given or untraceable).
        untraceable: for each module made a leaf automatically, the reason fx gave.
    """

    gm: fx.GraphModule
    leaves: list[str] = field(default_factory=list)
    untraceable: dict[str, str] = field(default_factory=dict)


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost traceback frame outside torch, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""


def trace(model: nn.Module, leaf_modules: LeafSpec = ()) -> Traced:
    """Trace ``model`` with torch.fx, keeping ``leaf_modules`` and untraceable submodules opaque.

    Args:
        model: any ``nn.Module``.
        leaf_modules: qualified names ("layer1.0"), module classes, or module instances not to
            trace into; they appear in the graph as single ``call_module`` nodes.
    Returns:
        ``Traced`` with the graph module and the list of leaves.
    Raises:
        TraceError: the model's own ``forward`` cannot be traced; the message names the construct.
    """
    names: set[str] = set()
    types: list[type] = []
    ids: set[int] = set()
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.add(leaf)
        elif isinstance(leaf, type):
            types.append(leaf)
        elif isinstance(leaf, nn.Module):
            ids.add(id(leaf))
        else:
            raise TypeError(f"leaf_modules entries must be names, classes or modules, got {leaf!r}")
    known = dict(model.named_modules())
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise ValueError(f"leaf_modules names {missing} are not submodules of {type(model).__name__}")
    untraceable: dict[str, str] = {}
    with _buffers_kept(model):
        return _trace(model, names, types, ids, known, untraceable)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Tracing runs Python on real buffers where a forward changes them in place without a proxy
    (``self.num_batches_tracked.add_(1)`` in a BN subclass's forward: fx executes it, unrecorded);
    tracing must not change the model, so every buffer is put back afterwards."""
    saved = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]  # meta: no values
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _trace(model: nn.Module, names: set[str], types: list[type], ids: set[int], known: dict[str, nn.Module],
           untraceable: dict[str, str]) -> Traced:
    for _ in range(len(known) + 1):
        tracer = _Tracer(names, tuple(types), ids)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
            where = tracer.failed_in
            if where:  # an untraceable submodule: keep it opaque and try again
                untraceable[where] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                names.add(where)
                continue
            raise TraceError(
                f"torch.fx cannot trace the forward of {type(model).__name__}{_user_frame(exc)}: "
                f"{type(exc).__name__}: {exc}\nMove that construct into a submodule and pass its name as "
                f"bnff.restructure(model, leaf_modules=['name']) to keep it opaque (unfused), or make "
                f"the forward traceable (no Python control flow on tensor values).") from exc
        _drop_identities(graph, known)
        untraceable.update(bn_forms.expand_subclasses(graph, known))
        bn_forms.functional_calls(graph, known)
        gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
        standard = fx.Tracer()
        leaves = sorted({n.target for n in graph.nodes if n.op == "call_module"
                         and not standard.is_leaf_module(known[n.target], n.target) and not bn_forms.is_frozen_bn(known[n.target])})
        return Traced(gm, leaves, untraceable)
    raise TraceError(f"could not trace {type(model).__name__}: every retry failed")  # pragma: no cover


def _drop_identities(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Remove ``nn.Identity`` calls (placeholders such as a small-input model's missing max-pool):
    they return their input object, so their users can take the input directly."""
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity) and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def modules_of(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Qualified name -> module for every submodule of ``gm``."""
    return dict(gm.named_modules())


__all__ = ["TraceError", "Traced", "trace", "modules_of"]
