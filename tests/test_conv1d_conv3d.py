"""1-D and 3-D maps (issue 29 item 6): ``Conv1d`` + ``BatchNorm1d`` (audio, time series) and ``Conv3d`` +
``BatchNorm3d`` (video: an R(2+1)D block, a (1, 3, 3) spatial then a (3, 1, 1) temporal convolution)
fused like their 2-D forms, the sweeps running on the 4-D views of the maps. Checked against float64 by
the suite's rule on both backends (channels_last_3d too), exactly in float64, by the byte recorder, and
by the footprint model against the bytes autograd keeps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnff
from bnff.ops.backends import cpu
from helpers import (assert_as_accurate_as_eager, assert_float64_exact, assert_moves_what_the_plan_says,
                     compare_with_float64, measured_footprints, randomize_bn, reference_only)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

pytestmark = pytest.mark.exactness


class Net1d(nn.Module):
    """conv -> BN1d -> ReLU -> conv -> BN1d -> + -> SiLU -> 1x1 conv -> mean -> linear -> BN1d (on (N, C))."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 8, 5, padding=2, bias=False), nn.BatchNorm1d(8)
        self.c2, self.b2 = nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.c3 = nn.Conv1d(8, 6, 1)
        self.fc, self.head_bn = nn.Linear(6, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = F.silu(self.b2(self.c2(y)) + y)
        return self.head_bn(self.fc(self.c3(z).mean(-1)))


class R2plus1d(nn.Module):
    """An R(2+1)D residual block: (1, 3, 3) conv -> BN3d -> ReLU -> (3, 1, 1) conv -> BN3d -> + -> ReLU,
    then a 1x1x1 conv, a mean over (D, H, W) and a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 1, bias=False)
        self.c1, self.b1 = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(8)
        self.c2, self.b2 = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(8)
        self.c3 = nn.Conv3d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(y)) + x)
        return self.fc(self.c3(z).mean((2, 3, 4)))


SHAPES = {"conv1d": (Net1d, (4, 3, 20)), "r2plus1d": (R2plus1d, (2, 3, 4, 6, 6))}


def _batch(gen, shape, fmt=torch.contiguous_format):
    return lambda: (torch.randn(*shape, generator=gen).to(memory_format=fmt), torch.randint(0, 3, (shape[0],), generator=gen))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_fused_and_as_accurate_as_eager(name, gen):
    cls, shape = SHAPES[name]
    model = cls()
    randomize_bn(model, gen)
    report = bnff.fusion_report(bnff.restructure(copy.deepcopy(model)))
    assert sorted(g.pattern for g in report.groups) == ["(3)", "(4)-1"]
    assert sorted(report.fused_bns) == ["b1", "b2"]
    if name == "conv1d":  # a BatchNorm1d on a linear layer's (N, C) output is not a feature map's
        (left,) = report.unfused_bns
        assert left.name == "head_bn" and "linear" in left.reason
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen, shape), steps=2))


def test_channels_last_3d(gen):
    model = R2plus1d().to(memory_format=torch.channels_last_3d)
    randomize_bn(model, gen)
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen, SHAPES["r2plus1d"][1], torch.channels_last_3d),
                                                     steps=2))


@reference_only
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_float64_is_exact(name, gen):
    cls, shape = SHAPES[name]
    model = cls().double()
    randomize_bn(model, gen)
    assert_float64_exact(model, _batch(gen, shape))


@reference_only  # the recorder runs the cpu backend itself
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_recorded_bytes_equal_the_plan_and_footprint_is_what_autograd_keeps(name, gen):
    cls, shape = SHAPES[name]
    model = cls()
    randomize_bn(model, gen)
    x = torch.randn(*shape, generator=gen)
    eager, restructured = measured_footprints(model, x)
    assert restructured < eager
    if cpu.available():
        assert assert_moves_what_the_plan_says(model, x) == 2
