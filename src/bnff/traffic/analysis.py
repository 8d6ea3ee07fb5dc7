"""``analyze``: per-layer off-chip traffic, footprint and FLOPs of one training step, per scheme."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from bnff.graph.layers import LayerGraph, build
from bnff.graph.trace import LeafSpec
from bnff.plan import FusionPlan, plan_graph
from bnff.traffic.account import MEMORY_INTENSIVE, SCHEMES, account
from bnff.traffic.assumptions import Assumptions
from bnff.traffic.footprint import footprint


@dataclass(frozen=True)
class LayerRecord:
    """One layer's share of a training step (forward + backward) under one scheme.

    Attributes:
        name: module qualified name, or fx node name for functional layers.
        kind: "conv", "bn", "act", "add", "maxpool", "avgpool", "cat", "linear", "flatten", "other".
        block: enclosing block ("layer1.0") for per-block sums.
        group: the fusion pattern of the group the layer belongs to ("(3)", "(4)-1", "stem", ...;
            a consumer belongs to none), "" under ``unfused`` or outside groups.
        fp_read_bytes, fp_write_bytes: forward off-chip traffic.
        bp_dgrad_bytes, bp_wgrad_bytes: backward traffic of the data and weight gradients.
        bp_pointwise_bytes: backward traffic of BN, activation, add, pool, concatenation and
            gradient-accumulation work.
        footprint_bytes: bytes kept from the forward for the backward, charged to this layer.
        flops_fp, flops_dgrad, flops_wgrad: floating-point operations (a MAC is 2).
    """

    name: str
    kind: str
    block: str
    group: str
    fp_read_bytes: int
    fp_write_bytes: int
    bp_dgrad_bytes: int
    bp_wgrad_bytes: int
    bp_pointwise_bytes: int
    footprint_bytes: int
    flops_fp: int
    flops_dgrad: int
    flops_wgrad: int

    @property
    def fp_bytes(self) -> int:
        """Forward traffic, bytes."""
        return self.fp_read_bytes + self.fp_write_bytes

    @property
    def bp_bytes(self) -> int:
        """Backward traffic, bytes."""
        return self.bp_dgrad_bytes + self.bp_wgrad_bytes + self.bp_pointwise_bytes

    @property
    def total_bytes(self) -> int:
        """Forward + backward traffic, bytes."""
        return self.fp_bytes + self.bp_bytes

    @property
    def flops(self) -> int:
        """Forward + backward FLOPs."""
        return self.flops_fp + self.flops_dgrad + self.flops_wgrad

    def as_dict(self) -> dict:
        """The record with its derived totals, for JSON and CSV."""
        return {**asdict(self), "fp_bytes": self.fp_bytes, "bp_bytes": self.bp_bytes,
                "total_bytes": self.total_bytes, "flops": self.flops}


@dataclass
class Analysis:
    """``analyze``'s result: per-layer records of one scheme and their totals.

    Attributes:
        scheme: "unfused", "bnff" or "fused".
        input_shape: (N, C, H, W) of the analysed mini-batch.
        assumptions: the ``Assumptions`` used.
        records: one ``LayerRecord`` per layer, in graph order.
    """

    scheme: str
    input_shape: tuple[int, ...]
    assumptions: Assumptions
    records: list[LayerRecord] = field(default_factory=list)

    def total(self, attr: str, kinds: tuple[str, ...] | None = None) -> int:
        """Sum of a record attribute ("fp_bytes", "footprint_bytes", "flops", ...) over the records
        (of the given kinds only, if ``kinds``)."""
        return sum(getattr(r, attr) for r in self.records if kinds is None or r.kind in kinds)

    def summary(self) -> dict[str, int]:
        """``{"fp_bytes", "bp_bytes", "total_bytes", "footprint_bytes", "flops"}`` of the whole step."""
        return {k: self.total(k) for k in ("fp_bytes", "bp_bytes", "total_bytes", "footprint_bytes", "flops")}

    def memory_intensive(self) -> dict[str, int]:
        """The same sums over the memory-intensive layers only (BN, activation, add: seed 002 Tables 1-2)."""
        kinds = tuple(k.value for k in MEMORY_INTENSIVE)
        return {k: self.total(k, kinds) for k in ("fp_bytes", "bp_bytes", "total_bytes", "footprint_bytes")}


def _records(lg: LayerGraph, plan: FusionPlan, scheme: str, a: Assumptions) -> list[LayerRecord]:
    costs = account(lg, plan, scheme, a)
    kept = footprint(lg, plan, scheme, a)
    label: dict[str, str] = {}
    for g in plan.groups if scheme != "unfused" else ():
        for n in [t.bn for t in g.terms] + [n for n in (g.add, g.act) if n is not None]:
            label[lg.layer(n).name] = g.pattern
    out = []
    for layer in lg.layers:
        c = costs[layer.name]
        out.append(LayerRecord(
            name=layer.name, kind=layer.kind.value, block=layer.block, group=label.get(layer.name, ""),
            fp_read_bytes=c.fp_read, fp_write_bytes=c.fp_write, bp_dgrad_bytes=c.bp_dgrad,
            bp_wgrad_bytes=c.bp_wgrad, bp_pointwise_bytes=c.bp_pointwise, footprint_bytes=kept[layer.name],
            flops_fp=c.flops_fp, flops_dgrad=c.flops_dgrad, flops_wgrad=c.flops_wgrad))
    return out


def _prepare(model: nn.Module | LayerGraph, input_shape, dtype, assumptions, leaf_modules):
    a = assumptions or Assumptions()
    if dtype is not None:
        a = a.with_dtype(dtype)
    lg = model if isinstance(model, LayerGraph) else build(model, input_shape, leaf_modules)
    plan, _, _ = plan_graph(lg.gm)
    return lg, plan, a


def analyze(model: nn.Module | LayerGraph, input_shape: tuple[int, ...] = (), dtype: torch.dtype | None = torch.float32,
            scheme: str = "bnff", assumptions: Assumptions | None = None,
            leaf_modules: LeafSpec = ()) -> Analysis:
    """Model one training step of ``model`` on a mini-batch of ``input_shape``, layer by layer.

    Shapes come from meta tensors: nothing is computed or allocated, so ResNet-50 at batch 256
    takes about a second. The fusion plan is the one ``bnff.restructure`` executes
    (``bnff.plan.plan_graph`` on the same trace), so ``bnff`` describes the restructured model.

    Args:
        model: an ``nn.Module`` (copied to the meta device; untouched) or a ``LayerGraph`` from
            ``bnff.graph.layers.build`` (then ``input_shape`` is ignored).
        input_shape: the input mini-batch, (N, C, H, W).
        dtype: element type of activations and gradients (sets ``assumptions.element_bytes``);
            None keeps ``assumptions.element_bytes``.
        scheme: "unfused", "bnff" or "fused" (``bnff.plan.schemes``).
        assumptions: the ``Assumptions`` (default: ``Assumptions()``).
        leaf_modules: modules not to trace into.
    Returns:
        ``Analysis`` with one ``LayerRecord`` per layer.
    Raises:
        ValueError: unknown scheme, bad ``input_shape``, or a model that rejects the input.
        TraceError: the model cannot be traced.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    lg, plan, a = _prepare(model, input_shape, dtype, assumptions, leaf_modules)
    return Analysis(scheme, lg.input_shape, a, _records(lg, plan, scheme, a))


def compare(model: nn.Module | LayerGraph, input_shape: tuple[int, ...] = (), dtype: torch.dtype | None = torch.float32,
            assumptions: Assumptions | None = None, leaf_modules: LeafSpec = ()) -> dict[str, Analysis]:
    """``analyze`` under every scheme, tracing the model once: scheme name -> ``Analysis``."""
    lg, plan, a = _prepare(model, input_shape, dtype, assumptions, leaf_modules)
    return {s: Analysis(s, lg.input_shape, a, _records(lg, plan, s, a)) for s in SCHEMES}


__all__ = ["Analysis", "LayerRecord", "analyze", "compare"]
