"""Every fusion pattern of docs/design.md section 4, in every spelling and BN configuration the issue
lists, trained on fresh random inputs and checked against float64 with the suite's rule (bnff's fp32
error at most ``helpers.K`` times eager's, tensor by tensor), plus float64 exactness and the
statistics' accuracy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnff
from bnff import models
from bnff.ops import backends, bn_statistics, feature_statistics
from helpers import (assert_as_accurate_as_eager, assert_rule, compare_with_float64, randomize_bn, reference_only,
                     train_side_by_side)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

pytestmark = pytest.mark.exactness  # also run in make test's AVX2 rehearsal
# every_backend also runs the triton kernels here (in Triton's interpreter), one spelling of each activation
# and of the add (the spellings differ in the graph, not in the sweeps; make test's time budget)
TRITON = lambda params: (params.get("act") not in ("F.relu", "torch.relu", "Tensor.relu", "F.relu6")  # noqa: E731
                         and params.get("add") in (None, "iadd"))

C = 8


def _act(kind):
    return {
        None: lambda t: t,
        "nn.ReLU": nn.ReLU(inplace=True),
        "F.relu": F.relu,
        "torch.relu": torch.relu,
        "Tensor.relu": lambda t: t.relu(),
        "nn.ReLU6": nn.ReLU6(inplace=True),
        "F.relu6": F.relu6,
    }[kind]


class Pattern(nn.Module):
    """conv1 -> [BN] -> [+ shortcut] -> [act] -> consumer, with every knob the patterns need."""

    def __init__(self, bn=True, shortcut=None, act="nn.ReLU", add="iadd", consumer="conv",
                 conv_bias=False, **bn_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(C, **bn_kwargs) if bn else None
        self.shortcut, self.add_style = shortcut, add
        if shortcut == "projection":
            self.conv3 = nn.Conv2d(C, C, 1, bias=conv_bias)
            self.bn3 = nn.BatchNorm2d(C, **bn_kwargs)
        self.act = _act(act)
        self.consumer = consumer
        if consumer == "conv":
            self.conv2 = nn.Conv2d(C, 4, 3, padding=1, stride=2, bias=conv_bias)
        elif consumer == "maxpool":
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        elif consumer == "avgpool":
            self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C if consumer in ("avgpool", "none") else 4 if consumer == "conv" else C, 3)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.bn1(out)
        if self.shortcut is not None:
            identity = x if self.shortcut == "identity" else self.bn3(self.conv3(x))
            if self.add_style == "iadd":
                out += identity
            elif self.add_style == "add":
                out = out + identity
            else:
                out = torch.add(out, identity)
        out = self.act(out)
        if self.consumer == "conv":
            out = self.conv2(out)
        elif self.consumer in ("maxpool", "avgpool"):
            out = self.pool(out)
        else:
            out = out.mean((2, 3), keepdim=True) + out[:, :, :1, :1]  # two users: materialized
        return self.fc(torch.flatten(out.mean((2, 3), keepdim=True), 1))


def _check(model, gen, n=6, hw=10, steps=3, expect_fused=None, channels=C):
    """Restructure ``model``, check how many BNs were fused, and check ``steps`` training steps against
    float64 with the suite's rule, tensor by tensor (``helpers.assert_as_accurate_as_eager``)."""
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    report = bnff.fusion_report(fused)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.fused_bns) == (n_bn if expect_fused is None else expect_fused), str(report)
    assert_as_accurate_as_eager(compare_with_float64(model, _batch_of(gen, n, hw, channels), steps=steps))
    return report


