"""A fused group as plain data: what it is made of, named by fx node (no shapes, no modules)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bnff import activations
from bnff.plan.steps import Ref, Schedule


DY_ONCE_GRAD_FLOPS = 8
"""A lone BN's activation whose derivative costs this many operations per element or more (``bnff.activations``
``grad_flops``: SiLU 8, GELU 11 and 15, Mish 11; Hardswish 5) has dy written once (``GroupPlan.writes_dy``).
Measured 2026-12-04 on a 2-core AMD EPYC (Zen 4), cpu kernels, bf16 channels_last maps (16, 96, 112, 112)
to (16, 672, 14, 14), the two backward sweeps of a lone BN: writing dy took 0.66-0.76x the time of
recomputing f' twice for SiLU, 0.60-0.66x for GELU, 0.53-0.55x for Mish, and 0.69-1.23x for Hardswish."""


@dataclass(frozen=True)
class TermPlan:
    """One BN of a group.

    Attributes:
        bn: the BN node.
        sources: the feature maps it normalizes (their channel concatenation; one map without one).
        cat: the ``torch.cat`` node joining them, or None.
    """

    bn: str
    sources: tuple[str, ...]
    cat: str | None = None


@dataclass(frozen=True)
class GroupPlan:
    """One fused group (``bnff.plan.match.Group``) and its steps under every execution scheme.

    Attributes:
        name: the group's name: its last node (``output``), unique in the graph.
        pattern: seed 002's connection ("(1)" .. "(4)-2") or "stem" / "head".
        terms: its BNs.
        residuals: identity-shortcut nodes added before the activation.
        add: the add node, or None.
        act: the activation node, or None.
        act_kind: the activation kind (``bnff.activations``: "relu", "silu", "leaky_relu(0.1)", ...) or None.
        consumers: the nodes that take the result as pre-processing (empty: the result is
            materialized, i.e. written once and read by its users).
        squeeze: a squeeze-and-excitation run inside the (one) consumer, its nodes in graph order: the
            global average pool, the gate's layers, the multiplication ``a * gate`` (empty: none). The
            consumer computes the (N, C, 1, 1) gate from ``a`` and takes ``a * gate``; its backward
            recomputes both, so neither the gate nor the scaled map is kept. Its nodes are priced
            as layers of their own (``bnff.traffic``), like the consumer.
        gate_folded: the squeeze-and-excitation's consumer is a 1x1 convolution (stride 1, one group), and the
            gate is folded into its weights per sample, ``out[n] = (W * gate[n]) a[n]``, like F1 into
            the apply step: the scaled map ``a * gate`` is never formed, in the forward or the backward.
        materialized_because: why the result is materialized, or None.
        host: the ``fused`` scheme's question for a materialized result: a user (convolution,
            pool, linear layer) can take the pre-processing.
        grad_slice: a materialized result read only by a concatenation of several maps: its gradient
            arrives as a slice of the concatenation's gradient (not dense in any layout for N > 1).
        owns: the feature maps whose forward statistics (and, in the ``fused`` scheme, whose dx
            pre-processing read) this group carries: the first group in graph order that
            normalizes them (inter-composite-layer fusion, seeds 001/004).
        members: the nodes the fused operator absorbs (BNs, the concatenations only they read, the
            add, the activation; not the consumers, which still run as layers).
        pointwise: every consumer is a 1x1 convolution that takes the apply step as the prologue of its
            GEMM (``bnff.graph.consumers.takes_gemm_prologue``; no squeeze-and-excitation): under the
            ``bnff_pw`` scheme the result is applied block by block inside each, never written.
        pointwise_backward: the group is lone (one BN, no shortcut) without a written dy, and its one
            consumer a stride-1 pointwise group's 1x1 convolution (``bnff.graph.consumers.pointwise``):
            under ``bnff_pw`` that convolution's dgrad and wgrad run in blocks of rows with the group's
            ``grad_stats_x`` (S1, S2 from each block of g_a and x in cache) and a recomputed per block
            for the wgrad, never written.
        stats_in_producer: the owned feature maps whose statistics the fused pointwise convolution that
            produces them takes in its epilogue (``bnff_pw``: no statistics sweep of their own).
        rereaders: convolutions that read the materialized result (whole, a part of a split, or inside a
            concatenation) and recompute it in their backward instead of keeping it (``FusionPlan.rereads``;
            lone groups only: the BN input they recompute it from is kept anyway).
        schedules: scheme name -> ``Schedule``.
    """

    name: str
    pattern: str
    terms: tuple[TermPlan, ...]
    residuals: tuple[str, ...] = ()
    add: str | None = None
    act: str | None = None
    act_kind: str | None = None
    consumers: tuple[str, ...] = ()
    squeeze: tuple[str, ...] = ()
    gate_folded: bool = False
    materialized_because: str | None = None
    host: bool = False
    grad_slice: bool = False
    owns: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    pointwise: bool = False
    pointwise_backward: bool = False
    stats_in_producer: tuple[str, ...] = ()
    rereaders: tuple[str, ...] = ()
    schedules: dict[str, Schedule] = field(default_factory=dict)

    @property
    def output(self) -> str:
        """The last node of the apply chain (before the consumers)."""
        return self.name

    @property
    def per_consumer(self) -> bool:
        """The result is applied inside each consumer (never stored) rather than materialized."""
        return bool(self.consumers)

    @property
    def lone(self) -> bool:
        """One BN and no shortcut: nothing but the BN needs dy, so the backward never writes it."""
        return len(self.terms) == 1 and not self.residuals

    @property
    def writes_dy(self) -> bool:
        """The backward writes dy = g_a * f' once and the BN-backward sweeps read it: always with several
        BNs or a shortcut (dy is their shared gradient); for a lone BN only when its activation's
        derivative reads the pre-activation and costs at least ``DY_ONCE_GRAD_FLOPS`` operations per
        element (SiLU, GELU, Mish), whose recomputation in both sweeps costs more than writing dy and
        reading it back. Otherwise a lone BN's two sweeps recompute the mask or derivative from x,
        which they read anyway, and dy is never written (seed 002 Table 2, patterns (4))."""
        if not self.lone:
            return True
        return self.derivative_reads == "z" and activations.spec(self.act_kind).entry.grad_flops >= DY_ONCE_GRAD_FLOPS

    @property
    def derivative_reads(self) -> str | None:
        """What the activation's derivative is computed from (``bnff.activations``): "a", the result
        (ReLU's mask, seed 002 eq. 19-20); "z", the pre-activation, recomputed from the BN inputs and
        shortcuts (SiLU, GELU, ...); None without an activation, or for the identity."""
        return activations.reads(self.act_kind)

    @property
    def keeps_result(self) -> bool:
        """A materialized result whose activation's derivative reads it is kept for its mask (it is
        written anyway, and a convolution reading it keeps it for its wgrad), unless the BN is lone:
        then both backward sweeps recompute the mask from x, which they read anyway (seed 002 Table 2,
        patterns (4))."""
        return not self.per_consumer and self.derivative_reads == "a" and not self.lone

    @property
    def keeps_shortcuts(self) -> bool:
        """The shortcuts are kept: the backward recomputes from them the result for the consumers'
        wgrads, or the pre-activation z for an activation's derivative that reads it."""
        return self.per_consumer or self.derivative_reads == "z"

    def x(self, k: int, source: str) -> Ref:
        """Feature map ``source`` of term ``k`` (charged to that BN)."""
        return Ref(source, "ofmap", self.terms[k].bn)

    def xs(self, k: int | None = None) -> list[Ref]:
        """Every feature map of term ``k`` (of every term when None), in order."""
        ks = range(len(self.terms)) if k is None else (k,)
        return [self.x(i, s) for i in ks for s in self.terms[i].sources]

    def rs(self) -> list[Ref]:
        """The shortcuts (charged to the add)."""
        return [Ref(r, "ofmap", self.add or self.name) for r in self.residuals]

    def a(self) -> Ref:
        """The group's result a."""
        return Ref(self.name, "ofmap", self.name)

    def g_a(self) -> Ref:
        """The gradient arriving at the result."""
        return Ref(self.name, "grad", self.name)

    def z(self) -> Ref:
        """The pre-activation, recomputed on the way (never stored)."""
        return Ref(self.name, "z", self.name)

    def dy(self) -> Ref:
        """The masked gradient dy, shared by every BN and shortcut of the group."""
        return Ref(self.name, "dy", self.name)


__all__ = ["DY_ONCE_GRAD_FLOPS", "GroupPlan", "TermPlan"]
