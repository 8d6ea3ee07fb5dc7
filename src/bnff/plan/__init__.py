"""``bnff.plan``: the fusion plan, the one source of truth of what each fused group does.

Data flows one way: model -> ``bnff.graph`` (trace, node kinds) -> ``bnff.plan`` (``match``
finds the groups; ``schemes`` writes, per group and execution scheme, the ordered steps of the
forward and backward with the tensors each reads, writes, keeps and recomputes, and its FLOPs)
-> execution (``bnff.restructure`` / ``bnff.ops``) or analysis (``bnff.traffic``). Nothing here
imports execution code.
"""

from bnff.plan.fusion import FusionPlan, RereadPlan, UnfusedPlan, plan_graph, steps_table
from bnff.plan.group import GroupPlan, TermPlan
from bnff.plan.schemes import SCHEMES, eager_steps
from bnff.plan.steps import Flop, Ref, Schedule, Step

__all__ = ["Flop", "FusionPlan", "GroupPlan", "Ref", "RereadPlan", "SCHEMES", "Schedule", "Step", "TermPlan", "UnfusedPlan",
           "eager_steps", "plan_graph", "steps_table"]
