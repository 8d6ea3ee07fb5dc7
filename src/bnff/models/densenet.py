"""DenseNet-121/169/201 (Huang et al., "Densely Connected Convolutional Networks", 2017).

Written to match torchvision's ``torchvision/models/densenet.py`` module for module and name for
name (densenet121 has 7,978,856 parameters), so a torchvision ``state_dict`` loads here with
``strict=True``. No weights are downloaded: torchvision's initialisation is used (Kaiming-normal
convolutions, BN weight 1 and bias 0, Linear bias 0).

Each dense layer is BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv on the concatenation of all
earlier feature maps of its block; this is where bnff's inter-composite-layer fusion (ICF) applies.
The forward takes the list of earlier feature maps and concatenates it itself (torchvision's
non-memory-efficient path), so ``torch.fx`` sees every concatenation.

``small_input=True`` gives the variant for 32x32 images: a 3x3 stride-1 stem convolution and no
max-pool (``features.pool0`` is ``nn.Identity``), so the first dense block sees 32x32.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _DenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 conv (bn_size * growth_rate) -> BN -> ReLU -> 3x3 conv (growth_rate)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features``: the block's earlier feature maps, each (N, C_j, H, W); returns (N, growth_rate, H, W)."""
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output concatenates the input and every layer's features."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv (halving the channels) -> 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC with torchvision's layout (``features`` Sequential, ``classifier`` Linear).

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: number of layers in each of the four dense blocks.
        num_init_features: channels of the stem convolution.
        bn_size: the 1x1 bottleneck has ``bn_size * growth_rate`` channels.
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs.
        small_input: 3x3 stride-1 stem and no max-pool, for 32x32 images.
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, small_input: bool = False) -> None:
        super().__init__()
        stem = (nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False) if small_input else
                nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False))
        self.features = nn.Sequential(OrderedDict([
            ("conv0", stem),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet121(num_classes: int = 1000, small_input: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121: k=32, blocks (6, 12, 24, 16), 64 stem channels; 7,978,856 parameters."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, small_input=small_input, **kwargs)


def densenet169(num_classes: int = 1000, small_input: bool = False, **kwargs) -> DenseNet:
    """DenseNet-169: k=32, blocks (6, 12, 32, 32), 64 stem channels; 14,149,480 parameters."""
    return DenseNet(32, (6, 12, 32, 32), 64, num_classes=num_classes, small_input=small_input, **kwargs)


def densenet201(num_classes: int = 1000, small_input: bool = False, **kwargs) -> DenseNet:
    """DenseNet-201: k=32, blocks (6, 12, 48, 32), 64 stem channels; 20,013,928 parameters."""
    return DenseNet(32, (6, 12, 48, 32), 64, num_classes=num_classes, small_input=small_input, **kwargs)
