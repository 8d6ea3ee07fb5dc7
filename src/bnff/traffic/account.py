"""Off-chip traffic and FLOPs of one training step (forward + backward), layer by layer, per scheme.

Three schemes over the same layer graph (``bnff.graph.layers``) and the same pattern groups
(``bnff.restructure.match``, the groups ``bnff.restructure`` builds):

``unfused``
    Every layer reads its inputs from and writes its output to off-chip memory (seed 002 section
    1.2): BN reads its input twice and writes once (forward 3 units, backward 5: dy and x twice,
    dx once), ReLU 2 / 3, Add 3 in the forward; a tensor whose gradient arrives from g users is
    summed g-1 times in the backward (read 2, write 1 each; seed 002's "error Add", 3 units).
``fused``
    Seed 002 section 2.3: convolutions apply the pre-processing (BN apply, add, ReLU) to their
    ifmap as they read it and the post-processing (BN statistics, the activation mask, S1 and
    S2) to their ofmap / oerr as they write it, on chip. What remains off-chip is what section
    2.3 lists: a consumer reading the BN inputs and shortcuts instead of its ifmap (all but one
    of them are extra), a materialized result (a block output with two users) written once and
    kept for the consumer's wgrad, the backward post-process reading x for S2 and the other
    users' gradients, and each producer's pre-process reading x once to form dx (eq. 12).
``bnff``
    The same fission and fusion executed as bnff executes it on a CPU: convolutions are library
    calls that take no pre- or post-processing, so every memory-bound step is a sweep of its own
    at memory bandwidth (the sweeps of ``bnff.ops``):
    forward, one statistics sweep per feature map (MVF; ICF: once per map however many BNs
    normalize it) and one apply sweep writing the result the consumers read;
    backward, after the consumers' dgrads, one sweep recomputing the result for the consumers'
    wgrads while reducing S1 and S2 (writing dy when a shortcut needs it or several gradients
    meet), then one sweep forming dx per BN.

Per-layer records separate FP reads and writes, BP traffic of dgrad, wgrad and the pointwise
parts (BN, activation, add, concatenation, gradient accumulation). A fused group's traffic is
charged to its members: reads of a BN's input and its statistics and dx work to that BN, shortcut
reads to the add, the result's writes, gradients and mask to the group's last layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bnff.graph.kinds import Kind
from bnff.graph.layers import Layer, LayerGraph
from bnff.restructure.match import Group
from bnff.traffic.assumptions import Assumptions

SCHEMES = ("unfused", "bnff", "fused")
MEMORY_INTENSIVE = (Kind.BN, Kind.ACT, Kind.ADD)
_HOSTS = (Kind.CONV, Kind.MAXPOOL, Kind.AVGPOOL, Kind.LINEAR)


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
    elif k == Kind.BN:  # seed 002 1.2.1: a second sweep unless the mini-batch stays on chip
        passes = 1 if x * a.element_bytes <= a.onchip_bytes else 2
        add(layer, fp_read=passes * x, fp_write=x, bp_pointwise=passes * 2 * x + x,
            flops_fp=(a.bn_stats_flops + a.bn_apply_flops) * x, flops_wgrad=a.bn_grad_stats_flops * x,
            flops_dgrad=a.bn_dx_flops * x)
    elif k == Kind.ACT:
        add(layer, fp_read=x, fp_write=out, bp_pointwise=3 * x, flops_fp=a.pointwise_flops * x,
            flops_dgrad=a.pointwise_flops * x)
    elif k == Kind.ADD:  # its backward hands dz to both addends unchanged; the sum is at the fork
        add(layer, fp_read=2 * out, fp_write=out, flops_fp=a.pointwise_flops * out)
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


@dataclass
class _G:
    """One group's sizes (elements) and the layers its costs are charged to."""

    terms: list[tuple[Layer, list[fx.Node], int]]  # (BN layer, source maps, elements of their concat)
    residuals: list[tuple[Layer, int]]  # (layer charged, elements)
    out: Layer  # the group's last layer
    a: int  # elements of the result
    consumers: int  # per-consumer application: number of consumers; 0 when materialized
    users: int  # gradients arriving at a materialized result
    host: bool  # a materialized result's user can take the pre-processing (fused scheme)
    act: bool

    @property
    def x(self) -> int:
        return sum(n for _, _, n in self.terms)

    @property
    def r(self) -> int:
        return sum(n for _, n in self.residuals)

    def inputs(self) -> list[tuple[Layer, int]]:
        """(layer charged, elements) for every tensor the result is computed from, BN inputs first."""
        return [(bn, n) for bn, _, n in self.terms] + self.residuals


