"""BN written other ways, turned into bnff's one BN form in a traced graph.

bnff fuses a BN given as a ``BatchNorm2d`` (or ``SyncBatchNorm``) module with its standard forward.
Networks also write BN as:

* a ``BatchNorm2d`` subclass whose own forward applies BN and then its activation (timm's
  ``BatchNormAct2d``: ``F.batch_norm``, then ``self.drop``, then ``self.act``; ``SyncBatchNormAct``:
  ``SyncBatchNorm.forward``, then the same). The tracer keeps such a module opaque (``trace``), and
  ``expand_subclasses`` replaces its call by ``batch_norm(x, module)`` (BN alone, with the module's
  own parameters and buffers) followed by calls of its child modules, once a probe has shown that
  this is what its forward computes;
* a functional ``F.batch_norm`` / ``torch.batch_norm`` call on the parameters and buffers of one BN
  module (what fx records when it traces into such a forward), which ``functional_calls`` turns into
  ``batch_norm(x, module)`` when its arguments are exactly the module's (eps, momentum, mode) and the
  graph counts ``num_batches_tracked`` as the module would.

Anything else is left as it is, with the reason in ``node.meta["bnff_why"]`` for the fusion report.
``batch_norm`` is also what runs where the BN is not fused, so the rewritten graph computes what the
original did.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnff import activations
from bnff.modules import SyncBatchNorm

WHY = "bnff_why"  # node.meta key: why a BN written another way was left as it is


def _synchronized(bn: nn.Module) -> bool:
    return isinstance(bn, nn.SyncBatchNorm) or getattr(type(bn), "synchronized", False)


def batch_norm(x: Tensor, bn: _BatchNorm) -> Tensor:
    """BN of ``x`` (N, C, ...) with module ``bn``'s parameters, buffers, eps, momentum and mode, as
    its base class computes it (``_BatchNorm.forward``; synchronized over its process group for a
    ``nn.SyncBatchNorm`` subclass, as ``bnff.modules.SyncBatchNorm``), without what a subclass's own
    forward adds (its activation). Same shape and dtype as ``x``.

    Raises:
        ValueError: as the base class's forward (wrong input dimensions, one value per channel).
    """
    from bnff.ops import bn_math

    if _synchronized(bn) and bn_math.sync_group(bn) is not None:
        return SyncBatchNorm.forward(bn, x)
    return _BatchNorm.forward(bn, x)


_STANDARD_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, SyncBatchNorm.forward)


def is_subclass_with_forward(m: nn.Module) -> bool:
    """Whether ``m`` is a BN module whose class has its own forward (timm's ``BatchNormAct2d``)."""
    return isinstance(m, _BatchNorm) and type(m).forward not in _STANDARD_FORWARDS


def _probe_input(bn: _BatchNorm, gen: torch.Generator) -> Tensor:
    spatial = {nn.BatchNorm1d: (5,), nn.BatchNorm3d: (3, 3, 3)}
    shape = next((s for cls, s in spatial.items() if isinstance(bn, cls)), (3, 3))
    p = next((t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()), None)
    device = p.device if p is not None else None
    dtype = p.dtype if p is not None else torch.float32
    return torch.randn((4, bn.num_features, *shape), generator=gen).to(device=device, dtype=dtype)


def _probe_copy(bn: _BatchNorm, gen: torch.Generator) -> _BatchNorm:
    """``bn`` itself, or, when its tensors are on the meta device (``bnff.traffic`` analyses a meta copy),
    a CPU copy with random parameters and statistics to probe."""
    if not any(t.is_meta for t in (*bn.parameters(), *bn.buffers())):
        return bn
    probe = copy.deepcopy(bn).to_empty(device="cpu")
    with torch.no_grad():
        for name, t in (*probe.named_parameters(), *probe.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var") else
                        torch.randn(t.shape, generator=gen))
            else:
                t.zero_()
    return probe


def subclass_parts(bn: _BatchNorm) -> tuple[list[str] | None, str]:
    """The child modules a BN subclass's forward applies after BN, in order, or None, with the reason.

    Accepted: children that are ``nn.Identity`` (dropped) or activations of ``bnff.activations``
    (timm's ``drop`` and ``act``), and a forward that computes, in training and in eval mode, on a
    copy and a random input, exactly ``batch_norm`` followed by those children, with the same running
    statistics and ``num_batches_tracked`` afterwards.
    """
    children = list(bn.named_children())
    for name, c in children:
        if not isinstance(c, nn.Identity) and activations.module_kind(c) is None:
            return None, (f"{type(bn).__name__} applies its child '{name}' ({type(c).__name__}) after BN, "
                          f"which is neither an identity nor an activation bnff fuses")
    gen = torch.Generator().manual_seed(0)
    bn = _probe_copy(bn, gen)
    x = _probe_input(bn, gen)
    for mode in (True, False):
        a, b = copy.deepcopy(bn).train(mode), copy.deepcopy(bn).train(mode)
        try:
            with torch.no_grad():
                got = a(x.clone())
                want = batch_norm(x.clone(), b)
                for _, c in b.named_children():
                    want = c(want)
        except Exception as exc:  # the module's forward does not take the probe
            return None, f"{type(bn).__name__}'s forward failed on a probe input: {type(exc).__name__}: {exc}"
        same = torch.equal(got, want) and all(
            (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
            for u, v in zip(a.buffers(), b.buffers()))
        if not same:
            return None, (f"{type(bn).__name__}'s forward is not BN followed by its children "
                          f"({', '.join(n for n, _ in children) or 'none'}) in {'training' if mode else 'eval'} mode")
    return [name for name, c in children if not isinstance(c, nn.Identity)], ""


def expand_subclasses(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Replace each call of a BN subclass with its own forward (kept opaque by the tracer) by
    ``batch_norm(x, module)`` and calls of the child modules ``subclass_parts`` found; returns
    {module name: reason} for those left opaque."""
    left: dict[str, str] = {}
    for node in list(graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if m is None or not is_subclass_with_forward(m) or len(node.args) != 1 or node.kwargs:
            continue
        parts, why = subclass_parts(m)
        if parts is None:
            node.meta[WHY] = why
            left[str(node.target)] = why
            continue
        with graph.inserting_before(node):
            bn = graph.get_attr(str(node.target))
            out = graph.call_function(batch_norm, (node.args[0], bn))
            for child in parts:
                out = graph.call_module(f"{node.target}.{child}", (out,))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return left


# F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) and
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
# argument name -> position
_SIGNATURES = {
    F.batch_norm: {"input": 0, "running_mean": 1, "running_var": 2, "weight": 3, "bias": 4, "training": 5,
                   "momentum": 6, "eps": 7},
    torch.batch_norm: {"input": 0, "weight": 1, "bias": 2, "running_mean": 3, "running_var": 4, "training": 5,
                       "momentum": 6, "eps": 7},
}
_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
             "momentum": 0.1, "eps": 1e-5}


def _bound(node: fx.Node) -> dict:
    sig = _SIGNATURES[node.target]
    out = dict(_DEFAULTS)
    for name, i in sig.items():
        if i < len(node.args):
            out[name] = node.args[i]
        elif name in node.kwargs:
            out[name] = node.kwargs[name]
    return out


def _owner(value, attr: str, modules: dict[str, nn.Module]) -> str | None:
    """The module whose ``attr`` a get_attr node ``value`` reads ("bn1.running_mean" -> "bn1"), or None."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    owner, _, leaf = str(value.target).rpartition(".")
    return owner if leaf == attr and owner in modules else None


def functional_calls(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Turn ``F.batch_norm`` / ``torch.batch_norm`` calls whose arguments are exactly one BN module's
    (its weight, bias, running statistics, eps and momentum, its mode) into ``batch_norm(x, module)``,
    which counts ``num_batches_tracked`` as the module does; the others get their reason in
    ``node.meta[WHY]``. fx runs a forward's in-place add to a buffer (``num_batches_tracked.add_(1)``)
    at trace time without recording it, so the traced graph of such a forward never counts; an add it
    did record (one, unused, where the module counts) is dropped, ``batch_norm`` counting instead."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SIGNATURES:
            continue
        a = _bound(node)
        owners = {_owner(a[k], k, modules) for k in ("running_mean", "running_var", "weight", "bias") if a[k] is not None}
        name = next(iter(owners)) if len(owners) == 1 and None not in owners else None
        bn = modules.get(name) if name else None
        if not isinstance(bn, _BatchNorm):
            node.meta[WHY] = "functional batch_norm whose tensors are not one BatchNorm module's"
            continue
        mine = {k: getattr(bn, k) for k in ("running_mean", "running_var", "weight", "bias")}
        batch_stats = bn.training or not bn.track_running_stats
        counts = [u for u in graph.nodes if u.op == "call_method" and u.target == "add_" and u.args[1:] == (1,)
                  and _owner(u.args[0], "num_batches_tracked", modules) == name]
        counted = bn.training and bn.track_running_stats
        why = None
        if any((a[k] is None) != (mine[k] is None) for k in mine):
            why = "functional batch_norm that leaves out some of its module's tensors"
        elif a["training"] is not batch_stats or a["eps"] != bn.eps:
            why = "functional batch_norm with another mode or eps than its module's"
        elif bn.momentum is None or (counted and a["momentum"] != bn.momentum):
            why = "functional batch_norm with another momentum than its module's (or a cumulative average)"
        elif len(counts) > (1 if counted else 0) or any(c.users for c in counts):
            why = "functional batch_norm whose graph counts num_batches_tracked otherwise than its module"
        if why:
            node.meta[WHY] = why
            continue
        with graph.inserting_before(node):
            new = graph.call_function(batch_norm, (a["input"], graph.get_attr(name)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for c in counts:  # batch_norm counts it itself
            graph.erase_node(c)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op not in ("get_attr",))


def is_frozen_bn(m: nn.Module) -> bool:
    """Whether ``m`` is a frozen BN (torchvision's and timm's ``FrozenBatchNorm2d``): not a ``_BatchNorm``,
    with its weight, bias and running statistics as buffers and no parameters: a fixed per-channel affine
    map, no statistics to fuse."""
    names = {n for n, _ in m.named_buffers(recurse=False)}
    return (not isinstance(m, _BatchNorm) and {"weight", "bias", "running_mean", "running_var"} <= names
            and next(m.parameters(recurse=False), None) is None)


def bn_module(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """(name, module) of the BN a ``batch_norm(x, module)`` node computes, or None for other nodes."""
    if node.op == "call_function" and node.target is batch_norm and isinstance(node.args[1], fx.Node):
        name = str(node.args[1].target)
        return name, modules[name]
    return None


__all__ = ["WHY", "batch_norm", "bn_module", "expand_subclasses", "functional_calls", "is_frozen_bn", "is_subclass_with_forward",
           "subclass_parts"]
