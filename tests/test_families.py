"""DenseNet, Inception-v3 and MobileNetV2 restructured whole: float64 exactness of every gradient,
fp32 as close to float64 as eager (the suite's rule, ``helpers.K``), bf16/channels_last, the fusion
report, train/eval graphs, and dense-block memory growth.

fp32 gradients of whole networks are not element-wise comparable between any two implementations
(a pre-activation within rounding of a ReLU/ReLU6 threshold flips its mask; see
``helpers.assert_aggregate_as_accurate_as_eager``): they are checked summed over the network here,
tensor by tensor per connection in test_patterns.py, and exactly in float64.
"""

import copy

import pytest
import torch
from torch import nn

import bnff
from bnff import models
from bnff.memory import saved_activation_bytes
from helpers import (assert_aggregate_as_accurate_as_eager, assert_bf16_tracks_eager, assert_float64_exact,
                     assert_rule, compare_with_float64, cpu_only, randomize_bn, reference_only)
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

# Small-input variants and the smallest input each handles quickly on 2 cores.
FAMILIES = {"densenet121": 16, "inception_v3": 32, "mobilenet_v2": 16}
# EfficientNet-B0, MobileNetV3-Large and RegNetY-1.6GF (SiLU, Hardswish, squeeze-and-excitation, stochastic
# depth, grouped convolutions; the report test below covers RegNetY, the training tests the first two): every
# BN fused; unfused only the activations inside squeeze-and-excitation (on pooled 1x1 vectors, after a
# convolution without BN), the classifier's Hardswish, and EfficientNet's residual adds behind
# stochastic depth (a per-sample multiply between the last BN and the add)
NEW_FAMILIES = {"efficientnet_b0": 16, "mobilenet_v3_large": 16, "cspdarknet53": 32}  # cspdarknet53 at 16x16: a 1x1 last
# stage, BN over 2 values per channel: too ill-conditioned for the float64 bound
FLOAT64_ONLY = {"regnet_y_1_6gf": 16}  # float64 exactness only, to keep make test under its budget


def _model(name, gen, **kwargs):
    model = models.MODELS[name](num_classes=10, small_input=True, **kwargs)
    randomize_bn(model, gen)
    return model


