"""Squeeze-and-excitation taken into the consumer (issue 29 item 5): the group result read by a global
average pool and multiplied by the gate it computes is applied inside the layer after the
multiplication, the gate recomputed in the backward, so neither the result nor the scaled map is kept.
Checked against float64 by the suite's rule on both backends, against a hand count of the bytes
autograd keeps, and left unfused (still correct) where the gate has state or randomness."""

import copy

import pytest
import torch
from torch import nn

import bnff
from bnff.models.efficientnet import MBConv
from bnff.ops.backends import cpu
from helpers import (FLOAT64_BOUND, assert_as_accurate_as_eager, assert_bf16_tracks_eager, assert_moves_what_the_plan_says,
                     compare_with_float64, measured_footprints, randomize_bn, reference_only, rel_err)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

pytestmark = pytest.mark.exactness

C, D, R = 8, 6, 4


class SE(nn.Module):
    """torchvision's spelling (``AdaptiveAvgPool2d``, ``gate * a``) or timm's (``a.mean((2, 3), keepdim=True)``,
    ``a * gate``); ``inside`` adds a layer to the gate (a BN with running statistics, dropout)."""

    def __init__(self, spelling="torchvision", act=nn.SiLU, gate=nn.Sigmoid, inside=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(C, R, 1), nn.Conv2d(R, C, 1)
        self.act, self.gate, self.spelling = act(), gate(), spelling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.inside = {"bn": lambda: nn.BatchNorm2d(R), "dropout": lambda: nn.Dropout(0.5), None: nn.Identity}[inside]()

    def forward(self, a):
        p = self.pool(a) if self.spelling == "torchvision" else a.mean((2, 3), keepdim=True)
        g = self.gate(self.fc2(self.inside(self.act(self.fc1(p)))))
        return g * a if self.spelling == "torchvision" else a * g


class Net(nn.Module):
    """conv -> BN -> act -> SE -> 1x1 conv -> mean -> linear."""

    def __init__(self, act=nn.SiLU, **se):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.act = act(inplace=True)
        self.se = SE(**se)
        self.conv2 = nn.Conv2d(C, D, 1)
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.se(self.act(self.bn1(self.conv1(x))))).mean((2, 3)))


def _batch(gen, n=4, hw=8, channels=3):
    return lambda: (torch.randn(n, channels, hw, hw, generator=gen) * 2 + 0.5, torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("spelling", ["torchvision", "timm"])
@pytest.mark.parametrize("act, gate", [(nn.SiLU, nn.Sigmoid), (nn.Hardswish, nn.Hardsigmoid), (nn.ReLU, nn.Sigmoid)],
                         ids=["silu", "hardswish", "relu"])
def test_gate_is_applied_inside_the_consumer(spelling, act, gate, gen):
    model = Net(act=act, spelling=spelling, gate=gate)
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    (group,) = bnff.fusion_report(fused).groups
    assert group.consumers == ("conv2",) and group.squeeze[0] in ("se.pool", "mean") and group.squeeze[-1] in ("mul", "mul_1")
    assert group.consumer() == "squeeze-excitation se -> conv2"
    assert not bnff.fusion_report(fused).unfused  # the gate's own activations go with it
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen), steps=3))


@reference_only
def test_float64_is_exact(gen):
    model = Net().double()
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    outs = []
    for m in (model, fused):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append([y, xx.grad] + [p.grad for p in m.parameters()])
    scale = max(g.abs().max().item() for g in outs[0][2:])
    for a, b in zip(outs[1], outs[0]):
        assert rel_err(a, b, floor=scale) < FLOAT64_BOUND


