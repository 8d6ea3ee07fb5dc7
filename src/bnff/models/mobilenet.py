"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018).

Written to match torchvision's ``torchvision/models/mobilenetv2.py`` module for module and name
for name (3,504,872 parameters at width 1.0), so a torchvision ``state_dict`` loads with
``strict=True``. No weights are downloaded: torchvision's initialisation is used.

Each inverted residual is 1x1 expand conv -> BN -> ReLU6 -> 3x3 depthwise conv (groups = channels)
-> BN -> ReLU6 -> 1x1 project conv -> BN (the linear bottleneck: no activation), plus the block
input when the shapes allow (stride 1, same channels).

``small_input=True`` gives the variant for 32x32 images: the stem and the first stride-2 stage
use stride 1 (a CIFAR-style network that ends at 4x4 instead of 1x1).

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnff.models.blocks import Conv2dNormActivation, init_weights
from bnff.models.blocks import make_divisible as _make_divisible


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear) [+ input]."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's layout (``features`` Sequential, ``classifier`` Sequential).

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier.
        round_nearest: channel counts are multiples of this.
        dropout: dropout before the classifier.
        small_input: stride 1 in the stem and the first stride-2 stage, for 32x32 images.
    """

    # t (expansion), c (channels), n (blocks), s (stride of the first block)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2, small_input: bool = False) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=1 if small_input else 2,
                                                           activation_layer=nn.ReLU6)]
        for stage, (t, c, n, s) in enumerate(self.SETTING):
            output_channel = _make_divisible(c * width_mult, round_nearest)
            if small_input and stage == 1:
                s = 1
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, small_input: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 at width 1.0: 3,504,872 parameters."""
    return MobileNetV2(num_classes=num_classes, small_input=small_input, **kwargs)
