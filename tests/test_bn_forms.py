"""BN written other ways (``bnff.graph.bn_forms``): a ``BatchNorm2d`` subclass that applies its activation in
its own forward (the structure of timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``, written here: timm
cannot be installed in this CPU-only environment) and functional ``F.batch_norm`` / ``torch.batch_norm``
on a BN module's tensors are fused like ``nn.BatchNorm2d`` + activation; forms bnff cannot map are left
as they are, listed with the reason, and still train as eager does."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnff
from helpers import (assert_as_accurate_as_eager, compare_with_float64, every_backend, randomize_bn,  # noqa: F401
                     reference_only)

C = 8


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` as its source structures it (timm/layers/norm_act.py): a BatchNorm2d whose
    forward counts ``num_batches_tracked``, calls ``F.batch_norm`` with the running statistics unless
    they are not tracked, then applies ``self.drop`` and ``self.act``."""

    def __init__(self, num_features, act_layer=nn.SiLU, inplace=True, drop_layer=None, momentum=0.1):
        super().__init__(num_features, momentum=momentum)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if act_layer is not None else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-D input")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = True if self.training else (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                         self.weight, self.bias, batch_stats, factor, self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's ``SyncBatchNormAct``: ``SyncBatchNorm.forward``, then ``self.drop`` and ``self.act``."""

    def __init__(self, num_features, act_layer=nn.SiLU, inplace=True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=inplace)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ActThenBN(nn.BatchNorm2d):
    """A subclass whose forward is not BN followed by its children (the activation comes first)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return super().forward(self.act(x))


class Functional(nn.Module):
    """BN written with ``F.batch_norm`` (or ``torch.batch_norm``) on a BatchNorm2d module's tensors,
    counting its ``num_batches_tracked`` as the module would."""

    def __init__(self, how="F"):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.how = how

    def forward(self, x):
        bn = self.bn
        if self.training:
            bn.num_batches_tracked.add_(1)
        if self.how == "F":
            y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, bn.momentum,
                             bn.eps)
        else:
            y = torch.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, self.training, bn.momentum,
                                 bn.eps, False)
        return F.silu(y)


class OwnTensors(nn.Module):
    """``F.batch_norm`` on a module's own parameters and buffers: no BatchNorm module to fuse."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training))


class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.bn1 = norm()
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn2 = norm()
        self.conv3 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        y = self.conv3(self.bn2(self.conv2(x)))
        return self.fc((y + x).mean((2, 3)))


NORMS = {
    "BatchNormAct2d(SiLU)": lambda: BatchNormAct2d(C),
    "BatchNormAct2d(LeakyReLU(0.1))": lambda: BatchNormAct2d(C, act_layer=lambda inplace: nn.LeakyReLU(0.1, inplace)),
    "BatchNormAct2d(no act)": lambda: BatchNormAct2d(C, act_layer=None),
    "BatchNormAct2d(ReLU, cumulative average)": lambda: BatchNormAct2d(C, act_layer=nn.ReLU, momentum=None),
    "SyncBatchNormAct(Hardswish)": lambda: SyncBatchNormAct(C, act_layer=nn.Hardswish),
    "F.batch_norm": lambda: Functional("F"),
    "torch.batch_norm": lambda: Functional("torch"),
}
ACTS = {"BatchNormAct2d(SiLU)": "silu", "BatchNormAct2d(LeakyReLU(0.1))": "leaky_relu(0.1)",
        "BatchNormAct2d(no act)": None, "BatchNormAct2d(ReLU, cumulative average)": "relu", "SyncBatchNormAct(Hardswish)": "hardswish", "F.batch_norm": "silu",
        "torch.batch_norm": "silu"}


def _batch(gen):
    return lambda: (torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen))


@pytest.mark.parametrize("norm", NORMS)
def test_bn_written_other_ways_is_fused_and_trains_as_eager(norm, gen):
    """Both BNs fused, with the activation the form applies, no BN listed unfused; the same state_dict
    keys; fp32 training by the suite's rule against float64 (running statistics and
    num_batches_tracked included)."""
    model = Block(NORMS[norm])
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    report = bnff.fusion_report(fused)
    assert len(report.fused_bns) == 2 and not report.unfused_bns, report
    assert {g.act for g in report.groups} == {ACTS[norm]}
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen), steps=2, fused=fused))
    fresh = bnff.restructure(copy.deepcopy(model)).eval()  # eval mode: the running statistics
    x = torch.randn(2, 3, 8, 8, generator=gen)
    torch.testing.assert_close(fresh(x), model.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm, why", [
    (lambda: ActThenBN(C), "is not BN followed by its children"),
    (lambda: BatchNormAct2d(C, drop_layer=lambda: nn.Dropout(0.5)), "neither an identity nor an activation"),
    (OwnTensors, "not one BatchNorm module's"),
], ids=["act-before-bn", "dropout", "functional-own-tensors"])
@reference_only  # nothing is fused: no kernel runs
def test_forms_bnff_cannot_map_are_left_listed_and_train_as_eager(norm, why, gen):
    model = Block(norm)
    randomize_bn(model, gen)
    fused = bnff.restructure(copy.deepcopy(model))
    report = bnff.fusion_report(fused)
    listed = [u.reason for u in report.unfused_bns] + list(report.opaque.values())
    assert report.fused_bns == [] and any(re.search(why, r) for r in listed), (listed, str(report))
    assert_as_accurate_as_eager(compare_with_float64(model, _batch(gen), steps=2, fused=fused))


class OtherEps(nn.Module):
    """``F.batch_norm`` on a BatchNorm2d module's tensors but with another eps than the module's."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        bn = self.bn
        return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, bn.momentum,
                                   1e-3))


@reference_only  # the report only
def test_functional_batch_norm_unlike_its_module_is_listed_with_the_reason():
    report = bnff.fusion_report(bnff.restructure(Block(OtherEps)))
    assert report.fused_bns == []
    assert any("another mode or eps" in u.reason for u in report.unfused_bns), str(report)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``ops.FrozenBatchNorm2d``: weight, bias and running statistics as buffers."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, v in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                        ("running_var", torch.ones(n))):
            self.register_buffer(name, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


@reference_only  # nothing is fused: no kernel runs
def test_frozen_bn_is_left_as_it_is_and_listed(gen):
    model = Block(lambda: FrozenBatchNorm2d(C))
    fused = bnff.restructure(copy.deepcopy(model))
    report = bnff.fusion_report(fused)
    assert report.fused_bns == [] and sum("frozen BN" in u.reason for u in report.unfused_bns) == 2, str(report)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
