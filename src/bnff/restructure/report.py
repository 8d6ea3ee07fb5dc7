"""The fusion report: what ``bnff.restructure`` fused into what, and what it left alone and why."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn

from bnff.restructure.match import Group, Unfused


@dataclass(frozen=True)
class FusedGroup:
    """One fused operator.

    Attributes:
        pattern: seed 002's connection name ("(1)", "(2)", "(3)", "(4)-1", "(4)-2") or "stem"/"head".
        bns: qualified names of the BatchNorm2d modules fused (their statistics join ``producers``).
        producers: the convolutions whose output each BN normalizes.
        add: whether a residual add is fused.
        act: "relu", "relu6" or None.
        residuals: fx names of identity-shortcut tensors added.
        consumer: qualified name of the layer that takes the result as pre-processing, or None.
        materialized_because: why the result is materialized instead (when ``consumer`` is None).
    """

    pattern: str
    bns: tuple[str, ...]
    producers: tuple[str, ...]
    add: bool
    act: str | None
    residuals: tuple[str, ...]
    consumer: str | None
    materialized_because: str | None

    def describe(self) -> str:
        parts = ["BN" if len(self.bns) == 1 else f"{len(self.bns)}xBN"] if self.bns else []
        parts += ["Add"] if self.add else []
        parts += [self.act.upper() if self.act == "relu6" else "ReLU"] if self.act else []
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
    """

    groups: list[FusedGroup] = field(default_factory=list)
    unfused: list[UnfusedNode] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    backend: str = "reference"

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
            bns = ", ".join(f"{b} <- {p}" for b, p in zip(g.bns, g.producers))
            consumer = g.consumer or f"materialized: {g.materialized_because}"
            table.add_row(g.pattern, g.describe(), bns, ", ".join(g.residuals), consumer)
        console.print(table)
        if self.unfused:
            left = Table(title="left unfused")
            for col in ("node", "kind", "reason"):
                left.add_column(col)
            for u in self.unfused:
                left.add_row(u.name, u.kind, u.reason)
            console.print(left)
        for name, why in self.opaque.items():
            console.print(f"opaque submodule {name}: {why}")
        console.print(self.summary())
        return console.export_text()


def _name(node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def build(groups: list[Group], unfused: list[Unfused], opaque: dict[str, str], backend: str,
          modules: dict[str, nn.Module]) -> FusionReport:
    """Assemble the report from the matcher's output (before the graph is rewritten)."""
    report = FusionReport(backend=backend, opaque=dict(opaque))
    for g in groups:
        report.groups.append(FusedGroup(
            pattern=g.pattern,
            bns=tuple(str(t.bn.target) for t in g.terms),
            producers=tuple(_name(t.producer) for t in g.terms),
            add=g.add is not None, act=g.act_kind,
            residuals=tuple(r.name for r in g.residuals),
            consumer=None if g.consumer is None else str(g.consumer.target),
            materialized_because=g.materialized_because))
    for u in unfused:
        report.unfused.append(UnfusedNode(_name(u.node), u.kind.value, u.reason))
    for name, module in modules.items():  # BNs hidden inside opaque submodules
        if any(name.startswith(o + ".") for o in opaque) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            owner = next(o for o in opaque if name.startswith(o + "."))
            report.unfused.append(UnfusedNode(name, "bn", f"inside opaque submodule '{owner}' (not traced)"))
    return report
