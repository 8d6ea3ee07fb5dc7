"""Rewrite matched groups into ``bn_statistics`` / ``bn_apply`` calls (one small graph pass).

For each group:

    c = conv(x)                                  # unchanged: the producer
    st = bn_statistics(c, bn)                    # step 1, placed right after the producer
    out = bn_apply(((c, st, bn), ...), residuals, act, consumer)   # step 2 (+add, act, consumer)

Modules are passed to the operators as ``get_attr`` nodes, so the rewritten module keeps the
original BatchNorm2d and Conv2d objects (same parameters, buffers and ``state_dict`` keys) and the
operators read their mode, momentum and eps at call time.
"""

from __future__ import annotations

import torch.fx as fx

from bnff.ops import fused
from bnff.restructure.match import Group


def rewrite(gm: fx.GraphModule, groups: list[Group], backend: str) -> None:
    """Replace every group in ``gm.graph`` by fused operators, in place, and recompile ``gm``."""
    graph = gm.graph
    # A consumer convolution is replaced by its group's bn_apply node, and is often the producer of
    # a later group's BN: later groups look their producers and residuals up here.
    replaced_by: dict[fx.Node, fx.Node] = {}
    for group in groups:
        terms = []
        for term in group.terms:
            producer = replaced_by.get(term.producer, term.producer)
            with graph.inserting_after(producer):
                bn_attr = graph.get_attr(term.bn.target)
            with graph.inserting_after(bn_attr):
                stats = graph.call_function(fused.bn_statistics, (producer, bn_attr, backend))
            terms.append((producer, stats, bn_attr))
        residuals = tuple(replaced_by.get(r, r) for r in group.residuals)
        last = group.consumer or group.output
        with graph.inserting_before(last):
            consumer = graph.get_attr(group.consumer.target) if group.consumer is not None else None
            new = graph.call_function(fused.bn_apply, (tuple(terms), residuals, group.act_kind, consumer, backend))
        new.meta.update(last.meta)
        last.replace_all_uses_with(new)
        replaced_by[last] = new
        for node in reversed(group.replaced()):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