def _group_sizes(lg: LayerGraph, g: Group) -> _G:
    terms = [(lg.by_node[t.bn], t.sources, sum(lg.numel(s) for s in t.sources)) for t in g.terms]
    out = lg.by_node[g.output]
    res_layer = lg.by_node[g.add] if g.add is not None else out
    users = [u for u in g.output.users if u in lg.by_node or u.op == "output"]
    return _G(terms=terms, residuals=[(res_layer, lg.numel(r)) for r in g.residuals], out=out,
              a=out.out_numel, consumers=len(g.consumers), users=len(users),
              host=any(lg.by_node[u].kind in _HOSTS for u in users if u in lg.by_node),
              act=g.act is not None)


def _apply_flops(led: _Ledger, g: _G, field_: str, times: int) -> None:
    a = led.a
    for bn, _, n in g.terms:
        led.charge(bn, field_, times * a.bn_apply_flops * n)
    for layer, n in g.residuals:
        led.charge(layer, field_, times * a.pointwise_flops * n)
    if g.act:
        led.charge(g.out, field_, times * a.pointwise_flops * g.a)


def _read_inputs(led: _Ledger, g: _G, field_: str, skip_first: bool) -> None:
    for i, (layer, n) in enumerate(g.inputs()):
        if not (skip_first and i == 0):
            led.charge(layer, field_, n)


@dataclass
class _Seen:
    """Feature maps already swept across groups (ICF: a map shared by several BNs is swept once)."""

    stats: set[fx.Node]
    dx: set[fx.Node]


def _stats_once(led: _Ledger, g: _G, seen: _Seen, read: bool) -> None:
    """Forward statistics (MVF) of each feature map not yet swept: FLOPs, and the read if ``read``."""
    for bn, srcs, _ in g.terms:
        for s in srcs:
            if s not in seen.stats:
                seen.stats.add(s)
                n = led.lg.numel(s)
                led.charge(bn, "flops_fp", led.a.bn_stats_flops * n)
                if read:
                    led.charge(bn, "fp_read", n)


def _group_fused(led: _Ledger, g: _G, seen: _Seen) -> None:
    """Seed 002 section 2.3 (module docstring); pattern (3): 0 forward, 1 backward."""
    a, ch = led.a, led.charge
    per_consumer = g.consumers > 0
    # forward: the consumer reads the inputs instead of its ifmap; a materialized result is written
    for _ in range(g.consumers if per_consumer else 1):
        _read_inputs(led, g, "fp_read", skip_first=per_consumer or g.host)
    if not per_consumer:
        ch(g.out, "fp_write", g.a)
    _stats_once(led, g, seen, read=False)  # a post-process of the producers, on chip
    _apply_flops(led, g, "flops_fp", max(1, g.consumers))
    # backward post-process of the consumer(s): dy with the mask, S1 and S2
    if per_consumer:
        for _ in range(g.consumers):  # each wgrad reads the inputs instead of the result
            _read_inputs(led, g, "bp_pointwise", skip_first=True)
        ch(g.out, "bp_pointwise", (g.consumers - 1) * g.a)  # the consumers' dL/da summed
        _apply_flops(led, g, "flops_dgrad", g.consumers)
    else:
        for bn, _, n in g.terms:  # S2 needs x; the wgrad reads the kept result
            ch(bn, "bp_pointwise", n)
        ch(g.out, "bp_pointwise", (g.users - 1) * g.a)  # the other users' gradients (Scut_oerr)
        if not g.host:  # no convolution to host it: a sweep of its own
            ch(g.out, "bp_pointwise", g.a * (2 + g.act))
    if g.act:
        ch(g.out, "flops_dgrad", a.pointwise_flops * g.a)
    # the producers' pre-process forms dx = F1*dy + B*x + C, reading each feature map once
    for bn, srcs, n in g.terms:
        led.add(bn, flops_wgrad=a.bn_grad_stats_flops * n, flops_dgrad=a.bn_dx_flops * n)
        for s in srcs:
            if s not in seen.dx:
                seen.dx.add(s)
                ch(bn, "bp_pointwise", led.lg.numel(s))


