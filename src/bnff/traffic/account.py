"""Off-chip traffic and FLOPs of one training step (forward + backward), layer by layer, per scheme.

The schemes and what each fused group does under them are the fusion plan's (``bnff.plan``:
``unfused``, ``bnff``, ``fused``); this module only prices them. A group's cost is the sum of its
schedule's steps: every feature map a step reads or writes costs its elements times
``element_bytes``, charged to the layer the plan names (``Ref.charge``); per-channel vectors are
not counted; a step's FLOPs are per-element counts (``Assumptions``) times the elements they run
over. A tensor read by the step just before, in the same phase, is not read again when it fits in
``onchip_bytes`` (the unfused BN's second sweep, seed 002 section 1.2.1).

Layers outside fused groups cost what they cost executed on their own: convolutions, linear layers
and pools their ifmap, ofmap, weights and dgrad/wgrad operands (``count_layer_io``), a BN,
activation or add the plan's ``eager_steps``, a concatenation its copy, any other layer one
pointwise pass; under ``bnff``, a convolution that rebuilds its input (``FusionPlan.rereads``) copies
the concatenations on its input's path once more in its backward (the groups' results it recomputes
are their ``reread`` steps). A tensor whose gradient arrives from g users is summed g-1 times in the backward
(autograd: read 2, write 1 each; the ``fused`` scheme's producer pre-process reads each extra one
once); a result applied inside its consumers is summed inside its group (the plan's ``grad_add``).

Per-layer records separate FP reads and writes, BP traffic of dgrad, wgrad and the pointwise parts
(BN, activation, add, concatenation, gradient accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from bnff.graph.consumers import fold_pays
from bnff.graph.kinds import Kind
from bnff.graph.layers import Layer, LayerGraph
from bnff.plan import FusionPlan, Schedule, eager_steps
from bnff.plan.schemes import SCHEMES
from bnff.traffic.assumptions import Assumptions

MEMORY_INTENSIVE = (Kind.BN, Kind.ACT, Kind.ADD)


@dataclass
class Cost:
    """Traffic (bytes) and FLOPs of one layer in one training step.

    Attributes:
        fp_read, fp_write: forward-pass bytes read from / written to off-chip memory.
        bp_dgrad: backward bytes of the data gradient (convolution, linear layer).
        bp_wgrad: backward bytes of the weight gradient.
        bp_pointwise: backward bytes of BN, activation, add, pool, concatenation and gradient
            accumulation work.
        flops_fp, flops_dgrad, flops_wgrad: floating-point operations (a multiply-accumulate is
            2). BN's S1/S2 sums count as wgrad (they give dgamma, dbeta), its dx as dgrad.
    """

    fp_read: int = 0
    fp_write: int = 0
    bp_dgrad: int = 0
    bp_wgrad: int = 0
    bp_pointwise: int = 0
    flops_fp: int = 0
    flops_dgrad: int = 0
    flops_wgrad: int = 0


class _Ledger:
    """Per-layer ``Cost``s being charged, in elements converted to bytes on entry."""

    def __init__(self, lg: LayerGraph, a: Assumptions) -> None:
        self.lg, self.a = lg, a
        self.costs: dict[str, Cost] = {layer.name: Cost() for layer in lg.layers}

    def charge(self, layer: Layer, field_: str, elements: int, nbytes: int | None = None) -> None:
        """Add ``elements`` to ``layer``'s ``field_``: traffic fields count elements of ``nbytes``
        bytes (default ``element_bytes``), FLOP fields count operations."""
        c = self.costs[layer.name]
        scale = 1 if field_.startswith("flops") else (nbytes if nbytes is not None else self.a.element_bytes)
        setattr(c, field_, getattr(c, field_) + elements * scale)

    def add(self, layer: Layer, nbytes: int | None = None, **elements: int) -> None:
        """``charge`` several fields at once: ``add(layer, fp_read=x, fp_write=y)``."""
        for field_, n in elements.items():
            self.charge(layer, field_, n, nbytes)


def gradient_users(lg: LayerGraph, node: fx.Node) -> int:
    """How many gradients arrive at ``node``'s output in the backward (layers or the model output
    using it), 0 if it needs none."""
    if not lg.requires_grad(node):
        return 0
    return sum(1 for u in node.users if u in lg.by_node or u.op == "output")


def _layer_io(led: _Ledger, layer: Layer) -> None:
    """The traffic of a layer executed on its own (every scheme, for layers outside fused groups)."""
    lg, a, add = led.lg, led.a, led.add
    out = layer.out_numel
    x = lg.numel(layer.inputs[0]) if layer.inputs else 0
    k = layer.kind
    if k in (Kind.CONV, Kind.LINEAR):
        w, wb, flops = layer.weight_numel, a.weight_element_bytes, 2 * layer.macs
        dgrad = a.input_requires_grad or lg.requires_grad(layer.inputs[0])
        if a.count_layer_io:
            add(layer, fp_read=x, fp_write=out, bp_wgrad=out + x)
            add(layer, wb, fp_read=w, bp_wgrad=w)
            if dgrad:
                add(layer, bp_dgrad=out + x)
                add(layer, wb, bp_dgrad=w)
        add(layer, flops_fp=flops, flops_wgrad=flops, flops_dgrad=flops if dgrad else 0)
    elif k in MEMORY_INTENSIVE:
        _charge(led, eager_steps(layer.node.name, k.value, tuple(i.name for i in layer.inputs), layer.act))
    elif k in (Kind.MAXPOOL, Kind.AVGPOOL):
        if a.count_layer_io:
            add(layer, fp_read=x, fp_write=out, bp_pointwise=out + x)
            if k == Kind.MAXPOOL:  # argmax indices, written in the forward, read in the backward
                add(layer, a.index_bytes, fp_write=out, bp_pointwise=out)
        add(layer, flops_fp=layer.window * out, flops_dgrad=layer.window * out)
    elif k == Kind.CAT:  # forward copies its parts; the backward hands out slices (views)
        add(layer, fp_read=sum(lg.numel(i) for i in layer.inputs), fp_write=out)
    elif layer.view or k == Kind.FLATTEN:
        pass
    else:  # any other layer: a pointwise pass (dropout keeps its mask)
        add(layer, fp_read=sum(lg.numel(i) for i in layer.inputs), fp_write=out, bp_pointwise=out + x,
            flops_fp=a.pointwise_flops * out, flops_dgrad=a.pointwise_flops * out)
        if layer.dropout:
            add(layer, a.mask_bytes, fp_write=out, bp_pointwise=out)


def _accumulate(led: _Ledger, layer: Layer, scheme: str) -> None:
    """Summing the gradients that arrive at ``layer``'s output from several users.

    Unfused and bnff (autograd) add them pairwise: read 2, write 1 per extra gradient. Fused: the
    producer's backward pre-process reads each extra gradient once.
    """
    extra = gradient_users(led.lg, layer.node) - 1
    if extra <= 0:
        return
    n = layer.out_numel
    led.charge(layer, "bp_pointwise", extra * n * (1 if scheme == "fused" else 3))
    led.charge(layer, "flops_dgrad", extra * n * led.a.pointwise_flops)


_FLOP_FIELD = {"bn_grad_stats": "flops_wgrad"}  # S1, S2 give dgamma, dbeta; the rest of a backward is dgrad


def _charge(led: _Ledger, sched: Schedule) -> None:
    """Add the bytes and FLOPs of ``sched``'s steps to the layers the plan charges them to."""
    for phase in (sched.forward, sched.backward):
        _charge_steps(led, phase)