@reference_only
def test_keeps_only_the_bn_input(gen):
    """Hand count of what autograd keeps: bnff keeps the network input (conv1's), the BN input c, the BN's
    mean and variance and the linear layer's input, and nothing of the squeeze-and-excitation; eager
    keeps three maps more (the in-place SiLU's copy of its input, the result a that the multiplication
    reads, the scaled map conv2 reads) and some (N, C) vectors. The footprint model prices both as
    measured."""
    model = Net()
    n, hw = 2, 8
    x = torch.randn(n, 3, hw, hw, generator=gen)
    f32 = 4
    hand = f32 * (n * 3 * hw * hw + n * C * hw * hw + 2 * C + n * D)
    eager, restructured = measured_footprints(model, x)
    assert restructured == hand
    one_map = f32 * n * C * hw * hw
    assert hand + 3 * one_map <= eager < hand + 4 * one_map


@pytest.mark.parametrize("inside", ["bn", "dropout"])
def test_gate_with_state_or_randomness_is_left_to_autograd(inside, gen):
    """Recomputing the gate would update a BN's running statistics twice or draw another dropout mask:
    such a squeeze-and-excitation is not taken; the result is materialized and everything trains as eager."""
    model = Net(inside=inside)
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    group = next(g for g in bnff.fusion_report(fused).groups if g.bns == ("bn1",))
    assert not group.squeeze and not group.consumers and group.materialized_because
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen), steps=2))


class MBConvNet(nn.Module):
    """Two EfficientNet MBConv blocks (expand, depthwise, SE with SiLU, project, shortcut) and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(MBConv(4, 3, 1, 16, 16, 0.0), MBConv(6, 5, 2, 16, 24, 0.0))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_se_silu_regression_fixed_seed(every_backend):
    """Issue 29 item 7: a network of SE blocks with SiLU was twice over the rule on an SE weight's gradient
    (median of three draws). Three fixed draws, every tensor by the rule."""
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = MBConvNet()
        randomize_bn(model, g)
        assert_as_accurate_as_eager(compare_with_float64(model, _batch(g, n=4, hw=12), steps=2))


@reference_only  # the recorder runs the cpu backend itself
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_recorded_bytes_equal_the_plan(fmt, gen):
    """The byte recorder (tests/test_plan_bytes.py) on SE blocks: each group, its squeeze-and-excitation
    inside its consumer, moves and keeps what its plan says."""
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    for model in (Net(), MBConvNet()):
        model.to(memory_format=fmt)
        randomize_bn(model, gen)
        x = torch.randn(2, 3, 12, 12, generator=gen).to(memory_format=fmt)
        assert assert_moves_what_the_plan_says(model, x) >= 1


class Net3x3(Net):
    """``Net`` with a 3x3 convolution after the squeeze-and-excitation: the gate cannot go into its weights."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(C, D, 3, padding=1)


@reference_only
def test_gate_is_folded_into_a_pointwise_consumer_only():
    assert [g.gate_folded for g in bnff.fusion_plan(bnff.restructure(Net())).groups] == [True]
    assert [g.gate_folded for g in bnff.fusion_plan(bnff.restructure(Net3x3())).groups] == [False]


@reference_only
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_folded_gate_consumer_equals_the_scaled_map_in_float64(fmt, gen):
    """``FoldedGateConsumer`` (weights W * gate[n], batched matrix products, no scaled map) against
    ``GatedConsumer`` (a * gate, then the convolution and its backward by ATen, autograd for the gate), both in
    float64 on the same map and gradient: outputs and every gradient within float64 rounding; and so does
    its scaled-map path, taken by a map in neither layout (here a strided view)."""
    from bnff.ops.consumers import FoldedGateConsumer, GatedConsumer, make

    se = SE().double()

    class Gate(nn.Module):  # SE's gate: a -> sigmoid(fc2(silu(fc1(pool(a)))))
        def __init__(self, pool=True):
            super().__init__()
            self.se, self.pool = se, pool

        def forward(self, a):
            return self.se.gate(self.se.fc2(self.se.act(self.se.fc1(self.se.pool(a) if self.pool else a))))

    conv = nn.Conv2d(C, D, 1).double()
    # the folded consumer pools itself: its gate module starts from the pooled map
    folded, plain = FoldedGateConsumer(Gate(pool=False), make(conv)), GatedConsumer(Gate(), make(conv))
    params = folded.params(None)
    for a in (torch.randn(3, C, 5, 7, generator=gen, dtype=torch.float64).to(memory_format=fmt),
              torch.randn(3, C, 5, 14, generator=gen, dtype=torch.float64)[..., ::2]):
        g = torch.randn(3, D, 5, 7, generator=gen, dtype=torch.float64)
        needs = (True,) * (1 + len(params))
        out_f, out_p = folded.forward(a, params, None), plain.forward(a, params, None)
        (ga_f, grads_f), (ga_p, grads_p) = folded.backward(a, g, params, None, needs), plain.backward(a, g, params, None, needs)
        for got, want in [(out_f, out_p), (ga_f, ga_p), *zip(grads_f, grads_p)]:
            assert rel_err(got, want) < 1e-13
        assert ga_f.stride() == a.stride() or not a.is_contiguous(memory_format=fmt)