def _batch(gen, hw, n=4):
    return lambda: (torch.randn(n, 3, hw, hw, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.exactness
@reference_only
@pytest.mark.parametrize("name", sorted(FAMILIES | NEW_FAMILIES | FLOAT64_ONLY))
def test_float64_every_gradient_and_running_stat_exact(name, gen):
    model = _model(name, gen).double()
    size = (FAMILIES | NEW_FAMILIES | FLOAT64_ONLY)[name]
    assert_float64_exact(model, _batch(gen, size, n=2))


@pytest.mark.exactness
@cpu_only  # the reference backend's math: the float64 test above and the pattern tests (make test's budget)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fp32_as_accurate_as_eager_against_float64(name, gen):
    """Three steps (weights fixed, running statistics accumulating): outputs, input gradient and every
    running statistic tensor by tensor, the parameter gradients summed (a ReLU6/ReLU mask element
    within rounding of its threshold may flip in either implementation; see helpers)."""
    steps = compare_with_float64(_model(name, gen), _batch(gen, FAMILIES[name]), steps=3)
    assert_aggregate_as_accurate_as_eager(steps)


@pytest.mark.exactness
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_autocast_channels_last_tracks_eager(name, gen):
    """bf16 keeps 8 mantissa bits: eager bf16 is itself far off float64; bnff must be as close."""
    model = _model(name, gen).to(memory_format=torch.channels_last)
    hw = FAMILIES[name]
    x = torch.randn(4, 3, hw, hw, generator=gen).to(memory_format=torch.channels_last)
    assert_bf16_tracks_eager(model, x)


def _all_bns(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))


@reference_only  # no sweep runs: restructuring and the report only
@pytest.mark.parametrize("name", ["densenet121", "densenet169", "densenet201", "inception_v3", "mobilenet_v2"])
def test_every_batchnorm_fused(name):
    model = models.MODELS[name]()
    report = bnff.fusion_report(bnff.restructure(model))
    assert sorted(report.fused_bns) == _all_bns(model) and not report.unfused, str(report)


@reference_only  # no sweep runs: restructuring and the report only
def test_densenet121_report_icf_groups():
    report = bnff.fusion_report(bnff.restructure(models.densenet121()))
    assert len(report.fused_bns) == 121
    assert report.groups[0].pattern == "stem" and report.groups[-1].pattern == "head"
    # 58 norm1 + 3 transitions + norm5 normalize concatenations; the first layer of each block
    # sees the block input alone
    assert sum(g.icf for g in report.groups) == 58 - 4 + 3 + 1
    norm5 = report.groups[-1]
    assert norm5.bns == ("features.norm5",) and len(norm5.sources[0]) == 1 + 16


@reference_only  # no sweep runs: restructuring and the report only
def test_inception_v3_report_consumers_and_materialized_branches():
    report = bnff.fusion_report(bnff.restructure(models.inception_v3()))
    assert len(report.fused_bns) == 96 and report.mode_dependent
    multi = [g for g in report.groups if len(g.consumers) > 1]
    # module E: the 1x1 and 3x3 outputs feed a 1x3 and a 3x1 convolution each, in Mixed_7b and 7c
    assert sorted(g.bns[0] for g in multi) == [f"Mixed_7{b}.branch3x3{s}.bn" for b in "bc" for s in ("_1", "dbl_2")]
    materialized = [g for g in report.groups if not g.consumers]
    assert len(materialized) == 44 and all("concatenates" in g.materialized_because for g in materialized)
    assert [g.pattern for g in report.groups[:5]] == ["(3)", "(3)", "stem", "(3)", "stem"]


@reference_only  # no sweep runs: restructuring and the report only
def test_mobilenet_v2_report_patterns():
    report = bnff.fusion_report(bnff.restructure(models.mobilenet_v2()))
    acts = [g.act for g in report.groups]
    assert acts.count("relu6") == 35 and acts.count(None) == 17  # 17 linear bottlenecks
    assert sum(g.pattern == "(4)-1" for g in report.groups) == 10  # blocks with a shortcut
    assert report.groups[-1].pattern == "head"


@reference_only  # no sweep runs: restructuring and the report only
@pytest.mark.parametrize("name, acts, squeezed, unfused", [
    # stem + head + 16 depthwise + 15 expansions with SiLU; 16 linear projections; 16 SE blocks taken
    # into their projections; unfused the 9 adds after stochastic depth (a multiplication between the
    # last BN and the add)
    ("efficientnet_b0", {"silu": 2 + 16 + 15, None: 16}, 16, {"add": 9}),
    # ReLU blocks 0-5 (block 0 has no expansion), Hardswish blocks 6-14 with the stem and head; 15
    # projections; 8 SE blocks; unfused the classifier's Hardswish on a (N, 1280) vector
    ("mobilenet_v3_large", {"relu": 1 + 5 * 2, "hardswish": 9 * 2 + 2, None: 15}, 8, {"act": 1}),
    # stem, a and b of 27 blocks; c with its shortcut (22 identity, 4 projections: 2 BNs in one group);
    # 27 SE blocks taken into the c convolutions, their ReLUs and sigmoids with them
    ("regnet_y_1_6gf", {"relu": 1 + 27 * 2 + 27}, 27, {}),
    # timm's BatchNormAct2d everywhere (expanded by bnff.graph.bn_forms), LeakyReLU(0.01); unfused the 23
    # Darknet-block adds, which come after the activation
    ("cspdarknet53", {"leaky_relu(0.01)": 67}, 0, {"add": 23}),
])
def test_new_families_fuse_every_batchnorm(name, acts, squeezed, unfused):
    model = models.MODELS[name]()
    report = bnff.fusion_report(bnff.restructure(model))
    assert sorted(report.fused_bns) == _all_bns(model), str(report)
    got = {}
    for g in report.groups:
        if g.bns:
            got[g.act] = got.get(g.act, 0) + 1
    assert got == acts, got
    assert sum(bool(g.squeeze) for g in report.groups) == squeezed
    kinds = {}
    for u in report.unfused:
        kinds[u.kind] = kinds.get(u.kind, 0) + 1
    assert kinds == unfused, str(report)


@cpu_only
@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_new_families_fp32_as_accurate_as_eager(name, gen):
    """Stochastic depth on (the same masks in every run, helpers._run seeds them)."""
    steps = compare_with_float64(_model(name, gen), _batch(gen, NEW_FAMILIES[name], n=2), steps=3)
    assert_aggregate_as_accurate_as_eager(steps)


def test_inception_train_and_eval_graphs_follow_the_mode(gen):
    model = _model("inception_v3", gen)
    fused = bnff.restructure(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    out = fused(x)
    assert isinstance(out, models.InceptionOutputs) and out.aux_logits.shape == (2, 10)
    eager = copy.deepcopy(model).eval()
    fused.load_state_dict(eager.state_dict())
    fused.eval()
    with torch.no_grad():
        y, ref = fused(x), copy.deepcopy(eager).double()(x.double())
        assert isinstance(y, torch.Tensor)
        assert_rule(y, eager(x), ref, "eval output")
    assert isinstance(copy.deepcopy(fused.train())(x), models.InceptionOutputs)
    assert isinstance(copy.deepcopy(fused).eval()(x), torch.Tensor)


def _dense_block(layers):
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False),
                         models.densenet._DenseBlock(layers, 64, bn_size=4, growth_rate=32, drop_rate=0.0))