def _charge_steps(led: _Ledger, steps: tuple) -> None:
    lg, a = led.lg, led.a
    previous: tuple = ()
    for step in steps:
        fp = step.phase == "fp"
        for ref in step.reads:
            if ref.vector:
                continue
            n = lg.numel(lg.node(ref.node))
            if ref in previous and n * a.element_bytes <= a.onchip_bytes:
                continue  # still on chip from the step before
            led.charge(lg.layer(ref.charge), "fp_read" if fp else "bp_pointwise", n)
        for ref in step.writes:
            if not ref.vector:
                led.charge(lg.layer(ref.charge), "fp_write" if fp else "bp_pointwise", lg.numel(lg.node(ref.node)))
        for f in step.flops:
            per = f.count if f.count is not None else getattr(a, f"{f.kind}_flops")
            led.charge(lg.layer(f.over.charge), "flops_fp" if fp else _FLOP_FIELD.get(f.kind, "flops_dgrad"),
                       per * lg.numel(lg.node(f.over.node)))
        previous = step.reads if step.kind not in ("consume", "consumer_backward", "reread") else ()


@dataclass(frozen=True)
class GroupCost:
    """One fused group's own share of a training step under one scheme (its schedule's steps).

    Attributes:
        fp_bytes, bp_bytes: feature-map bytes its forward / backward steps read and write off chip.
        kept_bytes: bytes its forward keeps for the backward (feature maps and (C,) vectors, each
            counted here even when another group keeps the same map too).
        flops: its steps' floating-point operations.
    """

    fp_bytes: int
    bp_bytes: int
    kept_bytes: int
    flops: int


