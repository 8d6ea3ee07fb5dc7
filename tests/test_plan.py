"""The fusion plan: its layering, its step lists against hand counts, that execution follows it, the CLI."""

import json
import subprocess
import sys

import pytest
import torch

import bnff
from bnff import cli, models
from bnff.graph.layers import build
from bnff.ops.backends import cpu
from bnff.ops.record import Recorder
from bnff.plan import GroupPlan, plan_graph
from bnff.traffic import Assumptions
from bnff.traffic.account import group_costs
from bnff.traffic.patterns import Pattern


def test_import_traffic_loads_no_execution_code():
    """``import bnff.traffic`` (and the plan) in a fresh interpreter loads neither the rewriting nor the operators."""
    code = ("import sys, bnff.traffic, bnff.plan; "
            "print(sorted(m for m in sys.modules if m.startswith(('bnff.ops', 'bnff.restructure', "
            "'torch.utils.cpp_extension'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# Hand counts of the bnff scheme on seed 002's patterns, in units of one feature map (every map of a
# pattern has one shape), from the sweeps bnff runs (not from the plan):
#   (2)/(3): fp stats(x) 1 + apply(x -> a) 2 = 3;
#            bp recompute(x -> a) 2 + grad_stats_x(g_a, x) 2 + input_grad_x(g_a, x -> dx) 3 = 7.
#   (4)-1:   a is materialized (it also leaves as the next block's shortcut) and kept for its mask;
#            fp stats 1 + apply(x, r -> a) 3 = 4; bp grad_stats(g_a, a, x -> dy) 4 + input_grad(dy, x -> dx) 3
#            = 7, plus autograd summing the two users' gradients of a (read 2, write 1) = 10.
#   (4)-2:   the same with two BNs: fp stats 2 + apply(x1, x2 -> a) 3 = 5; bp grad_stats(g_a, a, x1, x2 -> dy)
#            5 + input_grad 3 per BN + the sum of a's two gradients 3 = 14.
HAND = {"(2)": (3, 7), "(3)": (3, 7), "(4)-1": (4, 10), "(4)-2": (5, 14)}


@pytest.mark.parametrize("name", sorted(HAND))
def test_bnff_scheme_matches_hand_count(name):
    shape = (2, 8, 8, 8)
    unit = 2 * 8 * 8 * 8 * 4
    from bnff.traffic import analyze

    mi = analyze(Pattern(name, 8), shape, dtype=None, scheme="bnff",
                 assumptions=Assumptions(count_layer_io=False)).memory_intensive()
    assert (mi["fp_bytes"] / unit, mi["bp_bytes"] / unit) == HAND[name]


def test_plan_is_plain_data_and_json():
    lg = build(models.resnet18(num_classes=10, small_input=True), (2, 3, 32, 32))
    plan, groups, _ = plan_graph(lg.gm)
    data = json.loads(plan.to_json())
    assert [g["name"] for g in data["groups"]] == [g.output.name for g in groups]
    by_name = {g["name"]: g for g in data["groups"]}
    assert plan.group("layer1_0_relu").consumers == ("layer1_0_conv2",)
    with pytest.raises(KeyError, match="no fused group 'layer1_0_conv2'"):
        plan.group("layer1_0_conv2")
    assert all(set(g["schedules"]) == {"unfused", "bnff", "bnff_pw", "fused"} for g in data["groups"])

    def kinds(name):
        return [s["kind"] for s in by_name[name]["schedules"]["bnff"]["backward"]]
    # the small-input stem (no max-pool) feeds a block's conv and its shortcut: materialized, lone BN
    assert kinds("relu") == ["grad_stats_x", "input_grad_x"]
    assert kinds("layer1_0_relu") == ["recompute", "consumer_backward", "grad_stats_x", "input_grad_x"]
    assert kinds("layer2_0_relu_1") == ["grad_stats", "input_grad", "input_grad"]  # (4)-2: a kept for the mask


def _lone_groups_written_dy(monkeypatch):
    """A plan in which no group counts as lone: every backward writes dy (grad_stats + input_grad)."""
    monkeypatch.setattr(GroupPlan, "lone", property(lambda self: False))


def test_execution_follows_the_plan(monkeypatch):
    """Change the plan and the execution changes with it: the recorder sees the mutated plan's bytes,
    not the original's, and the gradients stay those of the original."""
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    gen = torch.Generator().manual_seed(3)
    model = models.resnet18(num_classes=10, small_input=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    lg = build(model, tuple(x.shape))
    before = group_costs(lg, plan_graph(lg.gm)[0], "bnff", Assumptions())

    def step(m):
        model.zero_grad(set_to_none=True)
        with Recorder(model) as rec:
            m(x).square().mean().backward()
        return rec, [p.grad.clone() for p in model.parameters()]

    _, want = step(bnff.restructure(model, backend="cpu"))
    _lone_groups_written_dy(monkeypatch)
    rec, got = step(bnff.restructure(model, backend="cpu"))
    plan = plan_graph(build(model, tuple(x.shape)).gm)[0]
    after = group_costs(lg, plan, "bnff", Assumptions())
    changed = [g for g in plan.groups if after[g.name] != before[g.name]]
    assert changed and all("grad_stats" in g.schedules["bnff"].kinds("bp") for g in changed)
    for g in plan.groups:
        assert rec.moved[(g.name, "bp")] == after[g.name].bp_bytes
    for g in changed:
        assert rec.moved[(g.name, "bp")] != before[g.name].bp_bytes
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_plan_cli_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "densenet121", "--batch", "2", "--image-size", "64", "--steps",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fusion plan, scheme bnff" in out and "input_grad" in out and "ICF" in out
    data = json.loads(path.read_text())
    assert data["input_shape"] == [2, 3, 64, 64]
    costs = data["costs"]["bnff"]
    assert len(costs) == len(data["groups"]) > 50
    assert all(c["fp_bytes"] > 0 and c["bp_bytes"] > 0 for c in costs.values())
    assert cli.main(["plan", "--model", "resnet18", "--scheme", "fused", "--quiet"]) == 0


def test_naming_the_cpu_backend_in_a_fresh_process_builds_its_kernels_on_first_use():
    """``restructure(model, backend="cpu")`` with nothing loaded yet: the first sweep loads the kernels."""
    code = ("import torch, bnff; from bnff import models; from bnff.ops.backends import cpu; "
            "m = models.resnet18(num_classes=10, small_input=True); "
            "bnff.restructure(m, backend='cpu')(torch.randn(2, 3, 16, 16)).sum().backward(); "
            "print(sum(cpu.kernel_calls().values()) > 0, sum(cpu.fallbacks().values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "0"], out.stdout
