"""``FusionPlan``: every fused group of a traced model with its steps under every scheme.

Built by one planning pass over the fx graph (``plan_graph``): ``bnff.plan.match`` finds the
groups (and decides, once, whether each result is applied inside its consumers or materialized),
``bnff.plan.schemes`` writes each group's steps. ``bnff.restructure`` executes the plan of the
model it rewrites; ``bnff.traffic`` sums the plan of the model it analyses. Both trace the model
the same way (``bnff.graph.trace``), so node names, and therefore plans, agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

import torch.fx as fx

from bnff.graph.consumers import pointwise as conv_pointwise
from bnff.graph.consumers import takes_gemm_prologue
from bnff.graph.kinds import Kind
from bnff.plan import schemes
from bnff.plan.group import GroupPlan, TermPlan
from bnff.plan.match import Group, Unfused, match
from bnff.plan.steps import Schedule

_HOSTS = (Kind.CONV, Kind.MAXPOOL, Kind.AVGPOOL, Kind.LINEAR)


@dataclass(frozen=True)
class UnfusedPlan:
    """A BN, activation or add left as a layer of its own, and why."""

    node: str
    kind: str
    reason: str


@dataclass(frozen=True)
class RereadPlan:
    """A convolution outside the groups that rebuilds its input in its backward rather than keeping it
    (``bnff.plan.match``, module docstring): the results of ``groups``, recomputed by each group's
    ``reread`` step, passed through ``cats`` (concatenations, copied again) and views to its input."""

    conv: str
    groups: tuple[str, ...]
    cats: tuple[str, ...] = ()


@dataclass
class FusionPlan:
    """The plan of one traced graph.

    Attributes:
        groups: the fused groups in graph order.
        unfused: the BN, activation and add nodes no group takes, with reasons.
        rereads: the convolutions that rebuild their input from groups' results, in graph order.
    """

    groups: list[GroupPlan] = field(default_factory=list)
    unfused: list[UnfusedPlan] = field(default_factory=list)
    rereads: list[RereadPlan] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}

    def group(self, name: str) -> GroupPlan:
        """The group called ``name`` (its last node).

        Raises:
            KeyError: no such group; the message lists a few names.
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no fused group {name!r} in this plan (groups: {', '.join(list(self._by_name)[:5])}, ...)") from None

    def owner_of_stats(self) -> dict[str, str]:
        """Feature map node -> the group carrying its forward statistics."""
        return {s: g.name for g in self.groups for s in g.owns}

    def as_dict(self) -> dict:
        """The plan as JSON-ready data (``schedules`` per scheme: forward and backward steps)."""
        return {"groups": [asdict(g) for g in self.groups], "unfused": [asdict(u) for u in self.unfused],
                "rereads": [asdict(r) for r in self.rereads]}

    def to_json(self, indent: int | None = 1) -> str:
        """``as_dict`` as a JSON string."""
        return json.dumps(self.as_dict(), indent=indent)


def _group_plan(g: Group, owns: tuple[str, ...], pointwise: bool, pointwise_outputs: set[str]) -> GroupPlan:
    users = [u for u in g.output.users if u.meta.get("bnff_kind") is not None and u not in g.squeeze]
    plan = GroupPlan(
        name=g.output.name, pattern=g.pattern,
        terms=tuple(TermPlan(t.bn.name, tuple(s.name for s in t.sources), t.cat.name if t.cat is not None else None)
                    for t in g.terms),
        residuals=tuple(r.name for r in g.residuals), add=g.add.name if g.add is not None else None,
        act=g.act.name if g.act is not None else None, act_kind=g.act_kind,
        consumers=tuple(c.name for c in g.consumers), squeeze=tuple(n.name for n in g.squeeze), gate_folded=g.gate_folded,
        materialized_because=g.materialized_because,
        host=any(u.meta["bnff_kind"] in _HOSTS for u in users), owns=owns,
        grad_slice=not g.consumers and len(users) == 1 and users[0].meta["bnff_kind"] == Kind.CAT
        and len(users[0].args[0]) > 1,
        members=tuple(n.name for n in g.members()), rereaders=tuple(c.name for c in g.rereaders),
        pointwise=pointwise, stats_in_producer=tuple(s for s in owns if s in pointwise_outputs))
    plan = replace(plan, pointwise_backward=pointwise and plan.lone and not plan.writes_dy and len(g.consumers) == 1
                   and conv_pointwise(g.consumers[0].meta.get("bnff_module")))
    return replace(plan, schedules={s: schemes.BUILDERS[s](plan) for s in schemes.SCHEMES})


def _pointwise(g: Group) -> bool:
    """``GroupPlan.pointwise``: consumers, all of them 1x1 convolutions that take a GEMM prologue."""
    return bool(g.consumers) and not g.squeeze and all(takes_gemm_prologue(c.meta.get("bnff_module"))
                                                        for c in g.consumers)


def plan_graph(gm: fx.GraphModule, exclude: Mapping[str, str] | None = None
               ) -> tuple[FusionPlan, list[Group], list[Unfused]]:
    """Match the groups of ``gm`` and plan each (module docstring). ``exclude``: groups to leave
    unfused, name -> reason (``bnff.plan.match.match``).

    Returns:
        (the plan, the matched groups and the unfused nodes as fx objects, for rewriting and the
        fusion report). The graph is not modified (``node.meta`` gets ``bnff_kind``/``bnff_module``).
    """
    groups, unfused, rereads = match(gm, exclude)
    seen: set[fx.Node] = set()
    plans = []
    pointwise = [_pointwise(g) for g in groups]
    pointwise_outputs = {c.name for g, pw in zip(groups, pointwise) if pw for c in g.consumers}
    for g, pw in zip(groups, pointwise):
        owns = []
        for t in g.terms:
            for s in t.sources:
                if s not in seen:
                    seen.add(s)
                    owns.append(s.name)
        plans.append(_group_plan(g, tuple(owns), pw, pointwise_outputs))
    plan = FusionPlan(plans, [UnfusedPlan(u.node.name, u.kind.value, u.reason) for u in unfused],
                      [RereadPlan(r.conv.name, tuple(g.name for g in r.groups),
                                  tuple(n.name for n in r.passage if n.meta.get("bnff_kind") == Kind.CAT))
                       for r in rereads])
    return plan, groups, unfused


def steps_table(plan: FusionPlan, scheme: str = "bnff") -> list[dict]:
    """One row per step of every group under ``scheme``: group, pattern, phase, kind, reads, writes,
    keeps, recomputes (tensors as ``role(node)``).

    Raises:
        ValueError: unknown scheme.
    """
    if scheme not in schemes.SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(schemes.SCHEMES)}")
    rows = []
    for g in plan.groups:
        sched: Schedule = g.schedules[scheme]
        for s in sched.steps:
            rows.append({"group": g.name, "pattern": g.pattern, "phase": s.phase, "kind": s.kind,
                         "reads": " ".join(map(str, s.reads)), "writes": " ".join(map(str, s.writes)),
                         "keeps": " ".join(map(str, s.keeps)), "recomputes": " ".join(map(str, s.recomputes))})
    return rows


__all__ = ["FusionPlan", "RereadPlan", "UnfusedPlan", "plan_graph", "steps_table"]
