"""``bnff plan``: a model's fusion plan as a per-group table (bytes at a given input) and as JSON."""

from __future__ import annotations

from rich.table import Table

from bnff.graph.layers import LayerGraph
from bnff.plan import SCHEMES, FusionPlan, steps_table
from bnff.traffic.account import GroupCost, group_costs
from bnff.traffic.assumptions import Assumptions

MiB = 2 ** 20


def _what(g) -> str:
    parts = [f"{len(g.terms)}xBN" if len(g.terms) > 1 else "BN"] if g.terms else []
    parts += ["ICF"] if any(len(t.sources) > 1 for t in g.terms) else []
    parts += ["Add"] if g.add else []
    parts += [g.act_kind] if g.act_kind else []
    return "+".join(parts)


def plan_table(lg: LayerGraph, plan: FusionPlan, scheme: str, a: Assumptions) -> Table:
    """One row per fused group: pattern, members, where the result goes, the steps of ``scheme`` and
    their bytes (MiB) at ``lg``'s input shape."""
    costs = group_costs(lg, plan, scheme, a)
    t = Table(title=f"fusion plan, scheme {scheme}, input {tuple(lg.input_shape)}, {a.element_bytes}-byte elements "
                    f"(steps: forward | backward)")
    for col in ("group", "pattern", "fuses", "result goes to", "steps", "fp MiB", "bp MiB", "kept MiB"):
        t.add_column(col, justify="right" if "MiB" in col else "left", overflow="fold")
    for g in plan.groups:
        c: GroupCost = costs[g.name]
        sched = g.schedules[scheme]
        dest = ", ".join(g.consumers) if g.per_consumer else "materialized" + (
            f", reread by {', '.join(g.rereaders)}" if g.rereaders else "")
        steps = " ".join(sched.kinds("fp")) + " | " + " ".join(sched.kinds("bp"))
        t.add_row(g.name, g.pattern, _what(g), dest, steps, f"{c.fp_bytes / MiB:.2f}", f"{c.bp_bytes / MiB:.2f}",
                  f"{c.kept_bytes / MiB:.2f}")
    total = [sum(getattr(c, f) for c in costs.values()) / MiB for f in ("fp_bytes", "bp_bytes", "kept_bytes")]
    t.add_row("all groups", "", "", "", "", *(f"{v:.2f}" for v in total))
    return t


def steps_text_table(plan: FusionPlan, scheme: str) -> Table:
    """Every step of every group under ``scheme`` with the tensors it reads, writes, keeps, recomputes."""
    t = Table(title=f"fusion plan steps, scheme {scheme}")
    rows = steps_table(plan, scheme)
    for col in ("group", "phase", "kind", "reads", "writes", "keeps", "recomputes"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(r[c] for c in ("group", "phase", "kind", "reads", "writes", "keeps", "recomputes")))
    return t


def plan_json(lg: LayerGraph, plan: FusionPlan, a: Assumptions) -> dict:
    """The plan (``FusionPlan.as_dict``) with every group's bytes and FLOPs per scheme at ``lg``'s input."""
    out = plan.as_dict()
    out["input_shape"] = list(lg.input_shape)
    out["element_bytes"] = a.element_bytes
    out["costs"] = {s: {name: vars(c) for name, c in group_costs(lg, plan, s, a).items()} for s in SCHEMES}
    return out


__all__ = ["plan_json", "plan_table", "steps_text_table"]