def test_dense_block_activations_grow_linearly(gen):
    """ICF keeps each feature map once (no per-layer copy of the normalized concatenation): the
    bytes saved for backward grow linearly with the number of layers, eager's quadratically."""
    x = torch.randn(4, 3, 16, 16, generator=gen)
    sizes = (6, 12, 24)
    eager = [saved_activation_bytes(_dense_block(n), x) for n in sizes]
    fused = [saved_activation_bytes(bnff.restructure(_dense_block(n)), x) for n in sizes]
    per_layer_fused = [(fused[i + 1] - fused[i]) / (sizes[i + 1] - sizes[i]) for i in range(2)]
    per_layer_eager = [(eager[i + 1] - eager[i]) / (sizes[i + 1] - sizes[i]) for i in range(2)]
    assert per_layer_fused[1] <= 1.03 * per_layer_fused[0], per_layer_fused  # linear (+ (C,) vectors)
    assert per_layer_eager[1] >= 1.5 * per_layer_eager[0], per_layer_eager  # quadratic
    assert fused[-1] < 0.5 * eager[-1]


@pytest.mark.exactness
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_eval_mode_matches_eager_and_skips_statistics(name, gen, monkeypatch):
    """Eval mode normalizes with the running statistics: no statistics sweep runs, no buffer moves."""
    model = _model(name, gen)
    eager, fused = copy.deepcopy(model).eval(), bnff.restructure(copy.deepcopy(model)).eval()
    swept = []
    monkeypatch.setattr(bnff.ops.backends.get(bnff.ops.backends.default()), "channel_stats", lambda c: swept.append(c))
    x = torch.randn(2, 3, FAMILIES[name], FAMILIES[name], generator=gen)
    before = [b.clone() for b in fused.buffers()]
    with torch.no_grad():
        ref = copy.deepcopy(model).double().eval()(x.double())
        assert_rule(fused(x), eager(x), ref, "eval output")
    assert not swept and all(torch.equal(a, b) for a, b in zip(before, fused.buffers()))
