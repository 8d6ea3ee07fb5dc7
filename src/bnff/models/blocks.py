"""Building blocks shared by the MobileNet and EfficientNet families, with torchvision's module names.

Written to match torchvision's ``ops.misc.Conv2dNormActivation``, ``ops.misc.SqueezeExcitation`` and
``ops.stochastic_depth.StochasticDepth`` (their submodule names, defaults and parameters), so that the
networks built from them load torchvision ``state_dict`` files with ``strict=True``. Tensors are
(N, C, H, W), NCHW or channels_last.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% down (torchvision's rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """conv (no bias) -> BatchNorm2d -> activation, "same" padding (torchvision's
    ``ops.Conv2dNormActivation``: submodules "0", "1", "2"; ``activation_layer=None`` leaves the
    activation out; activations that take ``inplace`` are built in place)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            norm_layer(out_channels)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018), torchvision's ``ops.SqueezeExcitation``: the input
    (N, C, H, W) times a per-channel gate (N, C, 1, 1) = scale_activation(fc2(activation(fc1(avgpool(x))))),
    fc1 and fc2 being 1x1 convolutions with bias (C -> squeeze_channels -> C)."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016), torchvision's ``ops.StochasticDepth``: in training,
    each sample's ("row") or the whole batch's input is zeroed with probability ``p`` and the rest
    scaled by 1 / (1 - p); in eval mode, or with p = 0, the input itself.

    Raises:
        ValueError: p outside [0, 1] or a mode other than "row" and "batch".
    """

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
        self.p, self.mode = p, mode

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def init_weights(model: nn.Module, linear: str = "normal") -> None:
    """torchvision's initialisation of the MobileNet and EfficientNet families, in place: convolutions
    Kaiming-normal (fan_out) with zero bias, BN weight 1 and bias 0, linear layers N(0, 0.01)
    (``linear="normal"``: MobileNet) or U(-1/sqrt(out_features), 1/sqrt(out_features)) (``"uniform"``:
    EfficientNet) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "uniform":
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class PooledClassifier(nn.Module):
    """A network of ``features`` (N, 3, H, W) -> (N, C, h, w), global average pooling ``avgpool`` and a
    ``classifier`` on the (N, C) vector, as torchvision's MobileNetV3 and EfficientNet forward it."""

    features: nn.Module
    avgpool: nn.Module
    classifier: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


__all__ = ["Conv2dNormActivation", "PooledClassifier", "SqueezeExcitation", "StochasticDepth", "init_weights",
           "make_divisible"]
