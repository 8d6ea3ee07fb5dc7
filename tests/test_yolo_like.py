"""YOLO-style conv-BN-SiLU networks as Ultralytics writes them (tests/yolo_like.py; issue 29 item 5):
``C2f`` (``list(x.chunk(2, 1))``, a bottleneck chain, the pieces concatenated), ``SPPF`` (chained max-pools
concatenated) and a neck's nearest upsample + concatenation. Every BN is fused; the results that a
split, a concatenation, an add after the activation or an upsample reads are materialized (the plan's
rule: those users take no pre-processing) and the report says why. Checked exactly in float64, by the
suite's rule in fp32 on both backends (channels_last too), by the footprint model against the bytes
autograd keeps, and by the byte recorder against the plan."""

import copy

import pytest
import torch

import bnff
from bnff.ops.backends import cpu
from helpers import (FLOAT64_BOUND, assert_as_accurate_as_eager, assert_float64_exact,
                     assert_moves_what_the_plan_says, compare_with_float64, measured_footprints, randomize_bn,
                     reference_only, rel_err)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)
from yolo_like import C2f, YoloLike

pytestmark = pytest.mark.exactness


def _model(gen, **kwargs):
    torch.manual_seed(int(torch.randint(0, 2 ** 16, (1,), generator=gen)))
    model = YoloLike(**kwargs)
    randomize_bn(model, gen)
    return model


def _batch(gen, n=2, hw=32):
    return lambda: (torch.randn(n, 3, hw, hw, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@reference_only
def test_every_batchnorm_fused_and_the_materialized_ones_say_why():
    model = YoloLike()
    report = bnff.fusion_report(bnff.restructure(model))
    bns = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sorted(report.fused_bns) == bns and len(bns) == 19, str(report)
    assert not report.opaque, "C2f's list(x.chunk(2, 1)) must trace"
    why = {g.bns[0]: g.consumer() for g in report.groups}
    assert "chunk" in why["c2f1.cv1.bn"] and "materialized" in why["c2f1.cv1.bn"]
    assert "concatenates" in why["sppf.cv1.bn"] and "2 users" in why["sppf.cv1.bn"]
    assert "Upsample" in why["sppf.cv2.bn"]
    assert why["c2f1.m.0.cv1.bn"] == "c2f1.m.0.cv2.conv"  # inside a bottleneck: applied in the next conv
    # the three bottleneck adds come after their activation (Ultralytics' x + cv2(cv1(x))): left, with the reason
    assert [u.kind for u in report.unfused] == ["add"] * 3, str(report)
    assert all("after the activation" in u.reason for u in report.unfused)


@pytest.mark.parametrize("way", ["list", "unpack", "split_sizes", "tensor_split"])
@reference_only
def test_a_split_into_known_parts_traces_in_every_spelling(way, gen):
    """The tracer iterates a split whose part count its arguments fix; the restructured model computes
    what the eager one does (float64)."""

    class Block(C2f):
        def forward(self, x):
            t = self.cv1(x)
            if way == "list":
                y = list(t.chunk(2, 1))
            elif way == "unpack":
                a, b = torch.chunk(t, 2, dim=1)
                y = [a, b]
            elif way == "split_sizes":
                y = [*t.split([self.c, self.c], 1)]
            else:
                y = list(torch.tensor_split(t, 2, dim=1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    model = Block(4, 8, 2, shortcut=True).double()
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    report = bnff.fusion_report(fused)
    assert not report.opaque and len(report.fused_bns) == 6, str(report)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    assert rel_err(fused(x), model(x)) <= FLOAT64_BOUND


@reference_only
def test_float64_is_exact(gen):
    model = _model(gen).double()
    assert_float64_exact(model, _batch(gen))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_as_accurate_as_eager(channels_last, gen):
    """SiLU has no threshold and a max-pool window's near-ties are rare at these sizes: tensor by tensor."""
    steps = compare_with_float64(_model(gen), _batch(gen), steps=2, channels_last=channels_last)
    assert_as_accurate_as_eager(steps)


@reference_only  # the recorder runs the cpu backend itself
def test_footprint_is_what_autograd_keeps_and_the_kernels_move_the_plan(gen):
    """The upsample keeps nothing (its backward needs only sizes): the footprint model says so too."""
    model = _model(gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    eager, restructured = measured_footprints(model, x)
    assert restructured < 0.7 * eager
    if cpu.available():
        assert assert_moves_what_the_plan_says(model.to(memory_format=torch.channels_last),
                                               x.contiguous(memory_format=torch.channels_last)) == 19
