"""``prefer="speed"`` (issue 14): each group is timed fused and eager on this CPU, and the groups
slower fused are left as eager runs them; the model still trains exactly like eager."""

from __future__ import annotations

import copy

import pytest
import torch

import bnff
from bnff import models
from bnff.restructure import prefer
from helpers import FLOAT64_BOUND, every_backend, randomize_bn, reference_only, rel_err  # noqa: F401


def _prefer_unfused_bns(model) -> set[str]:
    return {u.node for u in bnff.fusion_plan(model).unfused if u.kind == "bn" and u.reason.startswith("prefer='speed'")}


def test_measured_times_decide_and_the_plan_and_report_say_so(gen):
    model = models.resnet18(num_classes=10, small_input=True)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    before = copy.deepcopy(model.state_dict())
    fused = bnff.restructure(model, prefer="speed", example_input=x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # timing used a copy
    plain = bnff.restructure(copy.deepcopy(model))
    report, plan = bnff.fusion_report(fused), bnff.fusion_plan(plain)
    assert report.prefer == "speed"
    assert list(report.timings) == [g.name for g in plan.groups]  # every fusable group timed
    assert all(t.fused_s > 0 and t.eager_s > 0 for t in report.timings.values())
    slower = [n for n, t in report.timings.items() if t.fused_s > (1 + prefer.MARGIN) * t.eager_s]
    assert len(report.groups) == len(plan.groups) - len(slower)
    assert _prefer_unfused_bns(fused) == {t.bn for n in slower for t in plan.group(n).terms}
    text = str(report)
    assert "prefer='speed'" in text and all(n in text for n in report.timings)
    fused(x).sum().backward()


@pytest.mark.parametrize("name", ["densenet121", "mobilenet_v2"])
@reference_only
def test_every_group_of_other_families_is_timed(name, gen):
    """DenseNet: statistics of a concatenation's maps carried by earlier groups; MobileNetV2: ReLU6
    and materialized residual sums."""
    model = models.MODELS[name](num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    timings = prefer.measure(model, x, "reference", reps=1)
    plan = bnff.fusion_plan(bnff.restructure(copy.deepcopy(model)))
    assert list(timings) == [g.name for g in plan.groups]
    assert all(t.fused_s > 0 and t.eager_s > 0 for t in timings.values())


@reference_only
def test_a_mix_of_fused_and_eager_groups_trains_exactly_like_eager(gen, monkeypatch):
    """Half the groups (every other one) timed slower fused: those run as eager runs them, the rest
    fused; float64 outputs, input and parameter gradients and running statistics over two SGD steps
    equal eager's."""
    model = models.resnet18(num_classes=10, small_input=True).double()
    randomize_bn(model, gen)
    names = [g.name for g in bnff.fusion_plan(bnff.restructure(copy.deepcopy(model))).groups]
    fake = {n: prefer.GroupTiming(2e-3 if i % 2 else 1e-3, 1e-3) for i, n in enumerate(names)}
    monkeypatch.setattr(bnff.restructure, "measure", lambda *a, **k: fake)
    x0 = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    fused = bnff.restructure(copy.deepcopy(model), prefer="speed", example_input=x0)
    assert len(bnff.fusion_report(fused).groups) == len(names) - len(names) // 2
    assert _prefer_unfused_bns(fused)  # some BNs did stay unfused
    eager = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, fused)]
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
        grads = []
        for m, opt in zip((eager, fused), opts):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(y, torch.arange(4)).backward()
            grads.append((y, xi.grad, [p.grad.clone() for p in m.parameters()]))
            opt.step()
        (ye, ge, pe), (yf, gf, pf) = grads
        assert rel_err(yf, ye) <= FLOAT64_BOUND and rel_err(gf, ge) <= FLOAT64_BOUND
        scale = max(g.abs().max().item() for g in pe)
        assert max(rel_err(a, b, floor=1e-2 * scale) for a, b in zip(pf, pe)) <= FLOAT64_BOUND
        assert max(rel_err(a, b, floor=1.0) for a, b in zip(fused.buffers(), eager.buffers())) <= FLOAT64_BOUND


@reference_only
def test_bad_prefer_arguments_name_the_way_out():
    model = models.resnet18(num_classes=10, small_input=True)
    with pytest.raises(ValueError, match="prefer must be one of 'memory', 'speed'"):
        bnff.restructure(model, prefer="fast")
    with pytest.raises(ValueError, match="needs example_input"):
        bnff.restructure(model, prefer="speed")