@reference_only
def test_gate_consumers_compute_with_the_parameters_they_are_given(gen):
    """The gate consumers call their gate module directly when handed its own parameters and through
    ``torch.func.functional_call`` otherwise (as when a caller substitutes them): given clones of another
    gate's parameters they equal that gate's consumer bit for bit, forward and backward; a frozen gate
    parameter gets no gradient, the others the same ones."""
    import copy

    from bnff.ops.consumers import FoldedGateConsumer, GatedConsumer, make

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(C, 3, 1), nn.Conv2d(3, C, 1)

        def forward(self, a):
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(a.mean((2, 3), keepdim=True)))))

    conv = nn.Conv2d(C, D, 1).double()
    for kind in (FoldedGateConsumer, GatedConsumer):
        gate = Gate().double()
        other = copy.deepcopy(gate)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(2)
        mine, theirs = kind(gate, make(conv)), kind(other, make(conv))
        a = torch.randn(3, C, 5, 7, generator=gen, dtype=torch.float64)
        g = torch.randn(3, D, 5, 7, generator=gen, dtype=torch.float64)
        clones = tuple(p.detach().clone().requires_grad_(True) for p in theirs.params(None))
        needs = (True,) * (1 + len(clones))
        want = (theirs.forward(a, theirs.params(None), None), theirs.backward(a, g, theirs.params(None), None, needs))
        got = (mine.forward(a, clones, None), mine.backward(a, g, clones, None, needs))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
        assert all(torch.equal(x, y) for x, y in zip(got[1][1], want[1][1]))
        assert not torch.equal(mine.forward(a, mine.params(None), None), want[0])
        gate.fc1.bias.requires_grad_(False)
        frozen = mine.backward(a, g, mine.params(None), None, needs)[1]
        names = [n for n, _ in gate.named_parameters()]
        assert frozen[names.index("fc1.bias")] is None and frozen[names.index("fc1.weight")] is not None


def test_folded_gate_forms_no_scaled_map(gen):
    """On the cpu backend (whose apply step is one kernel), no operator of a training step writes a map of
    the scaled map's shape except the apply step, the input gradient and the gate's pool gradient: the
    multiplication a * gate never runs on a map; two batched matrix products and the per-sample weight
    gradient's one run instead."""
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.append((func.name(), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    model = Net()
    randomize_bn(model, gen)
    fused = bnff.restructure(model, backend="cpu")
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with Ops() as ops:
        fused(x).square().sum().backward()
    names = [n for n, _ in ops.seen]
    assert names.count("aten::bmm") == 3, names
    assert not [n for n, shape in ops.seen if shape == (2, C, 8, 8) and n.startswith("aten::mul")], ops.seen


def test_bf16_channels_last_mbconv_tracks_eager(every_backend, gen):
    """bf16 autocast, channels_last, MBConv blocks with their gate folded into the project convolution: bnff
    as close to float64 as eager (the suite's rule on the median tensor and the output)."""
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = MBConvNet().to(memory_format=torch.channels_last)
        randomize_bn(model, g)
        assert_bf16_tracks_eager(model, torch.randn(4, 3, 12, 12, generator=g).to(memory_format=torch.channels_last))
