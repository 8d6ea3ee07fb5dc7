"""The plan describes the execution: bytes recorded while bnff trains equal the plan's ``bnff`` scheme.

``bnff.ops.record.Recorder`` logs, independently of the plan, every operator the fused operators
dispatch with its real tensors (the ``cpu`` backend's kernels, any ATen op), and what autograd keeps.
For a training step of four architectures, group by group, the recorded feature-map bytes of the
forward and of the backward equal the plan's ``bnff`` schedule priced by ``bnff.traffic``, and the
kept bytes equal its keeps, exactly. The ``reference`` backend runs several PyTorch ops per sweep
and is exempt.
"""

import pytest
import torch

import bnff
from bnff import models
from bnff.graph.layers import build
from bnff.ops.backends import cpu
from bnff.ops.record import Recorder
from bnff.plan import plan_graph
from bnff.traffic import Assumptions
from bnff.traffic.account import group_costs
from helpers import randomize_bn

CASES = {"resnet50": 32, "densenet121": 16, "inception_v3": 32, "mobilenet_v2": 16}


def _loss(out):
    return sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_bytes_equal_the_plan(name):
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    gen = torch.Generator().manual_seed(7)
    model = models.MODELS[name](num_classes=10, small_input=True).to(memory_format=torch.channels_last)
    randomize_bn(model, gen)
    hw = CASES[name]
    x = torch.randn(2, 3, hw, hw, generator=gen).to(memory_format=torch.channels_last)
    fused = bnff.restructure(model, backend="cpu")
    calls, fell = cpu.kernel_calls(), cpu.fallbacks()
    with Recorder(model) as rec:
        _loss(fused(x)).backward()
    assert sum((cpu.kernel_calls() - calls).values()) > 0, "the cpu kernels did not run"
    assert not (cpu.fallbacks() - fell), f"sweeps fell back to the reference: {cpu.fallbacks() - fell}"

    lg = build(model, tuple(x.shape))
    plan, _, _ = plan_graph(lg.gm)
    assert plan.as_dict() == bnff.fusion_plan(fused).as_dict(), "analysis and execution planned differently"
    costs = group_costs(lg, plan, "bnff", Assumptions(element_bytes=4))
    assert len(plan.groups) > 10
    mismatches = []
    for g in plan.groups:
        kept = sum(lg.numel(lg.node(r.node)) * 4 for r in g.schedules["bnff"].keeps if not r.vector)
        got = (rec.moved[(g.name, "fp")], rec.moved[(g.name, "bp")], rec.kept[g.name])
        want = (costs[g.name].fp_bytes, costs[g.name].bp_bytes, kept)
        if got != want:
            mismatches.append(f"{g.name} ({g.pattern}): recorded fp/bp/kept {got}, plan {want}; ops "
                              f"{dict(rec.ops.get((g.name, 'fp'), {}))} | {dict(rec.ops.get((g.name, 'bp'), {}))}")
    assert not mismatches, "\n".join(mismatches)
    scopes = {k[0] for k in rec.moved if "/consumer" not in k[0]}
    assert scopes == {g.name for g in plan.groups}, "a group ran no sweep, or something ran outside the plan's groups"
