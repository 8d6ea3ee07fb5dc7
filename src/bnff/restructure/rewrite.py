"""Rewrite matched groups into ``feature_statistics`` / ``bn_statistics`` / ``bn_apply`` calls.

One small graph pass. For each group:

    c = conv(x)                                   # unchanged: the producer of a feature map
    st_c = feature_statistics(c, (bn, ...))       # step 1, right after the producer, once per map
    ...
    st = bn_statistics((c, ...), (st_c, ...), bn, backend)  # the BN's statistics: its maps' (ICF), running stats
    gp = self._bnff_groups["<group>"]              # the group's plan (bnff.plan.GroupPlan)
    out = bn_apply(gp, (((c, ...), st, bn), ...), residuals, (consumer, ...))   # step 2 (+add, act, consumers)
    y_i = out[i]                                  # each consumer's output

Modules are passed to the operators as ``get_attr`` nodes (one per module, at the top of the graph),
so the rewritten module keeps the original BatchNorm2d and Conv2d objects (same parameters, buffers
and ``state_dict`` keys) and the operators read their mode, momentum and eps at call time. Functional pool consumers travel as
``(name, args, kwargs)``. The group plans live in the module's ``_bnff_groups`` attribute (group
name -> ``GroupPlan``), which the graph reads with ``get_attr``.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from bnff.graph import consumers
from bnff.graph.kinds import module_name
from bnff.ops import fused
from bnff.ops import reread as reread_op
from bnff.plan import FusionPlan, RereadPlan
from bnff.plan.match import Group

PLANS_ATTR = "_bnff_groups"
GATES_ATTR = "_bnff_gates"
REBUILDS_ATTR = "_bnff_rebuilds"


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, plan: FusionPlan, groups: list[Group], backend: str) -> None:
        self.gm, self.graph, self.backend, self.plan = gm, gm.graph, backend, plan
        self.owner = plan.owner_of_stats()
        # A consumer is replaced by its group's output and is often the producer of a later
        # group's BN input or shortcut: later groups look those nodes up here.
        self.replaced_by: dict[fx.Node, fx.Node] = {}
        self.applied: dict[str, fx.Node] = {}  # group name -> its bn_apply node
        self.stats: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.top: set[fx.Node] = set()
        self.bns_of_source: dict[fx.Node, list[str]] = {}
        for g in groups:
            for t in g.terms:
                for s in t.sources:
                    self.bns_of_source.setdefault(s, []).append(module_name(t.bn))

    def resolve(self, n: fx.Node) -> fx.Node:
        return self.replaced_by.get(n, n)

    def attr(self, target: str) -> fx.Node:
        """The ``get_attr`` node of the module ``target``: one per module, at the top of the graph (after
        the inputs), shared by all its uses. A DenseNet BN is named by the statistics step of every map
        it normalizes; one node per use would walk its dotted path (a ``Module.__getattr__`` per level)
        some ten times per forward."""
        if target not in self.attrs:
            first = next(n for n in self.graph.nodes if n.op != "placeholder" and n not in self.top)
            with self.graph.inserting_before(first):  # after the inputs and the earlier ones, in order of use
                self.attrs[target] = self.graph.get_attr(target)
            self.top.add(self.attrs[target])
        return self.attrs[target]

    def feature_stats(self, source: fx.Node) -> fx.Node:
        """The ``feature_statistics`` node of ``source``, created right after its producer on first use."""
        if source not in self.stats:
            producer = self.resolve(source)
            with self.graph.inserting_after(producer):
                st = self.graph.call_function(fused.feature_statistics, (producer, (), self.backend))
            st.args = (producer, tuple(self.attr(t) for t in self.bns_of_source[source]), self.backend,
                       self.owner[source.name])
            self.stats[source] = st
        return self.stats[source]

    def gate(self, group: Group) -> fx.Node:
        """The squeeze-and-excitation gate of ``group`` as a module of its own, ``a -> gate`` (N, C, 1, 1), or,
        with the gate folded into the consumer, ``pooled -> gate`` (the consumer pools): its nodes (global
        pool .. gate, not the multiplication) copied into a ``GraphModule`` that shares
        the model's layers, kept in the plain attribute ``GATES_ATTR`` (not a submodule: the model's
        ``state_dict`` keys do not change), and the graph node that fetches it."""
        sub = fx.Graph()
        # with the gate folded, FoldedGateConsumer pools itself: the module maps the pooled (N, C, 1, 1)
        env = {group.squeeze[0]: sub.placeholder("pooled")} if group.gate_folded else {group.output: sub.placeholder("a")}
        for n in group.squeeze[:-1]:
            if n not in env:
                env[n] = sub.node_copy(n, env.__getitem__)
        sub.output(env[group.squeeze[-2]])
        getattr(self.gm, GATES_ATTR)[group.output.name] = fx.GraphModule(self.gm, sub, "SqueezeExcitationGate")
        with self.graph.inserting_before(group.output):
            gates = self.graph.create_node("get_attr", GATES_ATTR)
            return self.graph.call_function(operator.getitem, (gates, group.output.name))

    def consumer_arg(self, node: fx.Node):
        if node.op == "call_module":
            return self.attr(str(node.target))
        name = consumers.functional_name(node.target, node.kwargs)
        return (name, tuple(node.args[1:]), dict(node.kwargs))

    def group(self, group: Group) -> None:
        graph, out = self.graph, group.output
        terms = []
        for term in group.terms:
            stats = tuple(self.feature_stats(s) for s in term.sources)
            sources = tuple(self.resolve(s) for s in term.sources)
            bn = self.attr(module_name(term.bn))
            with graph.inserting_before(out):
                st = graph.call_function(fused.bn_statistics, (sources, stats, bn, self.backend))
            terms.append((sources, st, bn))
        residuals = tuple(self.resolve(r) for r in group.residuals)
        layers = tuple(self.consumer_arg(c) for c in group.consumers)
        if group.squeeze:  # the gate in front of the one consumer
            layers = ((self.gate(group), layers[0], group.gate_folded),)
        with graph.inserting_before(out):
            plans = graph.create_node("get_attr", PLANS_ATTR)  # a plain attribute: get_attr() would warn
            gp = graph.call_function(operator.getitem, (plans, out.name))
            new = graph.call_function(fused.bn_apply, (gp, tuple(terms), residuals, layers, self.backend))
        self.applied[out.name] = new
        if not group.consumers:
            new.meta.update(out.meta)
            out.replace_all_uses_with(new)
            self.replaced_by[out] = new
        cursor = new
        for i, c in enumerate(group.consumers):
            with graph.inserting_after(cursor):
                cursor = graph.call_function(operator.getitem, (new, i))
            cursor.meta.update(c.meta)
            c.replace_all_uses_with(cursor)
            self.replaced_by[c] = cursor
        # a bn_forms.batch_norm call's module (a get_attr node), read by nothing else once the call is gone
        modules = [t.bn.args[1] for t in group.terms if t.bn.op == "call_function"]
        for node in reversed(group.replaced()):
            graph.erase_node(node)
        for module in modules:
            if not module.users:
                graph.erase_node(module)


    def reread(self, reread: RereadPlan) -> None:
        """Replace the convolution ``reread.conv`` by ``conv_reread``: its input's path from the groups'
        ``bn_apply`` nodes (splits, parts, concatenations) copied into a ``GraphModule`` of its own, kept in
        the plain attribute ``REBUILDS_ATTR``, which the backward runs on the recomputed results."""
        graph = self.graph
        conv = next(n for n in graph.nodes if n.name == reread.conv)
        leaves = [self.applied[g] for g in reread.groups]
        sub = fx.Graph()
        env = {leaf: sub.placeholder(f"a{i}") for i, leaf in enumerate(leaves)}

        def copy(n: fx.Node) -> fx.Node:
            if n not in env:
                fx.node.map_arg((n.args, n.kwargs), copy)
                env[n] = sub.node_copy(n, env.__getitem__)
            return env[n]
        sub.output(copy(conv.args[0]))
        getattr(self.gm, REBUILDS_ATTR)[conv.name] = fx.GraphModule(self.gm, sub, "Rebuild")
        with graph.inserting_before(conv):
            rebuilds = graph.create_node("get_attr", REBUILDS_ATTR)
            rebuild = graph.call_function(operator.getitem, (rebuilds, conv.name))
            new = graph.call_function(reread_op.conv_reread, (
                conv.args[0], self.attr(str(conv.target)), rebuild,
                tuple((leaf.args[0], leaf.args[1]) for leaf in leaves), self.backend, conv.name))
        new.meta.update(conv.meta)
        conv.replace_all_uses_with(new)
        graph.erase_node(conv)


def rewrite(gm: fx.GraphModule, plan: FusionPlan, groups: list[Group], backend: str) -> None:
    """Replace every group in ``gm.graph`` by fused operators executing ``plan`` and every rereading
    convolution by ``conv_reread``, in place; store the group plans in ``gm._bnff_groups``, the
    squeeze-and-excitation gates in ``gm._bnff_gates``, the rereaders' input paths in
    ``gm._bnff_rebuilds`` and recompile ``gm``.

    ``groups`` are the fx groups ``plan`` was made from (``bnff.plan.plan_graph``), in the same order.
    """
    setattr(gm, PLANS_ATTR, {g.name: g for g in plan.groups})
    setattr(gm, GATES_ATTR, {})
    setattr(gm, REBUILDS_ATTR, {})
    r = _Rewriter(gm, plan, groups, backend)
    for group in groups:
        r.group(group)
    for reread in plan.rereads:
        r.reread(reread)
    gm.graph.lint()
    gm.recompile()
