"""Footprint: the bytes a training step keeps from its forward pass for its backward pass, per layer.

Two policies (``Assumptions.footprint``):

``autograd`` (PyTorch's rule; what ``bnff.memory.saved_activation_bytes`` measures)
    Each layer keeps what its backward reads, each storage once; an in-place layer or a view
    shares its input's storage. Executed on its own (``unfused``, and layers outside fused
    groups): a convolution or linear layer keeps its input; BN its input and four per-channel
    vectors (running mean and variance, saved mean and inverse std); an activation what the
    activation table says eager autograd keeps (``bnff.activations``: ReLU, Sigmoid and Tanh their
    output, the others their input; in place, ReLU, LeakyReLU and the ELU family their output, the
    others a copy of their input, which their output overwrites); a max-pool its input and its
    argmax indices; an average pool its input (a global one, computed as a mean, nothing; so does a
    mean over dimensions); dropout its mask; a product of two tensors each factor whose partner needs
    a gradient (stochastic depth keeps only its mask); an add, a concatenation, a view (a part of a
    split is one) or an interpolation (``nn.Upsample``: its backward needs only sizes) nothing; any other
    layer its inputs. A fused group (``bnff``, ``fused``) keeps its BN inputs (each feature map once,
    never their concatenation) and two per-channel vectors per BN, its shortcuts when its
    consumers recompute the result in the backward or its activation's derivative reads the
    pre-activation, and its result when that is materialized with an activation whose derivative
    reads its output, and a shortcut (the mask; seed 002 Table 2 patterns (4)). Its consumers keep
    nothing: their input is recomputed, and so is a squeeze-and-excitation in front of one (its
    pool, gate layers and multiplication keep nothing); nor do the convolutions that rebuild their
    input from its result (``GroupPlan.rereaders``).
``all_outputs`` (seed 002 Table 2)
    Every ofmap a layer writes in the forward stays in off-chip memory until the backward:
    unfused, every layer's output; fused, every output of a layer outside the groups and each
    materialized group result (the result applied inside its consumers is never written).

Bytes are charged to the layer that produced the storage (the first layer keeping it, for the
network input). A fused group keeps what its plan's schedule keeps (``bnff.plan``); this module
only prices it.
"""

from __future__ import annotations

import torch.fx as fx

from bnff import activations
from bnff.graph.kinds import Kind, is_mean, is_mul
from bnff.graph.layers import Layer, LayerGraph
from bnff.plan import FusionPlan
from bnff.traffic.assumptions import Assumptions


class _Kept:
    def __init__(self, lg: LayerGraph, a: Assumptions) -> None:
        self.lg, self.a = lg, a
        self.items: dict[object, tuple[str, int]] = {}  # key -> (layer charged, bytes)

    def tensor(self, node: fx.Node, saver: Layer) -> None:
        root = self.lg.storage(node)
        if root not in self.items:
            owner = self.lg.by_node.get(root)
            self.items[root] = ((owner or saver).name, self.lg.numel(root) * self.a.element_bytes)

    def extra(self, saver: Layer, tag: str, nbytes: int) -> None:
        self.items[(saver.name, tag)] = (saver.name, nbytes)

    def per_layer(self) -> dict[str, int]:
        out = {layer.name: 0 for layer in self.lg.layers}
        for name, nbytes in self.items.values():
            out[name] = out.get(name, 0) + nbytes
        return out


def _eager(kept: _Kept, layer: Layer) -> None:
    """What ``layer`` executed on its own keeps for its backward (module docstring)."""
    a = kept.a
    k, ins = layer.kind, layer.inputs
    if k in (Kind.CONV, Kind.LINEAR) or (k == Kind.AVGPOOL and not layer.global_pool):
        kept.tensor(ins[0], layer)
    elif k == Kind.BN:
        kept.tensor(ins[0], layer)
        kept.extra(layer, "vectors", 4 * layer.out_shape[1] * a.vector_bytes)
    elif k == Kind.ACT:  # what eager autograd keeps, from the activation table
        entry = activations.spec(layer.act).entry
        saves = entry.inplace_saves if layer.inplace else entry.eager_saves
        if saves == "copy":  # e.g. in-place hardtanh_ or silu_ clone their input before overwriting it
            kept.extra(layer, "input copy", layer.out_numel * a.element_bytes)
        elif saves is not None:
            kept.tensor(layer.node if saves == "result" else ins[0], layer)
    elif k == Kind.MAXPOOL:
        kept.tensor(ins[0], layer)
        kept.extra(layer, "indices", layer.out_numel * a.index_bytes)
    elif layer.dropout:
        kept.extra(layer, "mask", layer.out_numel * a.mask_bytes)
    elif k in (Kind.ADD, Kind.CAT, Kind.FLATTEN, Kind.AVGPOOL) or layer.view or layer.resize or is_mean(layer.node):
        pass
    elif is_mul(layer.node) and len(ins) == 2:  # each factor is kept for the other's gradient
        for i, other in ((ins[0], ins[1]), (ins[1], ins[0])):
            if kept.lg.requires_grad(other):
                kept.tensor(i, layer)
    else:
        for i in ins:
            kept.tensor(i, layer)


def footprint(lg: LayerGraph, plan: FusionPlan, scheme: str, a: Assumptions) -> dict[str, int]:
    """Bytes kept from the forward for the backward, per layer name (module docstring).

    Args:
        lg: the layer graph.
        plan: the fusion plan of ``lg.gm`` (``bnff.plan.plan_graph``); ignored for ``unfused``.
        scheme: "unfused", "bnff" or "fused".
        a: the assumptions; ``a.footprint`` picks the policy.
    Returns:
        Layer name -> bytes.
    """
    kept = _Kept(lg, a)
    groups = plan.groups if scheme != "unfused" else []
    members = {lg.node(m) for g in groups for m in g.members}
    # consumers whose input a group recomputes, the squeeze-and-excitation it recomputes inside one, and
    # the convolutions that rebuild their input from groups' results
    fed = {lg.node(c) for g in groups for c in g.consumers + g.squeeze + g.rereaders}
    if a.footprint == "all_outputs":
        materialized = {lg.node(g.name) for g in groups if not g.per_consumer}
        for layer in lg.layers:
            if not layer.view and (layer.node not in members or layer.node in materialized):
                kept.items[layer.node] = (layer.name, layer.out_numel * a.element_bytes)
        return kept.per_layer()
    for layer in lg.layers:
        if layer.node not in members and layer.node not in fed:
            _eager(kept, layer)
    for g in groups:
        for ref in g.schedules[scheme].keeps:
            saver = lg.layer(ref.charge)
            if ref.vector:
                kept.extra(saver, f"{ref.role} {ref.node}", lg.layer(ref.node).out_shape[1] * a.vector_bytes)
            else:
                kept.tensor(lg.node(ref.node), saver)
    return kept.per_layer()


__all__ = ["footprint"]
