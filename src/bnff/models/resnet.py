"""ResNet-18/34/50/101 (He et al., "Deep Residual Learning for Image Recognition", 2016).

Written to match torchvision's ``torchvision/models/resnet.py`` module for module and name for
name, so that a torchvision ``state_dict`` loads here with ``strict=True`` (resnet18 has
11,689,512 parameters, resnet50 25,557,032). No weights are downloaded: the models start from
torchvision's initialisation (Kaiming-normal convolutions, BN weight 1 and bias 0).

``small_input=True`` gives the CIFAR-style variant for 32x32 images: a 3x3 stride-1 stem
convolution and no max-pool, so layer1 sees the full 32x32 resolution. Its ``conv1.weight`` is
(64, 3, 3, 3) instead of (64, 3, 7, 7); every other name and shape is unchanged.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> (+ shortcut) -> ReLU."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 (stride here, "ResNet v1.5") -> BN -> ReLU -> conv1x1 -> BN
    -> (+ shortcut) -> ReLU."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision-compatible ResNet.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: width of the final ``fc`` layer.
        small_input: 3x3 stride-1 stem and no max-pool, for 32x32 inputs.
        zero_init_residual: start each residual branch's last BN at weight 0 (torchvision's flag).
        norm_layer: normalization constructor, ``nn.BatchNorm2d`` by default.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 small_input: bool = False, zero_init_residual: bool = False,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(num_classes: int = 1000, small_input: bool = False, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]; 11,689,512 parameters at num_classes=1000."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, small_input=small_input, **kwargs)


def resnet34(num_classes: int = 1000, small_input: bool = False, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]; 21,797,672 parameters at num_classes=1000."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, small_input=small_input, **kwargs)


def resnet50(num_classes: int = 1000, small_input: bool = False, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]; 25,557,032 parameters at num_classes=1000."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, small_input=small_input, **kwargs)


def resnet101(num_classes: int = 1000, small_input: bool = False, **kwargs) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3]; 44,549,160 parameters at num_classes=1000."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, small_input=small_input, **kwargs)
