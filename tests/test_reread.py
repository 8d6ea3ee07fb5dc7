"""Convolutions that rebuild their input in the backward instead of keeping it (``bnff.plan.RereadPlan``,
``bnff.ops.reread``): CSPNet's transition convolution reads a concatenation of two groups' results (one
of them half of a split) and its first block's convolution the other half. Eager keeps the
concatenation and the split result; bnff keeps neither, recomputes both from the BN inputs the groups
keep anyway, bit for bit the forward's, and trains as eager does (float64; fp32 and bf16 by the suite's
rule on both backends). The footprint model and the byte recorder agree with what runs."""


import pytest
import torch
from torch import nn

import bnff
from bnff.models.cspdarknet import ConvNormAct, CrossStage
from bnff.ops import reread
from bnff.ops.backends import cpu
from helpers import (assert_as_accurate_as_eager, assert_float64_exact, assert_moves_what_the_plan_says,
                     compare_with_float64, measured_footprints, randomize_bn, reference_only)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

pytestmark = pytest.mark.exactness


class Stage(nn.Module):
    """A stem, two cross-stage-partial stages as timm builds CSPDarknet's (the first with expand ratio 2,
    as its first stage), a classifier head."""

    def __init__(self, w: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, w, 3)
        self.s1 = CrossStage(w, 2 * w, 1, 1, expand_ratio=2.0, bottle_ratio=0.5, block_ratio=1.0)
        self.s2 = CrossStage(2 * w, 4 * w, 2, 2, expand_ratio=1.0, bottle_ratio=1.0, block_ratio=0.5)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.s2(self.s1(self.stem(x))).mean((2, 3)))


def _model(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 16, (1,), generator=gen)))
    model = Stage()
    randomize_bn(model, gen)
    return model


def _batch(gen, n=2, hw=12):
    return lambda: (torch.randn(n, 3, hw, hw, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@reference_only
def test_the_split_halves_and_the_concatenation_are_reread():
    plan = bnff.fusion_plan(bnff.restructure(Stage()))
    got = {r.conv: (r.groups, r.cats) for r in plan.rereads}
    assert got == {
        "s1_blocks_0_conv1_conv": (("s1_conv_exp_bn_act",), ()),
        "s1_conv_transition_conv": (("s1_conv_exp_bn_act", "s1_conv_transition_b_bn_act"), ("cat",)),
        "s2_blocks_0_conv1_conv": (("s2_conv_exp_bn_act",), ()),
        "s2_conv_transition_conv": (("s2_conv_exp_bn_act", "s2_conv_transition_b_bn_act"), ("cat_1",)),
    }, got
    exp = next(g for g in plan.groups if g.name == "s2_conv_exp_bn_act")
    assert exp.rereaders == ("s2_blocks_0_conv1_conv", "s2_conv_transition_conv")  # graph order
    assert [s.kind for s in exp.schedules["bnff"].backward][:2] == ["reread", "reread"]


@reference_only
def test_no_reread_where_another_user_keeps_the_result():
    """A max-pool reading one half keeps the whole split result (a view of it): rereading would save
    nothing, so the convolution reading the other half keeps its input as eager does."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ConvNormAct(3, 8, 3), ConvNormAct(4, 4, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            xs, xb = self.a(x).split(4, dim=1)
            return self.pool(xs).sum() + self.b(xb).sum()

    assert bnff.fusion_plan(bnff.restructure(Pooled())).rereads == []


def test_the_rebuilt_input_is_the_forwards_bit_for_bit(gen, monkeypatch):
    """fp32 NCHW and bf16 autocast channels_last: each rereading convolution's rebuilt input equals the
    input its forward read, exactly, and the rereading path ran for every one."""
    seen: dict[str, torch.Tensor] = {}
    checked: list[str] = []
    forward = reread._ConvReread.forward

    def spy_forward(ctx, spec, x, *flat):
        seen[spec.name] = x.detach().clone()
        return forward(ctx, spec, x, *flat)

    def spy_rebuild(name, inner):
        def run(*results):
            x = inner(*results)
            assert x.dtype == seen[name].dtype and torch.equal(x, seen[name]), f"{name}: rebuilt input differs"
            checked.append(name)
            return x
        return run

    monkeypatch.setattr(reread._ConvReread, "forward", staticmethod(spy_forward))
    for amp, fmt in ((None, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
        model = _model(gen).to(memory_format=fmt)
        fused = bnff.restructure(model)
        rebuilds = fused._bnff_rebuilds
        for name in list(rebuilds):
            rebuilds[name] = spy_rebuild(name, rebuilds[name])
        x = torch.randn(2, 3, 12, 12, generator=gen).to(memory_format=fmt)
        checked.clear()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = fused(x)
        y.float().square().sum().backward()
        assert sorted(checked) == sorted(rebuilds), (checked, list(rebuilds))


@reference_only
def test_float64_is_exact(gen):
    model = _model(gen).double()
    assert_float64_exact(model, _batch(gen))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_as_accurate_as_eager(channels_last, gen):
    steps = compare_with_float64(_model(gen), _batch(gen), steps=2, channels_last=channels_last)
    assert_as_accurate_as_eager(steps)


def test_bf16_as_accurate_as_eager(gen):
    steps = compare_with_float64(_model(gen), _batch(gen), steps=1, autocast=torch.bfloat16, channels_last=True)
    assert_as_accurate_as_eager(steps)


@reference_only  # the recorder runs the cpu backend itself
def test_footprint_is_what_autograd_keeps_and_the_kernels_move_the_plan(gen):
    model = _model(gen)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    eager, restructured = measured_footprints(model, x)
    # per stage, eager keeps 16 + 5n half-width maps and bnff 7 + 3n (the split result and the
    # concatenation are no longer kept): the two stages here (n = 1, 2) come to well under 0.6
    assert restructured < 0.6 * eager, (restructured, eager)
    if cpu.available():
        assert assert_moves_what_the_plan_says(model.to(memory_format=torch.channels_last),
                                               x.contiguous(memory_format=torch.channels_last)) == 15