def _batch_of(gen, n, hw, channels):
    return lambda: (torch.randn(n, channels, hw, hw, generator=gen) * 2 + 0.5, torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("act", ["nn.ReLU", "F.relu", "torch.relu", "Tensor.relu", "nn.ReLU6", "F.relu6", None])
def test_pattern_3_and_2_every_activation_spelling(act, gen):
    report = _check(Pattern(act=act), gen)
    assert report.groups[0].pattern == ("(3)" if act else "(2)")
    assert report.groups[0].consumers == ("conv2",)


@pytest.mark.parametrize("add", ["iadd", "add", "torch.add"])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_pattern_4_residual_add(shortcut, add, gen):
    report = _check(Pattern(shortcut=shortcut, add=add), gen)
    assert report.groups[0].pattern == ("(4)-1" if shortcut == "identity" else "(4)-2")
    assert report.groups[0].add


def test_pattern_1_relu_between_convolutions(gen):
    report = _check(Pattern(bn=False, conv_bias=True), gen)
    assert [g.pattern for g in report.groups] == ["(1)"]


@pytest.mark.parametrize("consumer, pattern", [("maxpool", "stem"), ("avgpool", "head")])
def test_stem_and_head_pool_consumers(consumer, pattern, gen):
    shortcut = "identity" if consumer == "avgpool" else None
    report = _check(Pattern(consumer=consumer, shortcut=shortcut), gen)
    assert report.groups[0].pattern == pattern


def test_materialized_when_output_has_two_users(gen):
    report = _check(Pattern(consumer="none", shortcut="projection"), gen)
    assert report.groups[0].consumers == ()
    assert "2 users" in report.groups[0].materialized_because


@pytest.mark.parametrize("bn_kwargs", [
    dict(momentum=0.1), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
    dict(eps=1e-3), dict(momentum=0.3, eps=1e-3, conv_bias=True),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("shortcut", [None, "projection"])
def test_bn_configurations(bn_kwargs, shortcut, gen):
    _check(Pattern(shortcut=shortcut, **bn_kwargs), gen, steps=4)


def test_eval_mode_uses_running_statistics_and_trains_through(gen):
    model = Pattern(shortcut="projection").eval()
    _check(model, gen)


@reference_only
def test_float64_is_exact(gen):
    """In float64 the restructured algebra must agree with eager to rounding: m * eps per reduction
    of m = 4 * 6 * 6 values, with a factor 16 for the few reductions in a row (about 5e-12)."""
    model = Pattern(shortcut="projection", act="nn.ReLU6").double()
    randomize_bn(model, gen)
    bound = 16 * 4 * 6 * 6 * torch.finfo(torch.float64).eps
    for e in train_side_by_side(model, lambda: (torch.randn(4, C, 6, 6, generator=gen), None), dtype=torch.float64):
        assert max(e.output, e.input_grad, e.param_grad, e.buffers) <= bound, e


def test_one_value_per_channel_raises_like_eager(gen):
    model = Pattern(consumer="avgpool")
    fused = bnff.restructure(copy.deepcopy(model))
    x = torch.randn(1, C, 1, 1, generator=gen)
    with pytest.raises(ValueError) as eager_err:
        model(x)
    with pytest.raises(ValueError) as fused_err:
        fused(x)
    assert str(fused_err.value) == str(eager_err.value)


def test_one_sweep_variance_with_mean_1e4_times_std(every_backend, gen):
    """Per-channel mean 10^4 x std: the variance (and the running variance) as close to float64 as
    eager's own statistics (``torch.var_mean`` in fp32, what ``F.batch_norm`` computes), by the rule."""
    std = torch.rand(C, generator=gen) + 0.5
    c = (torch.randn(16, C, 12, 12, generator=gen) * std.view(1, -1, 1, 1) + 1e4 * std.view(1, -1, 1, 1))
    var64, mean64 = torch.var_mean(c.double(), (0, 2, 3), correction=0)
    var32, mean32 = torch.var_mean(c, (0, 2, 3), correction=0)
    backend = every_backend
    mean, var = backends.get(backend).channel_stats(c)

    assert_rule(var, var32, var64, "var")
    assert_rule(mean, mean32, mean64, "mean")
    bn, eager_bn = nn.BatchNorm2d(C, momentum=None), nn.BatchNorm2d(C, momentum=None)
    bn_statistics((c,), (feature_statistics(c, (bn,), backend),), bn)
    eager_bn(c)
    unbiased = var64 * c[:, 0].numel() / (c[:, 0].numel() - 1)
    assert_rule(bn.running_var, eager_bn.running_var, unbiased, "running_var")
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["relu", "relu6-top"])
@pytest.mark.parametrize("mean_scale, bound", [(0.0, 1.5), (1.0, 1.5), (1e3, 0.1)], ids=["centred", "mean~std", "mean>>std"])
def test_apply_near_a_threshold_as_accurate_as_eager(every_backend, threshold, mean_scale, bound, gen):
    """Issue 29 item 7: the pre-activation F1 (x - mu) + beta of inputs placed within ~1e-4 of the point
    where it crosses an activation threshold, against float64 BN of the same float32 inputs: bnff's
    error (L2, median of 5 draws) at most ``bound`` times eager's ``F.batch_norm``; with |mean| >> std,
    where eager's x * alpha + (beta - mu * alpha) cancels, a tenth of it (the centred form's protection)."""
    be, eps, ratios = backends.get(every_backend), 1e-5, []
    for _ in range(5):
        mu = torch.randn(C, generator=gen) * (1 + mean_scale)
        var, gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen), 2 * torch.randn(C, generator=gen)
        f1 = be.scale(var, gamma, eps)
        x0 = mu + (threshold - beta) / f1
        x = x0.view(1, -1, 1, 1) + torch.randn(8, C, 12, 12, generator=gen) * 1e-4 * x0.abs().clamp_min(1).view(1, -1, 1, 1)
        d = lambda v: v.double().view(1, -1, 1, 1)  # noqa: E731
        z64 = (x.double() - d(mu)) / torch.sqrt(d(var) + eps) * d(gamma) + d(beta)
        z = be.apply([[x]], [mu], [f1], [beta], [], None, torch.float32)
        z_eager = F.batch_norm(x, mu, var, gamma, beta, False, 0.1, eps)
        ratios.append((z.double() - z64).norm().item() / (z_eager.double() - z64).norm().item())
    assert sorted(ratios)[2] <= bound, ratios


# --- the connections of DenseNet, Inception-v3 and MobileNetV2 ------------------------------------


def test_densenet_icf_block_transition_and_head(gen):
    """A small DenseNet: every norm1 normalizes a concatenation (ICF), transitions and the head too."""
    model = models.DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2, num_classes=3,
                            small_input=True)
    report = _check(model, gen, channels=3, steps=1)  # 13 BNs deep: one step (whole models: test_families.py)
    by_bn = {b: (g, s) for g in report.groups for b, s in zip(g.bns, g.sources)}
    # layer 3 of block 1 normalizes the block input and the two earlier layers' features
    group, sources = by_bn["features.denseblock1.denselayer3.norm1"]
    assert len(sources) == 3 and group.icf and group.consumers == ("features.denseblock1.denselayer3.conv1",)
    assert len(by_bn["features.transition1.norm"][1]) == 4
    assert by_bn["features.norm5"][0].pattern == "head" and len(by_bn["features.norm5"][1]) == 3


