"""Fuzzed graphs: hypothesis draws small CNNs (1-D, 2-D or 3-D) of conv/BN/add/concat/pool/
squeeze-and-excitation/split-and-concatenate blocks with every activation of the table, and checks
that the restructured model trains like eager for a step, on both backends, by the suite's rule
(fp32: every output, gradient and running statistic as close to float64 as eager's, ``helpers.K``),
exactly in float64 on the reference backend, and that every BN is either fused or listed unfused.

``make test`` runs ``BNFF_FUZZ_EXAMPLES`` (default 25) derandomized examples per backend; a release
check runs more, e.g. ``BNFF_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import bnff
from bnff import activations
from helpers import FLOAT64_BOUND, assert_as_accurate_as_eager, compare_with_float64, randomize_bn, train_side_by_side
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

pytestmark = pytest.mark.exactness

EXAMPLES = int(os.environ.get("BNFF_FUZZ_EXAMPLES", "25"))
# CELU's alpha 0.5: eager's backward takes 1/alpha in float32 even for float64 tensors (with 0.7 eager
# float64 was 1.6e-8 off bnff's exact float64, over the float64 bound)
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": nn.SiLU, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "elu": nn.ELU, "celu": lambda: nn.CELU(0.5), "selu": nn.SELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
        "mish": nn.Mish, "none": nn.Identity}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("max", 3): nn.MaxPool3d,
        ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d, ("avg", 3): nn.AvgPool3d}
INPUT = {1: (4, 3, 16), 2: (4, 3, 8, 8), 3: (2, 3, 6, 6, 6)}
"""The input mini-batch of a network of 1-D, 2-D or 3-D blocks."""


@dataclass(frozen=True)
class Block:
    """One drawn block: ``kind`` is "cbr" (conv->BN->act), "res" (two convs with BN, a shortcut add,
    then act), "cat" (two conv->BN->act branches concatenated), "pool" (max or average), "se"
    (conv->BN->act, squeeze-and-excitation with a sigmoid or hard-sigmoid gate, 1x1 conv->BN) or "csp"
    (conv->BN->act chunked in two halves, the second through conv->BN->act plus itself, both
    concatenated into a 1x1 conv->BN->act: a cross-stage-partial / C2f block).
    ``dims``: 1, 2 or 3 spatial dimensions (the same for every block of a network)."""

    kind: str
    out: int
    kernel: int
    stride: int
    grouped: bool
    act: str
    bn_affine: bool
    bn_momentum: float | None
    projection: bool
    pool: str
    dims: int = 2


@st.composite
def blocks(draw) -> list[Block]:
    n = draw(st.integers(1, 4))
    dims = draw(st.sampled_from([2, 2, 2, 1, 3]))
    strides = 0
    result = []
    for _ in range(n):
        # 3-D inputs are 6 deep: a second stride-2 block would leave a depth below the 3-wide average-pool
        # window, which avg_pool3d requires of its input whatever the padding
        stride = draw(st.sampled_from([1, 2])) if strides < (1 if dims == 3 else 2) else 1
        strides += stride == 2
        result.append(Block(kind=draw(st.sampled_from(["cbr", "res", "cat", "pool", "se", "csp"])), out=2 * draw(st.integers(1, 4)),
                            kernel=draw(st.sampled_from([1, 3])), stride=stride, grouped=draw(st.booleans()),
                            act=draw(st.sampled_from(["relu", "relu6", "relu", "none", *ACTS])),
                            bn_affine=draw(st.booleans()), bn_momentum=draw(st.sampled_from([0.1, None, 0.3])),
                            projection=draw(st.booleans()), pool=draw(st.sampled_from(["max", "avg"])), dims=dims))
    return result


class FuzzNet(nn.Module):
    """A network built from drawn ``Block``s on 3-channel images, ending in global average pooling
    and a linear classifier over 3 classes."""

    def __init__(self, spec: list[Block]) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList()
        c = 4
        self.dims = d = spec[0].dims
        self.stem = CONV[d](3, c, 3, padding=1)
        for b in spec:
            mods = nn.ModuleDict()
            def conv(cin, cout, stride):
                groups = 2 if b.grouped and cin % 2 == 0 and cout % 2 == 0 else 1
                return CONV[d](cin, cout, b.kernel, stride=stride, padding=b.kernel // 2, groups=groups, bias=False)

            def bn(ch):
                return BN[d](ch, affine=b.bn_affine, momentum=b.bn_momentum)

            if b.kind == "cbr":
                mods.update(dict(conv=conv(c, b.out, b.stride), bn=bn(b.out), act=ACTS[b.act]()))
                c = b.out
            elif b.kind == "res":
                mods.update(dict(conv1=conv(c, b.out, b.stride), bn1=bn(b.out), act1=ACTS[b.act](),
                            conv2=conv(b.out, b.out, 1), bn2=bn(b.out), act=ACTS[b.act]()))
                if b.projection or b.stride != 1 or c != b.out:
                    mods.update(dict(proj=CONV[d](c, b.out, 1, stride=b.stride, bias=False), proj_bn=bn(b.out)))
                c = b.out
            elif b.kind == "cat":
                mods.update(dict(conv1=conv(c, b.out, b.stride), bn1=bn(b.out), act1=ACTS[b.act](),
                            conv2=conv(c, b.out // 2, b.stride), bn2=bn(b.out // 2), act2=nn.ReLU()))
                c = b.out + b.out // 2
            elif b.kind == "se":
                mods.update(dict(conv=conv(c, b.out, b.stride), bn=bn(b.out), act=ACTS[b.act](),
                                 fc1=CONV[d](b.out, 2, 1), fc2=CONV[d](2, b.out, 1),
                                 gate=nn.Sigmoid() if b.pool == "max" else nn.Hardsigmoid(),
                                 proj=CONV[d](b.out, b.out, 1, bias=False), proj_bn=bn(b.out)))
                c = b.out
            elif b.kind == "csp":
                mods.update(dict(conv=conv(c, b.out, b.stride), bn=bn(b.out), act=ACTS[b.act](),
                                 conv1=conv(b.out // 2, b.out // 2, 1), bn1=bn(b.out // 2), act1=ACTS[b.act](),
                                 conv2=CONV[d](b.out, b.out, 1, bias=False), bn2=bn(b.out), act2=ACTS[b.act]()))
                c = b.out
            else:
                # a max-pool only in 2-D, where closest_calls sets near-ties aside
                mods.update(dict(pool=POOL[(b.pool if d == 2 else "avg", d)](3, b.stride, 1),
                            conv=CONV[d](c, c, 1, bias=False), bn=bn(c), act=ACTS[b.act]()))
            self.blocks.append(mods)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for b, m in zip(self.spec, self.blocks):
            if b.kind == "cbr":
                x = m["act"](m["bn"](m["conv"](x)))
            elif b.kind == "res":
                y = m["bn2"](m["conv2"](m["act1"](m["bn1"](m["conv1"](x)))))
                x = m["act"](y + (m["proj_bn"](m["proj"](x)) if "proj" in m else x))
            elif b.kind == "cat":
                x = torch.cat([m["act1"](m["bn1"](m["conv1"](x))), m["act2"](m["bn2"](m["conv2"](x)))], 1)
            elif b.kind == "se":
                a = m["act"](m["bn"](m["conv"](x)))
                a = a * m["gate"](m["fc2"](F.relu(m["fc1"](a.mean(self.spatial, keepdim=True)))))
                x = m["proj_bn"](m["proj"](a))
            elif b.kind == "csp":
                xs, xb = list(m["act"](m["bn"](m["conv"](x))).chunk(2, 1))
                x = m["act2"](m["bn2"](m["conv2"](torch.cat([xs, m["act1"](m["bn1"](m["conv1"](xb))) + xb], 1))))
            else:
                x = m["act"](m["bn"](m["conv"](m["pool"](x))))
        return self.fc(x.mean(self.spatial))

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(range(2, 2 + self.dims))


def _batch(gen, dims=2):
    shape = INPUT[dims]
    return lambda: (torch.randn(*shape, generator=gen) * 2 + 0.5, torch.randint(0, 3, (shape[0],), generator=gen))


def closest_calls(model: nn.Module, x: torch.Tensor) -> float:
    """The float64 forward's closest call, relative to each layer's scale: min over activation inputs
    of the distance to a threshold of the activation table (0 for ReLU, 0 and 6 for ReLU6, ...), and over max-pool windows of the gap between
    the largest and second-largest value.

    A value closer to a threshold than fp32 rounding (~1e-6 of the scale) is decided either way by
    any two fp32 implementations, eager against float64 included; the gradient then differs by an
    element's whole contribution, which no rounding bound covers. Whole networks deal with that by
    statistics over tensors (helpers.assert_aggregate_as_accurate_as_eager); a drawn example whose
    closest call is that close is not a test of rounding and is set aside (hypothesis ``assume``)."""
    closest = [float("inf")]

    def relative(d: torch.Tensor, z: torch.Tensor) -> float:
        return (d.min() / z.abs().max().clamp_min(1e-300)).item()

    def act_hook(mod, args):
        z = args[0]
        for t in activations.spec(activations.module_kind(mod)).thresholds:
            closest.append(relative((z - t).abs(), z))

    def pool_hook(mod, args):
        z = args[0]
        cols = F.unfold(F.pad(z, (1, 1, 1, 1), value=float("-inf")), 3, stride=mod.stride)
        top = cols.view(z.shape[0], z.shape[1], 9, -1).topk(2, dim=2).values
        closest.append(relative(top[:, :, 0] - top[:, :, 1], z))

    ref = copy.deepcopy(model).double()
    handles = [m.register_forward_pre_hook(act_hook) for m in ref.modules() if activations.module_kind(m)]
    handles += [m.register_forward_pre_hook(pool_hook) for m in ref.modules() if isinstance(m, nn.MaxPool2d)]
    with torch.no_grad():
        ref(x.double())
    for h in handles:
        h.remove()
    return min(closest)


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(spec=blocks(), seed=st.integers(0, 2 ** 16))
def test_fuzzed_network_trains_like_eager(spec, seed, every_backend):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initial weights: the example alone decides them
    model = FuzzNet(spec)
    randomize_bn(model, gen)
    report = bnff.fusion_report(bnff.restructure(copy.deepcopy(model)))
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert set(report.fused_bns) | {u.name for u in report.unfused} >= bns, str(report)
    assert set(report.fused_bns) <= bns
    x, target = _batch(gen, model.dims)()
    if every_backend == "reference":  # float64: exact whatever the closest call
        for e in train_side_by_side(copy.deepcopy(model).double(), lambda: (x, target), steps=1, dtype=torch.float64):
            assert max(e.output, e.input_grad, e.param_grad, e.buffers) <= FLOAT64_BOUND, (e, spec)
    assume(closest_calls(model, x) > 1e-5)
    first = compare_with_float64(model, lambda: (x, target), steps=1)
    if all(q.ok for q in first[0]):
        return
    # One quantity's error on one batch is a small-sample statistic: a 6-channel gamma gradient over 16
    # values per channel, eager 1 ulp off float64 by luck where 15 is typical, fails K x eager although
    # bnff is no less accurate (measured: median bnff/eager 1.1, worst 17 over 40 seeds of one such
    # network). A loss of accuracy of bnff's own shows on every batch, luck on few: a quantity fails
    # when it misses its bound on two of three fresh batches of the same network.
    more = [compare_with_float64(model, _batch(gen, model.dims), steps=1)[0] for _ in range(2)]
    steps = [[q for q, *again in zip(first[0], *more) if not q.ok and sum(not r.ok for r in again) >= 1]]
    assert_as_accurate_as_eager(steps)