def _group_bnff(led: _Ledger, g: _G, seen: _Seen) -> None:
    """bnff's own sweeps beside library convolutions (module docstring); pattern (3): 3 / 6."""
    a, ch = led.a, led.charge
    per_consumer = g.consumers > 0
    # forward: statistics once per feature map, one apply sweep writing the result
    _stats_once(led, g, seen, read=True)
    _read_inputs(led, g, "fp_read", skip_first=False)
    ch(g.out, "fp_write", g.a)
    _apply_flops(led, g, "flops_fp", 1)
    # backward sweep 1: recompute the result for the consumers' wgrads, reduce S1 and S2
    grads = g.consumers if per_consumer else g.users
    mask_kept = not per_consumer and g.act and bool(g.residuals)  # the kept result gives the mask
    write_dy = bool(g.residuals) or grads > 1 or (not per_consumer and g.act)
    if per_consumer:
        _read_inputs(led, g, "bp_pointwise", skip_first=False)
        ch(g.out, "bp_pointwise", g.a)
        _apply_flops(led, g, "flops_dgrad", 1)
    elif g.terms:
        for bn, _, n in g.terms:
            ch(bn, "bp_pointwise", n)
    if g.terms or write_dy:
        ch(g.out, "bp_pointwise", grads * g.a + (g.a if mask_kept else 0) + (g.a if write_dy else 0))
    if g.act:
        ch(g.out, "flops_dgrad", a.pointwise_flops * g.a)
    # backward sweep 2: dx per BN, from dy (or from the gradient and the mask again)
    if g.terms:
        mask_again = g.r if per_consumer and g.act and g.residuals else 0
        ch(g.out, "bp_pointwise", g.a if write_dy else grads * g.a + mask_again)
        for bn, _, n in g.terms:
            led.add(bn, bp_pointwise=2 * n,  # read x, write dx
                    flops_wgrad=a.bn_grad_stats_flops * n, flops_dgrad=a.bn_dx_flops * n)


def account(lg: LayerGraph, groups: list[Group], scheme: str, a: Assumptions) -> dict[str, Cost]:
    """Per-layer traffic and FLOPs of one training step of ``lg`` under ``scheme``.

    Args:
        lg: the layer graph.
        groups: the fusion groups of ``lg.gm`` (``bnff.restructure.match``); ignored for ``unfused``.
        scheme: "unfused", "bnff" or "fused" (module docstring).
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
    members: set[fx.Node] = set()
    outputs: set[fx.Node] = set()
    if scheme != "unfused":
        for g in groups:
            members.update(g.members())
            outputs.add(g.output)
    for layer in lg.layers:
        if layer.node not in members:
            _layer_io(led, layer)
        if layer.node not in outputs:
            _accumulate(led, layer, scheme)
    seen = _Seen(set(), set())
    for g in groups if scheme != "unfused" else ():
        sizes = _group_sizes(lg, g)
        (_group_fused if scheme == "fused" else _group_bnff)(led, sizes, seen)
    return led.costs


__all__ = ["Cost", "SCHEMES", "MEMORY_INTENSIVE", "account", "gradient_users"]
