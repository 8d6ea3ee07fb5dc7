"""EfficientNet-B0 (Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019).

Written to match torchvision's ``torchvision/models/efficientnet.py`` module for module and name for name
(5,288,548 parameters), so a torchvision ``state_dict`` loads with ``strict=True``. No weights are
downloaded: torchvision's initialisation is used.

Each MBConv block is 1x1 expand conv -> BN -> SiLU (left out at expansion 1), k x k depthwise conv -> BN
-> SiLU, squeeze-and-excitation (SiLU inside, a sigmoid gate), 1x1 project conv -> BN (linear), plus the
block input through stochastic depth when the shapes allow (stride 1, same channels). Stochastic depth
grows linearly from 0 to 0.2 over the 16 blocks.

``small_input=True`` gives the variant for 32x32 images: the stem and the second stage use stride 1.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bnff.models.blocks import (Conv2dNormActivation, PooledClassifier, SqueezeExcitation, StochasticDepth, init_weights,
                                make_divisible)


class MBConv(nn.Module):
    """Expand (1x1) -> depthwise (k x k) -> squeeze-and-excitation -> project (1x1, linear) [+ input]."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int,
                 stochastic_depth_prob: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"illegal stride value {stride}")
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded = make_divisible(input_channels * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded, kernel_size=1, activation_layer=nn.SiLU))
        layers += [
            Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded,
                                 activation_layer=nn.SiLU),
            SqueezeExcitation(expanded, max(1, input_channels // 4), activation=lambda: nn.SiLU(inplace=True)),
            Conv2dNormActivation(expanded, out_channels, kernel_size=1, activation_layer=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(PooledClassifier):
    """EfficientNet with torchvision's layout (``features``, ``avgpool``, ``classifier``).

    Args:
        num_classes: classifier outputs.
        width_mult, depth_mult: the compound scaling's channel and depth multipliers (B0: 1.0, 1.0).
        dropout: dropout before the classifier.
        stochastic_depth_prob: the last block's drop probability (linear from 0 over the blocks).
        small_input: stride 1 in the stem and the second stage, for 32x32 images.
    """

    # expansion, kernel, stride, input channels, output channels, blocks (torchvision's B0 setting)
    SETTING = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0,
                 dropout: float = 0.2, stochastic_depth_prob: float = 0.2, small_input: bool = False) -> None:
        super().__init__()
        ch = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731
        setting = [(e, k, s, ch(i), ch(o), int(math.ceil(n * depth_mult))) for e, k, s, i, o, n in self.SETTING]
        layers: list[nn.Module] = [Conv2dNormActivation(3, setting[0][3], kernel_size=3, stride=1 if small_input else 2,
                                                        activation_layer=nn.SiLU)]
        total = sum(n for *_, n in setting)
        block_id = 0
        for stage, (e, k, s, i, o, n) in enumerate(setting):
            if small_input and stage == 1:
                s = 1
            blocks = []
            for b in range(n):
                blocks.append(MBConv(e, k, s if b == 0 else 1, i if b == 0 else o, o,
                                     stochastic_depth_prob * block_id / total))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_in = setting[-1][4]
        layers.append(Conv2dNormActivation(last_in, 4 * last_in, kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(4 * last_in, num_classes))

        init_weights(self, linear="uniform")



def efficientnet_b0(num_classes: int = 1000, small_input: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-B0: 5,288,548 parameters (1000 classes)."""
    return EfficientNet(num_classes=num_classes, small_input=small_input, **kwargs)
