"""The activation table (``bnff.activations``) and every activation fused after BN.

The table's forward and derivative are checked against eager autograd in float64 (the independent
source: PyTorch's own modules differentiated by autograd); every spelling is recognised with its
parameter and in-place flag; every activation in every pattern trains as eager does by the suite's
rule (fp32 against float64) and equals eager in float64; what a group keeps follows the activation
(an activation whose derivative reads its input keeps the shortcut, never the result), exactly as
autograd records it, and the footprint model prices eager's keeps as autograd does.
"""

import copy
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import bnff
from bnff import activations
from bnff.graph.kinds import Kind, classify, is_inplace
from bnff.ops.backends import cpu
from bnff.ops.record import Recorder
from bnff.plan.group import GroupPlan, TermPlan
from helpers import (FLOAT64_BOUND, assert_as_accurate_as_eager, compare_with_float64, measured_footprints, randomize_bn,
                     train_side_by_side)
from test_patterns import C, Pattern, _batch_of


# one module per kind of the table (CELU's alpha 0.5: PyTorch's backward takes 1/alpha in float32,
# exact for 0.5), and the kind the table must give it
MODULES = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6,
    "leaky_relu(0.1)": lambda: nn.LeakyReLU(0.1), "leaky_relu(-0.3)": lambda: nn.LeakyReLU(-0.3),
    "elu(0.7)": lambda: nn.ELU(0.7), "celu(0.5)": lambda: nn.CELU(0.5), "selu": nn.SELU, "silu": nn.SiLU,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "mish": nn.Mish,
}
KINDS = sorted(MODULES)
Z_KINDS = [k for k in KINDS if activations.reads(k) == "z"]


def test_the_table_has_every_entry_the_issue_names():
    assert set(activations.TABLE) == {"identity", "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "silu",
                                      "hardswish", "hardsigmoid", "sigmoid", "tanh", "gelu", "gelu_tanh", "mish"}
    assert set(Z_KINDS) == {"silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh", "mish", "leaky_relu(-0.3)"}
    assert activations.spec("relu6").thresholds == (0.0, 6.0)
    assert activations.spec("hardswish").thresholds == (-3.0, 3.0)
    with pytest.raises(ValueError, match="unknown activation kind 'swish'"):
        activations.spec("swish")
    with pytest.raises(ValueError, match=r"leaky_relu\(0.1\)"):
        activations.spec("leaky_relu")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_derivative_are_eager_autograds_in_float64(kind, gen):
    """f(z) and g * f'(.) from the table, against the module differentiated by autograd, on values
    spread over every threshold (and exactly at each)."""
    spec = activations.spec(kind)
    module = MODULES[kind]()
    points = torch.tensor([p + d for p in spec.thresholds for d in (-1e-9, 0.0, 1e-9)], dtype=torch.float64)
    z = torch.cat([torch.randn(2000, generator=gen, dtype=torch.float64) * 5, points]).requires_grad_()
    a = module(z)
    g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
    a.backward(g)
    ours = spec.forward(z.detach())
    torch.testing.assert_close(ours, a.detach(), rtol=1e-15, atol=0)
    dy = spec.backward(g, ours if spec.reads == "a" else z.detach())
    # from the output, the ELU family's a + alpha cancels where z << 0: float64's unit roundoff of alpha * g
    torch.testing.assert_close(dy, z.grad, rtol=1e-13, atol=1e-15 * g.abs().max().item())