def test_densenet_statistics_swept_once_per_feature_map(gen, monkeypatch):
    """ICF: each feature map's channel statistics are computed once, by a sweep over the map itself,
    never over a concatenation, however many BNs normalize it."""
    model = models.DenseNet(growth_rate=4, block_config=(4,), num_init_features=8, bn_size=2, num_classes=3,
                            small_input=True)
    fused = bnff.restructure(model)
    swept = []
    ref = backends.get(backends.default())
    monkeypatch.setattr(ref, "channel_stats", lambda c, f=ref.channel_stats: swept.append(tuple(c.shape)) or f(c))
    fused(torch.randn(2, 3, 6, 6, generator=gen))
    # conv0; the block input (stem output); per layer: conv1 (for norm2) and conv2 (its new features)
    assert len(swept) == 1 + 1 + 2 * 4
    assert max(shape[1] for shape in swept) == 8  # no sweep over a concatenation (up to 8 + 4*4 channels)


class InceptionLike(nn.Module):
    """conv->BN->ReLU feeding two convolutions (Inception-v3's module E), a functional max-pool, and
    a concatenation; a functional average pool of the block input feeding a conv->BN->ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = models.inception.BasicConv2d(C, C, kernel_size=1)
        self.a = models.inception.BasicConv2d(C, C, kernel_size=(1, 3), padding=(0, 1))
        self.b = models.inception.BasicConv2d(C, C, kernel_size=(3, 1), padding=(1, 0))
        self.pool_branch = models.inception.BasicConv2d(C, C, kernel_size=1)
        self.fc = nn.Linear(3 * C * 4, 3)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x), self.b(x), self.pool_branch(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))], 1)
        y = F.max_pool2d(y, kernel_size=3, stride=2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))


def test_inception_several_consumers_pools_and_concatenation(gen):
    report = _check(InceptionLike(), gen)
    stem = next(g for g in report.groups if g.bns == ("stem.bn",))
    # one BN result with three users, two convolutions and the functional average pool: applied once
    # per consumer (one BN, no shortcut: 2k transfers against 2k + 2 materialized; test below)
    assert stem.consumers == ("a.conv", "b.conv", "avg_pool2d"), stem.consumers
    branch = next(g for g in report.groups if g.bns == ("a.bn",))
    assert branch.consumers == () and "concatenates" in branch.materialized_because


@reference_only  # no sweep runs: restructuring and the report only
def test_per_consumer_cost_rule():
    """Applying per consumer pays with one BN (2k vs 2k+2 feature-map transfers), not with a
    shortcut or a projection and two consumers (9 vs 8, 8 vs 7)."""
    from bnff.plan.match import per_consumer_pays
    assert per_consumer_pays(1, 0, 2, True) and per_consumer_pays(1, 0, 4, False)
    assert per_consumer_pays(1, 1, 1, True) and per_consumer_pays(2, 0, 1, True)
    assert not per_consumer_pays(1, 1, 2, True) and not per_consumer_pays(2, 0, 2, True)


class MobileNetLike(nn.Module):
    """Stem, an inverted residual with the shortcut (linear bottleneck + add), one with stride 2, head."""

    def __init__(self):
        super().__init__()
        mb = models.mobilenet
        relu6 = dict(activation_layer=nn.ReLU6)
        self.features = nn.Sequential(mb.Conv2dNormActivation(C, 8, stride=1, **relu6), mb.InvertedResidual(8, 8, 1, 2),
                                      mb.InvertedResidual(8, 12, 2, 2), mb.Conv2dNormActivation(12, 16, 1, **relu6))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1))


def test_mobilenet_relu6_depthwise_and_linear_bottleneck(gen):
    report = _check(MobileNetLike(), gen)
    patterns = [g.pattern for g in report.groups]
    assert {g.act for g in report.groups} == {"relu6", None}
    # a depthwise convolution consumes the expand BN's result and produces the next BN's input
    dw = next(g for g in report.groups if g.bns == ("features.2.conv.0.1",))
    assert dw.consumers == ("features.2.conv.1.0",) and dw.act == "relu6"
    assert report.groups[-1].pattern == "head"  # a functional adaptive average pool
    # the linear bottleneck: project BN + block input, no activation
    assert any(p == "(4)-1" and g.act is None for p, g in zip(patterns, report.groups))
