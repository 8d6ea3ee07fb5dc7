"""CSPDarknet-53 (Wang et al., "CSPNet: A New Backbone that can Enhance Learning Capability of CNN",
CVPR Workshops 2020; the backbone of YOLOv4), written as timm's ``cspdarknet53`` builds it.

Module for module and name for name as timm's ``timm/models/cspnet.py`` (27,642,184 parameters with
1000 classes), so a timm ``state_dict`` loads with ``strict=True``. No weights are downloaded: timm's
initialisation is used. Its blocks are timm's: ``ConvNormAct`` (``conv``, then ``bn``, a
``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose forward applies BN, then ``drop`` and ``act``,
here LeakyReLU with timm's default slope 0.01, in place). This is the BN form ``bnff.graph.bn_forms``
expands.

Stem: 3x3 conv to 32 channels, stride 1. Five cross-stage-partial stages (depths 1, 2, 8, 8, 4; widths
64 .. 1024), each: a 3x3 stride-2 ``conv_down``; a 1x1 ``conv_exp``, whose output is split in two
halves along channels; Darknet blocks (1x1 conv, 3x3 conv, added to the block input, no activation
after the add) on the second half; a 1x1 ``conv_transition_b``; the two halves concatenated; a 1x1
``conv_transition``. The first stage expands to twice its width and halves its blocks' bottleneck.

``small_input=True`` gives the variant for 32x32 images: the first stage keeps stride 1.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: BN (``F.batch_norm`` with the module's statistics, as
    ``BatchNorm2d.forward``), then ``drop`` (identity here) and ``act`` (LeakyReLU(0.01), in place).
    The ``state_dict`` keys are a ``BatchNorm2d``'s."""

    def __init__(self, num_features: int, act_layer=nn.LeakyReLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, use_batch, momentum, self.eps)
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: ``conv`` (k x k, no bias, symmetric padding (k - 1) // 2) then ``bn``, a
    ``BatchNormAct2d`` (``apply_act=False``: its ``act`` is the identity)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.bn = BatchNormAct2d(out_channels, nn.LeakyReLU if apply_act else nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class DarkBlock(nn.Module):
    """1x1 ``conv1`` to ``mid`` channels, 3x3 ``conv2`` back, plus the block input (timm's ``DarkBlock``;
    ``attn`` and ``drop_path`` are identities in CSPDarknet-53)."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, mid, 1)
        self.attn = nn.Identity()
        self.conv2 = ConvNormAct(mid, channels, 3)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_path(self.conv2(self.attn(self.conv1(x)))) + x


class CrossStage(nn.Module):
    """timm's ``CrossStage`` with ``down_growth``: ``conv_down`` (3x3, ``stride``) to ``out`` channels,
    ``conv_exp`` (1x1) to ``expand`` channels, split in two halves; ``blocks`` on the second, then
    ``conv_transition_b``; the halves concatenated into ``conv_transition``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, depth: int, expand_ratio: float,
                 bottle_ratio: float, block_ratio: float) -> None:
        super().__init__()
        self.expand_chs = expand = int(round(out_channels * expand_ratio))
        block_out = int(round(out_channels * block_ratio))
        self.conv_down = ConvNormAct(in_channels, out_channels, 3, stride)
        self.conv_exp = ConvNormAct(out_channels, expand, 1)
        self.blocks = nn.Sequential(*[DarkBlock(block_out, int(round(block_out * bottle_ratio))) for _ in range(depth)])
        self.conv_transition_b = ConvNormAct(block_out, expand // 2, 1)
        self.conv_transition = ConvNormAct(expand, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class ClassifierHead(nn.Module):
    """Global average pool (``global_pool``), ``fc`` on the (N, C) vector (timm's ``ClassifierHead``)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.global_pool(x), 1))


class CspDarknet(nn.Module):
    """CSPDarknet-53; see the module docstring.

    Args:
        num_classes: logits per image.
        small_input: stride 1 in the first stage, for 32x32 images.
    """

    def __init__(self, num_classes: int = 1000, small_input: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvNormAct(3, 32, 3))
        widths, depths = (64, 128, 256, 512, 1024), (1, 2, 8, 8, 4)
        stages, prev = [], 32
        for i, (w, d) in enumerate(zip(widths, depths)):
            first = i == 0
            stages.append(CrossStage(prev, w, 1 if first and small_input else 2, d, expand_ratio=2.0 if first else 1.0,
                                     bottle_ratio=0.5 if first else 1.0, block_ratio=1.0 if first else 0.5))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(prev, num_classes)
        for m in self.modules():  # timm's _init_weights with zero_init_last
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DarkBlock):
                nn.init.zeros_(m.conv2.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def cspdarknet53(num_classes: int = 1000, small_input: bool = False) -> CspDarknet:
    """CSPDarknet-53: 27,642,184 parameters (1000 classes)."""
    return CspDarknet(num_classes, small_input)


__all__ = ["BatchNormAct2d", "ConvNormAct", "CspDarknet", "cspdarknet53"]