def _graph(fn) -> tuple[fx.GraphModule, fx.Node]:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = fn if isinstance(fn, nn.Module) else None

        def forward(self, x):
            return self.m(x) if self.m is not None else fn(x)
    gm = fx.symbolic_trace(M())
    node = next(n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    return gm, node


SPELLINGS = [
    (nn.ReLU(inplace=True), "relu", True), (lambda x: F.relu(x, True), "relu", True), (torch.relu_, "relu", True),
    (lambda x: x.relu(), "relu", False), (nn.ReLU6(), "relu6", False), (lambda x: F.hardtanh(x, 0.0, 6.0), "relu6", False),
    (nn.Hardtanh(-1.0, 1.0), None, False), (lambda x: F.leaky_relu(x, 0.2, True), "leaky_relu(0.2)", True),
    (nn.LeakyReLU(), "leaky_relu(0.01)", False), (lambda x: F.elu(x, alpha=2.0), "elu(2.0)", False),
    (F.elu_, "elu(1.0)", True), (nn.CELU(0.5, inplace=True), "celu(0.5)", True), (torch.selu, "selu", False),
    (nn.SiLU(inplace=True), "silu", True), (lambda x: F.silu(x, inplace=True), "silu", True), (F.silu, "silu", False),
    (nn.Hardswish(), "hardswish", False), (lambda x: F.hardsigmoid(x, True), "hardsigmoid", True),
    (torch.sigmoid, "sigmoid", False), (lambda x: x.sigmoid_(), "sigmoid", True), (nn.Tanh(), "tanh", False),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh", False), (nn.GELU(), "gelu", False),
    (nn.Mish(inplace=True), "mish", True), (lambda x: F.dropout(x, 0.5, True), None, False),
]


@pytest.mark.parametrize("fn, kind, inplace", SPELLINGS, ids=[f"{i}-{k}" for i, (_, k, _) in enumerate(SPELLINGS)])
def test_every_spelling_is_recognised(fn, kind, inplace):
    gm, node = _graph(fn)
    modules = dict(gm.named_modules())
    info = classify(node, modules)
    assert (info.kind == Kind.ACT) == (kind is not None) and info.act == kind
    assert is_inplace(node, modules) == inplace


def _act_pattern(kind, shortcut, consumer, inplace=False):
    model = Pattern(shortcut=shortcut, consumer=consumer)
    model.act = MODULES[kind]()
    if inplace and hasattr(model.act, "inplace"):
        model.act.inplace = True
    return model


CONFIGS = [(None, "conv"), ("identity", "conv"), ("projection", "none"), (None, "none")]


@pytest.mark.parametrize("shortcut, consumer", CONFIGS, ids=["lone", "shortcut", "projection-materialized",
                                                              "lone-materialized"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_activation_in_every_pattern_trains_as_eager(kind, shortcut, consumer, gen):
    """fp32 on the reference backend, against float64, by the suite's rule tensor by tensor."""
    model = _act_pattern(kind, shortcut, consumer)
    randomize_bn(model, gen)
    report = bnff.fusion_report(bnff.restructure(copy.deepcopy(model), backend="reference"))
    assert len(report.fused_bns) == (2 if shortcut == "projection" else 1) and report.groups[0].act == (None if kind == "identity" else kind)  # fx traces nn.Identity away
    assert_as_accurate_as_eager(compare_with_float64(model, _batch_of(gen, 6, 10, C), steps=2, backend="reference"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_activation_equals_eager_in_float64(kind, gen):
    model = _act_pattern(kind, "projection", "conv")
    randomize_bn(model, gen)
    batch = lambda: (torch.randn(4, C, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))  # noqa: E731
    for e in train_side_by_side(model, batch, steps=2, dtype=torch.float64, backend="reference"):
        assert max(e.output, e.input_grad, e.param_grad, e.buffers) < FLOAT64_BOUND, e


def _replay(batches):
    """``make_input`` for compare_with_float64 that hands out ``batches`` in order (two runs, same data)."""
    it = iter(batches)
    return lambda: next(it)


@pytest.mark.exactness  # the cpu kernels at both ISA levels (make test's AVX2 rehearsal)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernels_compute_every_activation(kind, gen):
    """Every activation of the table runs in the C++ kernels (none falls back to the reference), as
    accurate as the reference backend or eager by the suite's rule (the reference backend is held to
    eager's rule in fp32 by the pattern tests above; in bf16 a pre-activation within rounding of a
    jump of f' lands on either side by luck, for eager and bnff alike, see
    helpers.assert_aggregate_as_accurate_as_eager; test_cpu_backend checks the recomputed derivative
    bit for bit at the thresholds): a lone BN (its derivative recomputed from x) and a BN with an
    identity shortcut (z recomputed from x and the shortcut where the derivative reads z) in bf16
    channels_last, and for the activations whose derivative reads z (and two that read a) a projection
    shortcut (two BN terms) in fp32 NCHW."""
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    before, calls = cpu.fallbacks(), cpu.kernel_calls()
    configs = [(None, "conv", True, torch.bfloat16), ("identity", "conv", True, torch.bfloat16)]
    if kind in Z_KINDS or kind in ("selu", "sigmoid"):  # the NCHW run-time path, z recomputed from two terms
        configs.append(("projection", "none", False, None))
    for shortcut, consumer, fmt, autocast in configs:
        model = _act_pattern(kind, shortcut, consumer)
        randomize_bn(model, gen)
        batches = [_batch_of(gen, 6, 10, C)() for _ in range(2)]
        runs = {backend: compare_with_float64(model, _replay(batches), steps=2,
                                              backend=backend, channels_last=fmt, autocast=autocast)
                for backend in ("cpu", "reference")}
        assert_as_accurate_as_eager([[replace(q, eager=max(q.eager, r.bnff)) for q, r in zip(qs, rs)]
                                     for qs, rs in zip(runs["cpu"], runs["reference"])])
    assert not cpu.fallbacks() - before, cpu.fallbacks() - before
    ran = {k.rsplit("/", 2)[0] for k in cpu.kernel_calls() - calls}
    assert {"apply", "grad_stats", "input_grad"} <= ran, ran
    # the lone BN (no shortcut) recomputes f' from x in both backward sweeps, unless its derivative costs
    # enough to write dy once (SiLU, GELU, Mish: GroupPlan.writes_dy)
    lone = GroupPlan("g", "(3)", (TermPlan("bn", ("c",)),), act="act", act_kind=kind)
    assert ({"grad_stats_x", "input_grad_x"} <= ran) == (not lone.writes_dy), (ran, kind)


@pytest.mark.parametrize("kind", ["silu", "relu", "gelu", "tanh"])
@pytest.mark.parametrize("consumer", ["conv", "none"])
def test_kept_bytes_follow_the_activation(kind, consumer, gen):
    """A shortcut group keeps its result for the mask only when the derivative reads it (materialized);
    an activation whose derivative reads z keeps the shortcut instead: the plan says so, and what
    autograd records under the byte recorder is exactly the plan's keeps."""
    model = _act_pattern(kind, "identity", consumer)
    randomize_bn(model, gen)
    fused = bnff.restructure(model, backend="reference")
    (g,) = bnff.fusion_plan(fused).groups
    roles = {(r.node, r.role) for r in g.schedules["bnff"].keeps if not r.vector}
    z = activations.reads(kind) == "z"
    assert ((g.name, "ofmap") in roles) == (consumer == "none" and not z)
    assert (("x", "ofmap") in roles) == (consumer == "conv" or z)  # the shortcut is the input x
    grad_stats = next(s for s in g.schedules["bnff"].backward if s.kind == "grad_stats")
    assert ({(r.node, r.role) for r in grad_stats.reads} >= {("x", "ofmap")}) == z
    x = torch.randn(2, C, 6, 6, generator=gen)
    with Recorder(model) as rec:
        fused(x).square().mean().backward()
    assert rec.kept[g.name] == sum(x.numel() * 4 for r in g.schedules["bnff"].keeps if not r.vector)


class _Net(nn.Module):
    """stem conv -> BN -> act (lone), a residual block conv -> BN -> add -> act, a materialized result."""

    def __init__(self, kind, inplace):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv3 = nn.Conv2d(C, C, 1)
        self.acts = nn.ModuleList(MODULES[kind]() for _ in range(3))
        for a in self.acts:
            if hasattr(a, "inplace"):
                a.inplace = inplace

    def forward(self, x):
        y = self.acts[0](self.bn1(self.conv1(x)))
        z = self.acts[1](self.bn2(self.conv2(y)) + y)
        w = self.acts[2](self.conv3(z))  # an activation on a convolution, read twice: left unfused
        return torch.flatten(F.adaptive_avg_pool2d(w, 1), 1) + torch.flatten(F.max_pool2d(w, 8), 1)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("kind", KINDS)
def test_footprint_model_prices_eager_and_bnff_as_autograd_keeps(kind, inplace, gen):
    model = _Net(kind, inplace).train()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    eager, restructured = measured_footprints(model, x)
