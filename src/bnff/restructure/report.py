"""The fusion report: what ``bnff.restructure`` fused into what, and what it left alone and why."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn

from bnff import activations
from bnff.graph.kinds import module_name
from bnff.plan.match import Group, Unfused


@dataclass(frozen=True)
class FusedGroup:
    """One fused operator.

    Attributes:
        pattern: seed 002's connection name ("(1)", "(2)", "(3)", "(4)-1", "(4)-2") or "stem"/"head".
        bns: qualified names of the BatchNorm2d modules fused (their statistics join ``sources``).
        sources: per BN, the layers producing the feature maps it normalizes (several when the
            BN's input is a concatenation: inter-composite-layer fusion).
        add: whether a residual add is fused.
        act: the activation kind (``bnff.activations``: "relu", "silu", "leaky_relu(0.1)", ...) or None.
        residuals: fx names of identity-shortcut tensors added.
        consumers: the layers that take the result as pre-processing (module names, or fx node
            names of functional pools); empty when it is materialized.
        materialized_because: why the result is materialized instead (when ``consumers`` is empty).
        squeeze: the squeeze-and-excitation run inside the consumer (its pool, gate layers and
            multiplication, as module or fx node names), empty when there is none.
        rereaders: the convolutions that read the materialized result without keeping it, recomputing
            it in their backward (module names).
    """

    pattern: str
    bns: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    add: bool
    act: str | None
    residuals: tuple[str, ...]
    consumers: tuple[str, ...]
    materialized_because: str | None
    squeeze: tuple[str, ...] = ()
    rereaders: tuple[str, ...] = ()

    def consumer(self) -> str:
        """Who takes the result: the consumers (a squeeze-and-excitation in front of one named by the
        module holding its layers), or why it is materialized (and which convolutions reread it)."""
        if not self.consumers:
            again = f"; not kept: recomputed in the backward of {', '.join(self.rereaders)}" if self.rereaders else ""
            return f"materialized: {self.materialized_because}{again}"
        if not self.squeeze:
            return ", ".join(self.consumers)
        dotted = [n.split(".") for n in self.squeeze if "." in n]
        common = ".".join(p[0] for p in zip(*dotted) if len(set(p)) == 1) if dotted else ""
        return f"squeeze-excitation {common or self.squeeze[0]} -> {self.consumers[0]}"

    @property
    def icf(self) -> bool:
        """Whether a BN's statistics are gathered from several feature maps (ICF)."""
        return any(len(s) > 1 for s in self.sources)

    def describe(self) -> str:
        parts = ["ICF"] if self.icf else []
        parts += ["BN" if len(self.bns) == 1 else f"{len(self.bns)}xBN"] if self.bns else []
        parts += ["Add"] if self.add else []
        parts += [activations.spec(self.act).display] if self.act else []
        return "+".join(parts)


@dataclass(frozen=True)
class UnfusedNode:
    """A BN, activation or add left as it was. ``name`` is the module or fx node name."""

    name: str
    kind: str
    reason: str


@dataclass
class FusionReport:
    """Which BN/ReLU/Add nodes ``bnff.restructure`` fused into which group, and which it left.

    Attributes:
        groups: the fused operators, in graph order.
        unfused: every BN, ReLU/ReLU6 and Add not fused, with the reason.
        opaque: submodules kept as untraced leaves (user-given or untraceable), name -> reason.
        backend: the sweep backend the fused operators use.
        mode_dependent: the forward branches on ``self.training``, so training and evaluation
            run separately rewritten graphs; the groups listed are those of the training graph.
        prefer: "memory" or "speed" (``bnff.restructure``).
        timings: with ``prefer="speed"``: every fusable group (its output node's name) ->
            ``bnff.restructure.prefer.GroupTiming``, fused and eager, measured on this CPU; the
            groups slower fused are the ``unfused`` entries whose reason starts "prefer='speed'".
        pointwise: the consumers (1x1 convolutions) of the groups the plan marks ``pointwise``, which
            can run as fused pointwise convolutions (``bnff.ops.pointwise``; docs/pointwise.md).
    """

    groups: list[FusedGroup] = field(default_factory=list)
    unfused: list[UnfusedNode] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    backend: str = "reference"
    mode_dependent: bool = False
    prefer: str = "memory"
    timings: dict = field(default_factory=dict)
    pointwise: tuple[str, ...] = ()

    @property
    def fused_bns(self) -> list[str]:
        """Qualified names of every fused BatchNorm2d."""
        return [bn for g in self.groups for bn in g.bns]

    @property
    def unfused_bns(self) -> list[UnfusedNode]:
        """The BatchNorm layers left unfused."""
        return [u for u in self.unfused if u.kind == "bn"]

    def summary(self) -> str:
        """One line: fused BN count, groups, unfused count."""
        total = len(self.fused_bns) + len(self.unfused_bns)
        return (f"{len(self.fused_bns)} of {total} BatchNorm layers fused into {len(self.groups)} groups "
                f"({self.backend} backend); {len(self.unfused)} BN/activation/add nodes left unfused")

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=io.StringIO())
        table = Table(title="bnff fusion report", show_lines=False)
        for col in ("pattern", "fused", "BN (statistics from producer)", "shortcut", "consumer"):
            table.add_column(col)
        for g in self.groups:
            bns = ", ".join(f"{b} <- {_sources(s)}" for b, s in zip(g.bns, g.sources))
            table.add_row(g.pattern, g.describe(), bns, ", ".join(g.residuals), g.consumer())
        console.print(table)
        if self.unfused:
            left = Table(title="left unfused")
            for col in ("node", "kind", "reason"):
                left.add_column(col)
            for u in self.unfused:
                left.add_row(u.name, u.kind, u.reason)
            console.print(left)
        if self.mode_dependent:
            console.print("the forward branches on self.training: training and evaluation use separately "
                          "rewritten graphs (the groups above are the training graph's)")
        if self.timings:
            timed = Table(title="prefer='speed': each group's forward+backward, timed on this CPU")
            for col in ("group", "fused ms", "eager ms", "runs"):
                timed.add_column(col)
            for name, t in self.timings.items():
                timed.add_row(name, f"{t.fused_s * 1e3:.2f}", f"{t.eager_s * 1e3:.2f}",
                              "eager (unfused)" if t.runs_eager else "fused")
            console.print(timed)
        for name, why in self.opaque.items():
            console.print(f"opaque submodule {name}: {why}")
        console.print(self.summary())
        console.print(f"sweeps: {self.sweeps_where()}")
        if self.pointwise:
            console.print(f"fused pointwise convolutions: {self.pointwise_where()}")
        return console.export_text()

    def sweeps_where(self) -> str:
        """Which dtypes and layouts run where on this report's backend (its ``COVERAGE``)."""
        from bnff.ops import backends

        return backends.get(self.backend).COVERAGE


    def pointwise_where(self) -> str:
        """Which 1x1 consumers can run as fused pointwise convolutions and whether they do here."""
        from bnff.ops import pointwise
        from bnff.ops.backends import cpu

        why = "the backend is not cpu" if self.backend != "cpu" else cpu.pointwise_why()
        state = f"off: {why}" if why else f"libxsmm target {cpu.pointwise_target()}, BNFF_POINTWISE={pointwise.MODE}"
        return f"{len(self.pointwise)} 1x1 consumers can take the apply step in their GEMM ({state})"


