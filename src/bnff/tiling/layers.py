"""A model's layers as seed 003 sees them: pointwise GEMMs, depthwise convolutions and residual adds.

``ops(model)`` walks the model's convolutions (shapes from meta tensors, batch 1 inference) in graph
order: a 1x1 ungrouped convolution is a ``Pointwise`` GEMM (M = H_out x W_out ofmap pixels, K =
input channels, N = output channels; thesis section 3.1.1); a depthwise convolution (groups =
channels) a ``Depthwise``; with ``cp_rank``, every other KxK convolution is CP-decomposed (thesis
section 2.2; Lebedev et al. 2015) into 1x1 (C_in -> R), depthwise Kx1 (vertical stride), depthwise
1xK (horizontal stride), 1x1 (R -> C_out); an add of two maps is an ``Add``. BN and ReLU/ReLU6 are
inference-time operations done on chip on the way (folded or applied as pre-/post-processing), so
they move no data of their own. Other layers (pools, the classifier, a standard convolution left
undecomposed) are listed in ``skipped``.

``chains(ops)`` finds what section 4 fuses: maximal runs [1x1], depthwise..., 1x1 where each
output feeds only the next, plus the residual add that takes the last output, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from bnff.graph.kinds import Kind
from bnff.graph.layers import LayerGraph, build
from bnff.tiling.cp import rank_of
from bnff.tiling.gemm import Gemm


@dataclass(frozen=True)
class Op:
    """One layer of the tiling model.

    Attributes:
        name: the layer's name (a decomposed convolution's parts: ``name/cp0`` .. ``name/cp3``).
        kind: "pointwise", "depthwise" or "add".
        channels: output channels.
        h_in, w_in, h_out, w_out: spatial sizes.
        in_channels: input channels.
        kh, kw, sh, sw: kernel and stride (depthwise).
        sources: the ops whose outputs it reads (names).
    """

    name: str
    kind: str
    in_channels: int
    channels: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    sources: tuple[str, ...] = ()

    @property
    def gemm(self) -> Gemm:
        """The GEMM of a pointwise op: M = H_out x W_out, K = in channels, N = out channels."""
        return Gemm(self.h_out * self.w_out, self.in_channels, self.channels)

    @property
    def in_elements(self) -> int:
        return self.h_in * self.w_in * self.in_channels

    @property
    def out_elements(self) -> int:
        return self.h_out * self.w_out * self.channels

    @property
    def weight_elements(self) -> int:
        if self.kind == "pointwise":
            return self.in_channels * self.channels
        if self.kind == "depthwise":
            return self.channels * self.kh * self.kw
        return 0


@dataclass
class OpList:
    """``ops``'s result: the ops in graph order, how many users each op's output has, the layers
    left out (name -> why)."""

    ops: list[Op]
    users: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)


def ops(model: nn.Module, image_size: int = 224, cp_rank: float | int | None = None) -> OpList:
    """The model's convolutions and adds as ``Op``s (module docstring), batch 1.

    Args:
        model: the network (copied to the meta device).
        image_size: input height and width.
        cp_rank: None (standard KxK convolutions are skipped), a rank R, or a fraction of
            min(C_in, C_out) (``0.5``: the thesis' reproduction).
    """
    lg: LayerGraph = build(model, (1, 3, image_size, image_size))
    modules = dict(lg.gm.named_modules())
    made: dict[fx.Node, str] = {}  # node -> the op whose output it carries (through BN/ReLU)
    out: list[Op] = []
    skipped: dict[str, str] = {}
    users: dict[str, int] = {}

    def source(node: fx.Node) -> str:
        return made.get(node, "")

    for layer in lg.layers:
        node = layer.node
        if layer.kind in (Kind.BN, Kind.ACT) and layer.inputs and layer.inputs[0] in made:
            made[node] = made[layer.inputs[0]]
            continue
        if layer.kind == Kind.ADD and len(layer.inputs) == 2:
            _, c, h, w = layer.out_shape
            op = Op(layer.name, "add", c, c, h, w, h, w, sources=tuple(source(i) for i in layer.inputs))
        elif layer.kind == Kind.CONV:
            m = modules[str(node.target)]
            _, c_out, h_out, w_out = layer.out_shape
            _, c_in, h_in, w_in = layer.inputs[0].meta["tensor_meta"].shape
            kh, kw = m.kernel_size
            sh, sw = m.stride
            src = (source(layer.inputs[0]),)
            if (kh, kw) == (1, 1) and m.groups == 1:
                op = Op(layer.name, "pointwise", c_in, c_out, h_in, w_in, h_out, w_out, sh=sh, sw=sw, sources=src)
            elif m.groups == c_in == c_out:
                op = Op(layer.name, "depthwise", c_in, c_out, h_in, w_in, h_out, w_out, kh, kw, sh, sw, src)
            elif cp_rank is not None and m.groups == 1:
                r = rank_of(cp_rank, c_in, c_out)
                parts = [Op(f"{layer.name}/cp0", "pointwise", c_in, r, h_in, w_in, h_in, w_in, sources=src),
                         Op(f"{layer.name}/cp1", "depthwise", r, r, h_in, w_in, h_out, w_in, kh, 1, sh, 1,
                            (f"{layer.name}/cp0",)),
                         Op(f"{layer.name}/cp2", "depthwise", r, r, h_out, w_in, h_out, w_out, 1, kw, 1, sw,
                            (f"{layer.name}/cp1",))]
                for p in parts:
                    out.append(p)
                    users[p.name] = 1
                op = Op(f"{layer.name}/cp3", "pointwise", r, c_out, h_out, w_out, h_out, w_out,
                        sources=(f"{layer.name}/cp2",))
            else:
                skipped[layer.name] = f"a {kh}x{kw} convolution (groups {m.groups}): not pointwise or depthwise" + (
                    "; pass cp_rank to decompose it" if cp_rank is None else "")
                continue
        else:
            if layer.kind not in (Kind.BN, Kind.ACT, Kind.FLATTEN) and not layer.view:
                skipped[layer.name] = f"a {layer.kind.value} layer"
            continue
        out.append(op)
        made[node] = op.name
        users[op.name] = sum(1 for u in node.users if u in lg.by_node or u.op == "output")
    # an op's users: through BN/ReLU chains, count the layers that read its carrier nodes
    carried: dict[str, int] = {}
    for n, name in made.items():
        if name:
            carried[name] = carried.get(name, 0) + sum(1 for u in n.users if u not in made or made[u] != name)
    for name, n in carried.items():
        users[name] = n
    return OpList(out, users, skipped)


def chains(ol: OpList) -> list[list[Op]]:
    """What the thesis fuses (section 4): runs [1x1], depthwise (one or more), 1x1 in which every
    output feeds only the next op, with the residual add reading the last output appended when
    that output feeds only the add. Each op belongs to at most one chain."""
    by_name = {o.name: o for o in ol.ops}
    consumer: dict[str, Op] = {}
    for o in ol.ops:
        for s in o.sources:
            if s and ol.users.get(s, 0) == 1:
                consumer[s] = o
    out, taken = [], set()
    for o in ol.ops:
        if o.kind != "depthwise" or o.name in taken:
            continue
        run = [o]
        src = by_name.get(o.sources[0]) if o.sources else None
        if src is not None and src.kind == "pointwise" and consumer.get(src.name) is o and src.name not in taken:
            run.insert(0, src)
        nxt = consumer.get(run[-1].name)
        while nxt is not None and nxt.kind == "depthwise":
            run.append(nxt)
            nxt = consumer.get(nxt.name)
        if nxt is None or nxt.kind != "pointwise":
            continue
        run.append(nxt)
        add = consumer.get(nxt.name)
        if add is not None and add.kind == "add":
            run.append(add)
        taken.update(x.name for x in run)
        out.append(run)
    return out


__all__ = ["Op", "OpList", "chains", "ops"]
