"""Pattern matching of seed 002's connections on an fx graph (docs/design.md section 4).

A *group* is what one fused operator replaces: one or two BatchNorm1d/2d/3d nodes (their statistics
step joins the layers that produce their input), an optional residual add, an optional
ReLU/ReLU6, and the consumers that take the result as pre-processing:

    (1)   C1 -> ReLU -> C2                       terms=[],      residuals=[C1], act
    (2)   C1 -> BN -> C2                         terms=[BN]
    (3)   C1 -> BN -> ReLU -> C2                 terms=[BN],    act
    (4)-1 C1 -> BN -> Add(x) -> ReLU -> C2       terms=[BN],    residuals=[x], add, act
    (4)-2 C1 -> BN -> Add(C3 -> BN3) -> ReLU     terms=[BN, BN3], add, act
    stem  conv -> BN -> ReLU -> maxpool          the consumer is a max-pool
    head  BN -> [Add ->] ReLU -> avgpool         the consumer is an average pool

A BN's input may be a concatenation along channels of several feature maps (DenseNet): the term
then has several *sources*, each feature map's statistics are computed once by the layer that
produced it and shared by every BN that normalizes it (inter-composite-layer fusion, ICF; seeds
001/004). A source is a layer output: a convolution, a pool, or an earlier group's result.

A squeeze-and-excitation between the result and a layer (``a * gate(avgpool(a))`` feeding a convolution;
MBConv, MobileNetV3, RegNetY) is taken into that consumer: the gate is computed inside it and recomputed
in its backward, so neither ``a`` nor the scaled map is stored (``Group.squeeze``). When that layer is a
1x1 convolution (stride 1, one group), the gate is folded into its weights per sample instead, like F1
into the apply step, and the scaled map is never formed (``Group.gate_folded``).

The result goes to its users as pre-processing when every user accepts it (``bnff.graph.consumers``)
and applying it once per user moves fewer bytes than writing it once (``per_consumer_pays``);
otherwise it is materialized (e.g. a block output feeding a convolution and a shortcut add, or a
branch output feeding a concatenation). Every BN, ReLU and Add that joins no group is returned
with the reason.

A materialized result is still not kept when every layer that would keep it can rebuild it instead
(``rereads``): a convolution whose input is the result of lone groups (one BN, no shortcut), taken
whole, as parts of a split or chunk, upsampled, or concatenated (CSPNet's halves, its transition's
concatenation, a YOLO neck's upsampled map), recomputes those results in its backward from the BN inputs their groups keep
anyway, and so keeps nothing, provided every other user of those results keeps nothing either (a
plain add, another such convolution). Its group's result is then written once in the forward and
freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import operator

import torch
import torch.fx as fx
from torch import nn

from bnff import activations
from bnff.graph import bn_forms, consumers
from bnff.graph.kinds import SPLITS, Kind, NodeInfo, cat_dim, classify, is_mean, is_mul, module_name

_SOURCE_KINDS = (Kind.CONV, Kind.MAXPOOL, Kind.AVGPOOL)
_SQUEEZE_MAX = 16  # nodes in a squeeze-and-excitation gate: a few layers, never a network
_RESHAPES = ("view", "reshape", "flatten", "unsqueeze", "squeeze")
_RESHAPE_FUNCS = (torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze)


def _global_pool(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``n`` averages its input over its spatial dimensions, keeping them as 1s (N, C, 1, 1):
    ``AdaptiveAvgPool1d/2d/3d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3), keepdim=True)``.
    The rank is not known here, so a mean over any dimensions with ``keepdim=True`` counts: the
    consumer that takes the pattern recomputes whatever the gate computes (``GatedConsumer``), so
    only statelessness matters for correctness, which ``gate_layer`` checks."""
    one = (1, (1,), (1, 1), (1, 1, 1), [1, 1])
    if n.op == "call_module":
        m = modules[n.target]
        return isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) and m.output_size in one
    if n.op == "call_function" and n.target is nn.functional.adaptive_avg_pool2d:
        return len(n.args) == 2 and n.args[1] in one and not n.kwargs
    return _mean_dims(n) is not None