def _sources(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"cat({names[0]} .. {names[-1]}: {len(names)} maps)"


def _name(node) -> str:
    return module_name(node)


def build(groups: list[Group], unfused: list[Unfused], opaque: dict[str, str], backend: str,
          modules: dict[str, nn.Module], pointwise: frozenset[str] = frozenset()) -> FusionReport:
    """Assemble the report from the matcher's output (before the graph is rewritten); ``pointwise``: the
    names of the groups the plan marks ``GroupPlan.pointwise``."""
    report = FusionReport(backend=backend, opaque=dict(opaque),
                          pointwise=tuple(_name(c) for g in groups if g.output.name in pointwise for c in g.consumers))
    for g in groups:
        report.groups.append(FusedGroup(
            pattern=g.pattern,
            bns=tuple(module_name(t.bn) for t in g.terms),
            sources=tuple(tuple(_name(s) for s in t.sources) for t in g.terms),
            add=g.add is not None, act=g.act_kind,
            residuals=tuple(r.name for r in g.residuals),
            consumers=tuple(_name(c) for c in g.consumers),
            materialized_because=g.materialized_because, squeeze=tuple(_name(n) for n in g.squeeze),
            rereaders=tuple(_name(c) for c in g.rereaders)))
    for u in unfused:
        report.unfused.append(UnfusedNode(_name(u.node), u.kind.value, u.reason))
    for name, module in modules.items():  # BNs hidden inside opaque submodules
        if any(name.startswith(o + ".") for o in opaque) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            owner = next(o for o in opaque if name.startswith(o + "."))
            report.unfused.append(UnfusedNode(name, "bn", f"inside opaque submodule '{owner}' (not traced)"))
    return report
