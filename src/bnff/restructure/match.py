"""Pattern matching of seed 002's connections on an fx graph (DESIGN.md section 4).

A *group* is what one fused operator replaces: one or two BatchNorm2d nodes fed by convolutions
(their statistics step joins the producing convolution), an optional residual add, an optional
ReLU/ReLU6, and the consumer that takes the result as pre-processing:

    (1)   C1 -> ReLU -> C2                       terms=[],      residuals=[C1], act
    (2)   C1 -> BN -> C2                         terms=[BN]
    (3)   C1 -> BN -> ReLU -> C2                 terms=[BN],    act
    (4)-1 C1 -> BN -> Add(x) -> ReLU -> C2       terms=[BN],    residuals=[x], add, act
    (4)-2 C1 -> BN -> Add(C3 -> BN3) -> ReLU     terms=[BN, BN3], add, act
    stem  conv -> BN -> ReLU -> maxpool          consumer is a pool
    head  BN -> Add -> ReLU -> avgpool           consumer is a pool

The consumer is taken when the group's output has exactly one user and that user accepts
pre-processing (``bnff.ops.consumers``); otherwise the output is materialized (several users,
e.g. a block output feeding the next block's convolution and its shortcut). Every BN, ReLU and
Add that joins no group is returned with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from bnff.graph.kinds import Kind, NodeInfo, classify
from bnff.ops import consumers


@dataclass
class Term:
    """A fused BN: the BN node and the convolution node that produces its input."""

    bn: fx.Node
    producer: fx.Node


@dataclass
class Group:
    """Nodes that one ``bn_apply`` replaces; see the module docstring."""

    terms: list[Term]
    residuals: list[fx.Node] = field(default_factory=list)
    add: fx.Node | None = None
    act: fx.Node | None = None
    act_kind: str | None = None
    consumer: fx.Node | None = None
    materialized_because: str | None = None

    @property
    def output(self) -> fx.Node:
        """The last node of the apply chain (before the consumer)."""
        return self.act or self.add or self.terms[0].bn

    def replaced(self) -> list[fx.Node]:
        """Nodes the fused operator replaces, in graph order."""
        nodes = [t.bn for t in self.terms] + [n for n in (self.add, self.act, self.consumer) if n is not None]
        order = {n: i for i, n in enumerate(self.output.graph.nodes)}
        return sorted(nodes, key=order.__getitem__)

    @property
    def pattern(self) -> str:
        """Seed 002's name for the connection ("(1)" .. "(4)-2"), or "stem"/"head" for pool consumers."""
        if self.consumer is not None and isinstance(self.consumer.meta.get("bnff_module"), nn.MaxPool2d):
            return "stem"
        if self.consumer is not None and self.consumer.meta.get("bnff_kind") == Kind.AVGPOOL:
            return "head"
        if not self.terms:
            return "(1)"
        if self.add is not None:
            return "(4)-2" if len(self.terms) == 2 else "(4)-1"
        return "(3)" if self.act is not None else "(2)"


@dataclass
class Unfused:
    """A BN, ReLU or Add left as it was, and why."""

    node: fx.Node
    kind: Kind
    reason: str