def group_costs(lg: LayerGraph, plan: FusionPlan, scheme: str, a: Assumptions) -> dict[str, GroupCost]:
    """Group name -> ``GroupCost`` of every fused group of ``plan`` under ``scheme`` (what ``account``
    charges to the groups' layers, per group).

    Raises:
        ValueError: unknown scheme.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    out = {}
    for g in plan.groups:
        led = _Ledger(lg, a)
        sched = g.schedules[scheme]
        _charge(led, sched)
        cs = led.costs.values()
        kept = sum(lg.layer(r.node).out_shape[1] * a.vector_bytes if r.vector else lg.numel(lg.node(r.node)) * a.element_bytes
                   for r in sched.keeps)
        out[g.name] = GroupCost(fp_bytes=sum(c.fp_read + c.fp_write for c in cs),
                                bp_bytes=sum(c.bp_dgrad + c.bp_wgrad + c.bp_pointwise for c in cs),
                                kept_bytes=kept, flops=sum(c.flops_fp + c.flops_dgrad + c.flops_wgrad for c in cs))
    return out


def _folds(lg: LayerGraph, g) -> bool:
    """The group's gate goes into its 1x1 consumer's weights at this input's shapes (``fold_pays``)."""
    conv = lg.layer(g.consumers[0])
    return fold_pays(math.prod(conv.out_shape[2:]), conv.out_shape[1])


def account(lg: LayerGraph, plan: FusionPlan, scheme: str, a: Assumptions) -> dict[str, Cost]:
    """Per-layer traffic and FLOPs of one training step of ``lg`` under ``scheme``.

    Args:
        lg: the layer graph.
        plan: the fusion plan of ``lg.gm`` (``bnff.plan.plan_graph``).
        scheme: "unfused", "bnff" or "fused" (``bnff.plan.schemes``).
        a: the assumptions.
    Returns:
        Layer name -> ``Cost``, for every layer of ``lg`` (zero for layers a scheme removes, such as
        a concatenation only a fused BN reads).
    Raises:
        ValueError: unknown scheme.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    led = _Ledger(lg, a)
    groups = plan.groups if scheme != "unfused" else []
    members = {m for g in groups for m in g.members}
    # a squeeze-and-excitation's multiplication folded into its 1x1 convolution's weights forms no map
    members |= {g.squeeze[-1] for g in groups if g.gate_folded and _folds(lg, g)}
    summed_inside = {g.name for g in groups if g.per_consumer}  # its consumers' gradients: grad_add steps
    for layer in lg.layers:
        if layer.node.name not in members:
            _layer_io(led, layer)
        if layer.node.name not in summed_inside:
            _accumulate(led, layer, scheme)
    for g in groups:
        _charge(led, g.schedules[scheme])
    if scheme in ("bnff", "bnff_pw"):  # a rereading convolution's backward copies the concatenations on its input's path again
        for r in plan.rereads:
            led.charge(lg.layer(r.conv), "bp_pointwise", sum(2 * lg.numel(lg.node(c)) for c in r.cats))
    return led.costs


__all__ = ["Cost", "GroupCost", "SCHEMES", "MEMORY_INTENSIVE", "account", "group_costs", "gradient_users"]
