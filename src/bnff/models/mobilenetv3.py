"""MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019).

Written to match torchvision's ``torchvision/models/mobilenetv3.py`` module for module and name for name
(5,483,032 parameters), so a torchvision ``state_dict`` loads with ``strict=True``. No weights are
downloaded: torchvision's initialisation is used.

Each inverted residual is 1x1 expand conv -> BN -> ReLU or Hardswish (left out where the expansion
keeps the channels), k x k depthwise conv -> BN -> the same activation, squeeze-and-excitation in some
blocks (ReLU inside, a Hardsigmoid gate), 1x1 project conv -> BN (linear), plus the block input when
the shapes allow. BN has eps 0.001 and momentum 0.01, as torchvision builds it.

``small_input=True`` gives the variant for 32x32 images: the stem and the first stride-2 block use
stride 1.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from bnff.models.blocks import Conv2dNormActivation, PooledClassifier, SqueezeExcitation, init_weights, make_divisible

_BN = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (k x k) -> [squeeze-and-excitation] -> project (1x1, linear) [+ input]."""

    def __init__(self, input_channels: int, kernel: int, expanded: int, out_channels: int, use_se: bool,
                 hardswish: bool, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"illegal stride value {stride}")
        self.use_res_connect = stride == 1 and input_channels == out_channels
        act = nn.Hardswish if hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded, kernel_size=1, activation_layer=act,
                                               norm_layer=_BN))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded,
                                           activation_layer=act, norm_layer=_BN))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8), scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded, out_channels, kernel_size=1, activation_layer=None, norm_layer=_BN))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(PooledClassifier):
    """MobileNetV3-Large with torchvision's layout (``features``, ``avgpool``, ``classifier``).

    Args:
        num_classes: classifier outputs.
        dropout: dropout in the classifier.
        small_input: stride 1 in the stem and the first stride-2 block, for 32x32 images.
    """

    # input, kernel, expanded, output channels, squeeze-and-excitation, Hardswish (else ReLU), stride
    SETTING = ((16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
               (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
               (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
               (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
               (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1))
    LAST_CHANNEL = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, small_input: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, self.SETTING[0][0], kernel_size=3,
                                                        stride=1 if small_input else 2,
                                                        activation_layer=nn.Hardswish, norm_layer=_BN)]
        for i, (inp, k, exp, out, se, hs, s) in enumerate(self.SETTING):
            layers.append(InvertedResidual(inp, k, exp, out, se, hs, 1 if small_input and i == 1 else s))
        last_in = self.SETTING[-1][3]
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, kernel_size=1, activation_layer=nn.Hardswish,
                                           norm_layer=_BN))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, self.LAST_CHANNEL), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(self.LAST_CHANNEL, num_classes))

        init_weights(self)



def mobilenet_v3_large(num_classes: int = 1000, small_input: bool = False, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large: 5,483,032 parameters (1000 classes)."""
    return MobileNetV3(num_classes=num_classes, small_input=small_input, **kwargs)