class _Matcher:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())
        self.graph = gm.graph
        self.info: dict[fx.Node, NodeInfo] = {}
        for n in self.graph.nodes:
            self.info[n] = classify(n, self.modules)
            n.meta["bnff_kind"] = self.info[n].kind
            n.meta["bnff_module"] = self.info[n].module
        self.taken: set[fx.Node] = set()

    def kind(self, n: object) -> Kind | None:
        return self.info[n].kind if isinstance(n, fx.Node) else None

    def sole_user(self, n: fx.Node) -> fx.Node | None:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def term_reason(self, bn: fx.Node) -> str | None:
        """Why ``bn`` cannot be restructured, or None."""
        (src,) = self.info[bn].operands or (None,)
        if src is None:
            return "its input is not a graph value"
        if self.kind(src) != Kind.CONV:
            what = self.info[src].module.__class__.__name__ if self.info[src].module is not None else src.op
            return (f"its input comes from {self.kind(src).value} '{src.name}' ({what}), not a convolution, "
                    f"so the statistics step has no producer to join")
        return None

    def grow(self, bn: fx.Node) -> Group:
        group = Group([Term(bn, self.info[bn].operands[0])])
        cur = bn
        user = self.sole_user(cur)
        if user is not None and self.kind(user) == Kind.ADD and user not in self.taken:
            other = next(a for a in self.info[user].operands if a is not cur)
            if (self.kind(other) == Kind.BN and other not in self.taken and self.term_reason(other) is None
                    and self.sole_user(other) is user):
                group.terms.append(Term(other, self.info[other].operands[0]))
            else:
                group.residuals.append(other)
            group.add = cur = user
        user = self.sole_user(cur)
        if user is not None and self.kind(user) == Kind.ACT and user not in self.taken:
            group.act, group.act_kind = user, self.info[user].act
        self.attach_consumer(group)
        return group

    def attach_consumer(self, group: Group) -> None:
        out = group.output
        if len(out.users) != 1:
            group.materialized_because = f"its result has {len(out.users)} users"
            return
        user = self.sole_user(out)
        module = self.info[user].module
        if user.op != "call_module" or module is None:
            group.materialized_because = f"its user '{user.name}' is not a module"
            return
        reason = consumers.unsupported_reason(module)
        if reason is None and (user.args[:1] != (out,) or len(user.args) != 1 or user.kwargs):
            reason = f"consumer '{user.target}' takes extra arguments"
        if reason is not None:
            group.materialized_because = reason
            return
        group.consumer = user

    def run(self) -> tuple[list[Group], list[Unfused]]:
        groups: list[Group] = []
        unfused: list[Unfused] = []
        for n in list(self.graph.nodes):
            if n in self.taken:
                continue
            k = self.kind(n)
            if k == Kind.BN:
                reason = self.term_reason(n)
                if reason is not None:
                    unfused.append(Unfused(n, k, reason))
                    continue
                group = self.grow(n)
            elif k == Kind.ACT and self.info[n].operands and self.kind(self.info[n].operands[0]) == Kind.CONV:
                group = Group([], residuals=[self.info[n].operands[0]], act=n, act_kind=self.info[n].act)
                self.attach_consumer(group)
                if group.consumer is None:  # materializing relu(conv) saves nothing over eager
                    unfused.append(Unfused(n, k, f"ReLU after a convolution is fused only into a consumer, "
                                                 f"and {group.materialized_because}"))
                    continue
            else:
                continue
            self.taken.update(group.replaced())
            groups.append(group)
        for n in self.graph.nodes:
            k = self.kind(n)
            if n in self.taken or k not in (Kind.ACT, Kind.ADD):
                continue
            if any(u.reason and u.node is n for u in unfused):
                continue
            src = self.info[n].operands[0] if self.info[n].operands else None
            if src is None:
                reason = "its input is not a graph value"
            elif src in self.taken:
                reason = f"its input '{src.name}' has {len(src.users)} users, so it cannot join that group"
            elif k == Kind.ACT:
                reason = (f"its input '{src.name}' is a {self.kind(src).value} that is not fused"
                          if self.kind(src) in (Kind.BN, Kind.ADD) else
                          f"its input '{src.name}' is a {self.kind(src).value}, not a convolution or BN")
            else:
                reason = "neither addend is the output of a fused BN"
            unfused.append(Unfused(n, k, reason))
        for n in self.graph.nodes:  # activations and norms bnff does not handle at all
            if n.op == "call_module" and self.kind(n) == Kind.OTHER:
                m = self.modules[n.target]
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    unfused.append(Unfused(n, Kind.BN, f"{type(m).__name__} is not supported (only BatchNorm2d "
                                                       f"with its standard forward)"))
            elif n.op == "call_function" and n.target is nn.functional.batch_norm:
                unfused.append(Unfused(n, Kind.BN, "functional batch_norm call (not a BatchNorm2d module)"))
        return groups, unfused


def match(gm: fx.GraphModule) -> tuple[list[Group], list[Unfused]]:
    """Find every fusable group in ``gm`` and every BN/ReLU/Add left unfused, with reasons.

    Groups are disjoint and returned in graph order. The graph is not modified (apart from
    ``node.meta`` annotations ``bnff_kind`` and ``bnff_module``).
    """
    return _Matcher(gm).run()