def _mean_dims(n: fx.Node) -> tuple[int, ...] | None:
    """The dimensions ``n`` averages over when it is ``x.mean(dims, keepdim=True)`` with int dims, else None."""
    if not is_mean(n):
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    ok = isinstance(dim, (tuple, list)) and len(dim) > 0 and all(isinstance(d, int) for d in dim) and keep is True
    return tuple(dim) if ok else None


def _spatial_mean_2d(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``n`` is a global average pool of a 4-D map over its two spatial dimensions, keeping them as 1s:
    ``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3), keepdim=True)`` (or (-2, -1))."""
    if n.op == "call_module":
        return isinstance(modules[n.target], nn.AdaptiveAvgPool2d) and modules[n.target].output_size in (1, (1, 1))
    if n.op == "call_function" and n.target is nn.functional.adaptive_avg_pool2d:
        return _global_pool(n, modules)
    return sorted(_mean_dims(n) or ()) in ([2, 3], [-2, -1])


def _times(n: fx.Node, x: fx.Node) -> fx.Node | None:
    """The other factor when ``n`` is ``x * other`` or ``other * x`` of two graph values, else None."""
    if not is_mul(n) or n.kwargs or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    a, b = n.args
    return b if a is x and b is not x else a if b is x and a is not x else None


@dataclass
class Term:
    """A fused BN: the BN node, the feature maps it normalizes (their channel concatenation, or
    one map) and the ``torch.cat`` node that joined them (None for a single source)."""

    bn: fx.Node
    sources: list[fx.Node]
    cat: fx.Node | None = None


@dataclass
class Group:
    """Nodes that one ``bn_apply`` replaces; see the module docstring."""

    terms: list[Term]
    residuals: list[fx.Node] = field(default_factory=list)
    add: fx.Node | None = None
    act: fx.Node | None = None
    act_kind: str | None = None
    consumers: list[fx.Node] = field(default_factory=list)
    materialized_because: str | None = None
    squeeze: list[fx.Node] = field(default_factory=list)
    gate_folded: bool = False
    rereaders: list[fx.Node] = field(default_factory=list)

    @property
    def output(self) -> fx.Node:
        """The last node of the apply chain (before the consumers)."""
        return self.act or self.add or self.terms[0].bn

    def members(self) -> list[fx.Node]:
        """The nodes the fused operator absorbs: the BNs, the concatenations only they use, the add
        and the activation (not the consumers, which still run as layers)."""
        nodes = [t.bn for t in self.terms] + [n for n in (self.add, self.act) if n is not None]
        return nodes + [t.cat for t in self.terms if t.cat is not None and len(t.cat.users) == 1]

    def replaced(self) -> list[fx.Node]:
        """Nodes the fused operator replaces, in graph order: its ``members()``, the squeeze-and-excitation
        nodes and the consumers."""
        order = {n: i for i, n in enumerate(self.output.graph.nodes)}
        return sorted(self.members() + self.squeeze + self.consumers, key=order.__getitem__)

    @property
    def pattern(self) -> str:
        """Seed 002's name for the connection ("(1)" .. "(4)-2"), or "stem"/"head" when the only
        consumer is a max-pool / an average pool."""
        kind = self.consumers[0].meta.get("bnff_kind") if len(self.consumers) == 1 else None
        if kind == Kind.MAXPOOL:
            return "stem"
        if kind == Kind.AVGPOOL:
            return "head"
        if not self.terms:
            return "(1)"
        if self.add is not None:
            return "(4)-2" if len(self.terms) == 2 else "(4)-1"
        return "(3)" if self.act is not None else "(2)"


@dataclass
class Reread:
    """A convolution that rebuilds its input in its backward instead of keeping it: the results of
    ``groups`` (their output nodes), passed through ``passage`` (splits, their parts, concatenations,
    ``contiguous``; graph order) to its input."""

    conv: fx.Node
    groups: list[fx.Node]
    passage: list[fx.Node]


@dataclass
class Unfused:
    """A BN, ReLU or Add left as it was, and why."""

    node: fx.Node
    kind: Kind
    reason: str


def per_consumer_pays(n_terms: int, n_residuals: int, n_consumers: int, act: bool) -> bool:
    """Whether a group's result is applied once per consumer (never stored) or materialized: the
    plan's one decision of it (``GroupPlan.consumers``), made on seed 002's ``fused`` scheme, where
    a consumer reads the tensors the result is computed from in place of its ifmap.

    Counted in units of one feature map (all tensors of a group have the result's shape), forward
    plus backward, over what the two choices do differently (seed 002 section 1.2 accounting):

    * once per consumer: each of the k consumers reads the r = terms + residuals tensors the result
      is computed from, in the forward and again in the backward to recompute it: 2kr; the
      activation mask needs the residuals once more (the BN inputs are read anyway): + residuals.
    * materialized: computing it reads r and writes 1; each consumer reads it in the forward and
      the backward: 2k; the mask is read from the saved result when there is a shortcut: + 1.

    With one BN and no shortcut (r = 1) applying per consumer always wins (2k < 2k + 2); with a
    shortcut or a projection (r = 2) it wins for one consumer and loses for two or more. Ties go
    to per-consumer application, which also keeps the smaller footprint.

    The ``bnff`` scheme executes the same grouping with library convolutions; there applying per
    consumer costs a recompute sweep in the backward (reading r, writing a: 2 units for a lone BN)
    and saves keeping a, which is bnff's aim (what can be recomputed is not stored). The plan's
    ``bnff`` schedules count that cost (``bnff plan``).
    """
    r = n_terms + n_residuals
    per_consumer = 2 * n_consumers * r + (n_residuals if act else 0)
    materialized = r + 1 + 2 * n_consumers + (1 if act and n_residuals else 0)
    return per_consumer <= materialized


class _Matcher:
    def __init__(self, gm: fx.GraphModule, exclude: Mapping[str, str]) -> None:
        self.exclude = exclude
        self.modules = dict(gm.named_modules())
        self.graph = gm.graph
        self.info: dict[fx.Node, NodeInfo] = {}
        for n in self.graph.nodes:
            self.info[n] = classify(n, self.modules)
            n.meta["bnff_kind"] = self.info[n].kind
            n.meta["bnff_module"] = self.info[n].module
        self.taken: set[fx.Node] = set()
        self.group_outputs: set[fx.Node] = set()

    def kind(self, n: object) -> Kind | None:
        return self.info[n].kind if isinstance(n, fx.Node) else None

    def sole_user(self, n: fx.Node) -> fx.Node | None:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def describe(self, n: fx.Node) -> str:
        if n.op == "call_module" or self.info[n].kind == Kind.BN:
            return f"{self.kind(n).value} '{module_name(n)}' ({type(self.info[n].module or self.modules[n.target]).__name__})"
        what = getattr(n.target, "__name__", str(n.target)) if n.op in ("call_function", "call_method") else n.op
        return f"{self.kind(n).value} '{n.name}' ({what})"

    def source_reason(self, src: fx.Node) -> str | None:
        """Why the statistics step cannot join the layer producing ``src``, or None."""
        if self.kind(src) in _SOURCE_KINDS or src in self.group_outputs:
            return None
        return (f"its input comes from {self.describe(src)}, not a convolution, pool or fused group, "
                f"so the statistics step has no producer to join")

    def term(self, bn: fx.Node) -> Term | str:
        """The BN's term, or why it cannot be restructured."""
        (src,) = self.info[bn].operands or (None,)
        if src is None:
            return "its input is not a graph value"
        if self.kind(src) == Kind.CAT:
            pieces = list(self.info[src].operands)
            if cat_dim(src) not in (1, -3) or len(pieces) != len(src.args[0]):
                return f"its input '{src.name}' concatenates along a dimension other than channels"
            for p in pieces:
                reason = self.source_reason(p)
                if reason is not None:
                    return f"a part of its input concatenation '{src.name}': {reason}"
            return Term(bn, pieces, src)
        reason = self.source_reason(src)
        return reason if reason is not None else Term(bn, [src])

    def grow(self, term: Term) -> Group:
        group = Group([term])
        cur = term.bn
        user = self.sole_user(cur)
        if user is not None and self.kind(user) == Kind.ADD and user not in self.taken:
            other = next(a for a in self.info[user].operands if a is not cur)
            other_term = self.term(other) if self.kind(other) == Kind.BN and other not in self.taken else None
            if isinstance(other_term, Term) and self.sole_user(other) is user:
                group.terms.append(other_term)
            else:
                group.residuals.append(other)
            group.add = cur = user
        user = self.sole_user(cur)
        if user is not None and self.kind(user) == Kind.ACT and user not in self.taken:
            group.act, group.act_kind = user, self.info[user].act
        self.attach_consumers(group)
        return group

    def consumer_reason(self, user: fx.Node, out: fx.Node) -> str | None:
        """Why ``user`` cannot take ``out`` as its pre-processed input, or None."""
        if user.op == "call_module":
            reason = consumers.unsupported_reason(self.modules[user.target])
            if reason is None and (user.args != (out,) or user.kwargs):
                reason = f"consumer '{user.target}' takes extra arguments"
            return reason
        if user.op == "call_function" and consumers.functional_name(user.target, user.kwargs) is not None:
            tensors: list[fx.Node] = []
            fx.node.map_arg((user.args[1:], user.kwargs), tensors.append)
            if user.args[:1] != (out,) or tensors:
                return f"consumer '{user.name}' takes extra tensor arguments"
            return None
        if self.kind(user) == Kind.CAT:
            return f"'{user.name}' concatenates it (torch.cat takes no pre-processing)"
        return f"its user {self.describe(user)} takes no pre-processing"

    def squeeze_excitation(self, out: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
        """``out``'s squeeze-and-excitation and the layer it feeds, or None: ``out`` has two users, a global
        average pool P and a multiplication M = out * gate, where the gate is computed from P alone
        by parameter layers, activations and reshapes whose values nothing else reads (torchvision's
        ``SqueezeExcitation``, timm's ``SqueezeExcite``), and M feeds one layer that takes pre-processing.

        Returns:
            (the nodes P .. gate, M in graph order, the layer M feeds).
        """
        users = list(out.users)
        if len(users) != 2:
            return None
        pool = next((u for u in users if _global_pool(u, self.modules)), None)
        mul = next((u for u in users if u is not pool and _times(u, out) is not None), None)
        if pool is None or mul is None or len(mul.users) != 1:
            return None
        gate = _times(mul, out)
        inside, todo = {pool}, [gate]
        while todo:
            n = todo.pop()
            if n in inside:
                continue
            if n is out or len(inside) > _SQUEEZE_MAX or not self.gate_layer(n):
                return None
            inside.add(n)
            fx.node.map_arg((n.args, n.kwargs), todo.append)
        if any(u not in inside and u is not mul for n in inside for u in n.users) or len(gate.users) != 1:
            return None
        (layer,) = mul.users
        if self.consumer_reason(layer, mul) is not None:
            return None
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted(inside, key=order.__getitem__) + [mul], layer

    def gate_layer(self, n: fx.Node) -> bool:
        """Whether ``n`` may compute part of a squeeze-and-excitation gate: recomputed in the backward, it
        must be deterministic and keep no state (a convolution, linear layer, activation or reshape; no
        dropout, no BN updating its running statistics)."""
        if self.kind(n) in (Kind.CONV, Kind.LINEAR, Kind.ACT, Kind.FLATTEN):
            return n.op != "call_module" or not any(True for _ in self.modules[n.target].buffers())
        return (n.op == "call_method" and n.target in _RESHAPES) or (n.op == "call_function" and n.target in _RESHAPE_FUNCS)

    def attach_consumers(self, group: Group) -> None:
        out = group.output
        se = self.squeeze_excitation(out)
        if se is not None and per_consumer_pays(len(group.terms), len(group.residuals), 1, group.act is not None):
            group.squeeze, group.consumers = se[0], [se[1]]
            layer = self.modules.get(se[1].target) if se[1].op == "call_module" else None
            group.gate_folded = consumers.pointwise(layer) and _spatial_mean_2d(se[0][0], self.modules)
            return
        users = list(out.users)
        reasons = [(u, self.consumer_reason(u, out)) for u in users]
        bad = [(u, r) for u, r in reasons if r is not None]
        if bad:
            u, r = bad[0]
            group.materialized_because = r if len(users) == 1 else f"its result has {len(users)} users; {r}"
            return
        if not per_consumer_pays(len(group.terms), len(group.residuals), len(users), group.act is not None):
            group.materialized_because = (f"its result has {len(users)} users, and recomputing it for each "
                                          f"would move more bytes than storing it once")
            return
        group.consumers = users

    def run(self) -> tuple[list[Group], list[Unfused]]:
        groups: list[Group] = []
        unfused: list[Unfused] = []
        for n in list(self.graph.nodes):
            if n in self.taken:
                continue
            k = self.kind(n)
            if k == Kind.BN:
                term = self.term(n)
                if isinstance(term, str):
                    unfused.append(Unfused(n, k, term))
                    continue
                group = self.grow(term)
            elif k == Kind.ACT and self.info[n].operands and self.kind(self.info[n].operands[0]) == Kind.CONV:
                group = Group([], residuals=[self.info[n].operands[0]], act=n, act_kind=self.info[n].act)
                self.attach_consumers(group)
                if not group.consumers:  # materializing relu(conv) saves nothing over eager
                    what = activations.spec(self.info[n].act).display
                    unfused.append(Unfused(n, k, f"{what} after a convolution (no BN) is fused only into a "
                                                 f"consumer, and {group.materialized_because}"))
                    continue
            else:
                continue
            why = self.exclude.get(group.output.name)
            if why is not None:  # left as eager runs it; its nodes stay free for later groups' rules
                unfused += [Unfused(m, self.kind(m), why) for m in group.members() if self.kind(m) != Kind.CAT]
                continue
            self.taken.update(group.replaced())
            self.group_outputs.add(group.output)
            groups.append(group)
        unfused += self.leftovers(unfused)
        return groups, unfused, self.rereads(groups)

    def passage(self, n: fx.Node) -> bool:
        """``n`` only rearranges tensors and keeps nothing for its backward: a split or chunk, a part of
        one, a concatenation, ``contiguous``, an interpolation (``nn.Upsample``, ``F.interpolate``)."""
        if n.op == "call_module":
            return isinstance(self.modules[n.target], nn.Upsample)
        if n.op == "call_function" and n.target is nn.functional.interpolate:
            return True
        if n.op == "call_function" and n.target is operator.getitem:
            return isinstance(n.args[0], fx.Node) and self.passage(n.args[0])
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None)
        return (self.kind(n) == Kind.CAT or (n.op in ("call_method", "call_function") and name in SPLITS)
                or (n.op == "call_method" and n.target == "contiguous"))

    def rebuilt_from(self, n: fx.Node, leaves: set[fx.Node], path: list[fx.Node]) -> list[fx.Node] | None:
        """The leaves ``n`` is made of through passage nodes (appended to ``path``), or None."""
        if n in leaves:
            return [n]
        if n in self.taken or not self.passage(n):
            return None
        parts: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), parts.append)
        found: list[fx.Node] = []
        for p in parts:
            got = self.rebuilt_from(p, leaves, path)
            if got is None:
                return None
            found += [g for g in got if g not in found]
        if n not in path:
            path.append(n)
        return found

    def keeps_nothing(self, n: fx.Node, rereaders: set[fx.Node]) -> bool:
        """No user of ``n`` keeps it: each is a rereading convolution, a plain add outside the groups,
        or a passage node whose users keep nothing."""
        for u in n.users:
            if u in rereaders or (self.kind(u) == Kind.ADD and u not in self.taken):
                continue
            if u in self.taken or not self.passage(u) or not self.keeps_nothing(u, rereaders):
                return False
        return True

    def rereads(self, groups: list[Group]) -> list[Reread]:
        """The convolutions that rebuild their input from lone groups' results (module docstring), each
        admitted only when, with the others, it lets every result it reads go unkept; the groups'
        ``rereaders`` are set."""
        leaves = {g.output: g for g in groups if not g.consumers and not g.residuals and len(g.terms) == 1}
        found: dict[fx.Node, Reread] = {}
        for n in self.graph.nodes:
            if self.kind(n) != Kind.CONV or n in self.taken or n.op != "call_module" or len(n.args) != 1 or n.kwargs:
                continue
            if consumers.unsupported_reason(self.modules[n.target]) is not None or not isinstance(n.args[0], fx.Node):
                continue
            path: list[fx.Node] = []
            made = self.rebuilt_from(n.args[0], set(leaves), path)
            if made:
                order = {m: i for i, m in enumerate(self.graph.nodes)}
                found[n] = Reread(n, made, sorted(path, key=order.__getitem__))
        while True:  # drop the convolutions whose results another user keeps anyway, until none is left to drop
            keep = {c: r for c, r in found.items() if all(self.keeps_nothing(g, set(found)) for g in r.groups)}
            if len(keep) == len(found):
                break
            found = keep
        for r in found.values():
            for g in r.groups:
                leaves[g].rereaders.append(r.conv)
        return list(found.values())

    def leftovers(self, unfused: list[Unfused]) -> list[Unfused]:
        """Every activation and add outside the groups, and norms bnff does not handle at all."""
        out = []
        seen = {u.node for u in unfused}
        for n in self.graph.nodes:
            k = self.kind(n)
            if n in self.taken or n in seen or k not in (Kind.ACT, Kind.ADD):
                continue
            src = self.info[n].operands[0] if self.info[n].operands else None
            if src is None:
                reason = "its input is not a graph value"
            elif k == Kind.ADD and any(o in self.group_outputs and self.kind(o) == Kind.ACT and len(o.users) == 1
                                       for o in self.info[n].operands):
                ending = next(o for o in self.info[n].operands if o in self.group_outputs)
                reason = (f"it adds after the activation of the group ending at '{ending.name}' (BN -> activation -> +, "
                          f"as in Darknet blocks); a group adds its shortcut before its activation (seed 002's "
                          f"patterns (4))")
            elif src in self.taken:
                reason = f"its input '{src.name}' has {len(src.users)} users, so it cannot join that group"
            elif k == Kind.ACT:
                reason = (f"its input '{src.name}' is a {self.kind(src).value} that is not fused"
                          if self.kind(src) in (Kind.BN, Kind.ADD) else
                          f"its input '{src.name}' is a {self.kind(src).value}, not a convolution or BN")
            else:
                reason = "neither addend is the output of a fused BN"
            out.append(Unfused(n, k, reason))
        for n in self.graph.nodes:
            m = self.info[n].module
            if n.op == "call_function" and n.target in (nn.functional.batch_norm, torch.batch_norm):
                out.append(Unfused(n, Kind.BN, n.meta.get(bn_forms.WHY, "functional batch_norm call")))
            elif n.op == "call_module" and bn_forms.is_frozen_bn(self.modules[n.target]):
                out.append(Unfused(n, Kind.BN, f"{type(self.modules[n.target]).__name__} is a frozen BN (a fixed "
                                               f"per-channel affine map, no statistics): left as it is"))
            elif self.kind(n) == Kind.OTHER and isinstance(m, nn.modules.batchnorm._BatchNorm):
                out.append(Unfused(n, Kind.BN, n.meta.get(bn_forms.WHY) or (
                    f"{type(m).__name__} is not supported (BatchNorm1d/2d/3d and SyncBatchNorm, with their standard "
                    f"forward or as BN followed by their activation)")))
        return out


def match(gm: fx.GraphModule, exclude: Mapping[str, str] | None = None
          ) -> tuple[list[Group], list[Unfused], list[Reread]]:
    """Find every fusable group in ``gm``, every BN/ReLU/Add left unfused, with reasons, and the
    convolutions that rebuild their input from groups' results (``Reread``; module docstring).

    Groups are disjoint and returned in graph order. The graph is not modified (apart from
    ``node.meta`` annotations ``bnff_kind`` and ``bnff_module``).

    Args:
        gm: the traced model.
        exclude: group name (its output node) -> reason: such a group is not formed; its BN, add
            and activation nodes are returned as unfused with that reason (``prefer="speed"``).
    """
    return _Matcher(gm, exclude or {}).run()
