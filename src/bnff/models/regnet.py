"""RegNetY-1.6GF (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020).

Written to match torchvision's ``torchvision/models/regnet.py`` module for module and name for name
(11,202,430 parameters), so a torchvision ``state_dict`` loads with ``strict=True``. No weights are
downloaded: torchvision's initialisation is used.

The stage widths and depths come from the quantized linear rule of the paper (section 3.3: width
w_0 + w_a j per block, quantized to powers of w_m and multiples of 8, then made divisible by the group
width), with RegNetY-1.6GF's parameters depth 27, w_0 48, w_a 20.71, w_m 2.65, group width 24 and
squeeze-and-excitation ratio 0.25. Each block is 1x1 conv -> BN -> ReLU, grouped 3x3 conv -> BN -> ReLU,
squeeze-and-excitation (ReLU inside, a sigmoid gate), 1x1 conv -> BN, added to the input (through a
1x1 conv -> BN projection when the shape changes), then ReLU.

``small_input=True`` gives the variant for 32x32 images: the stem and the first stage use stride 1.

Inputs are (N, 3, H, W) image batches, NCHW or channels_last; outputs are (N, num_classes) logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from bnff.models.blocks import Conv2dNormActivation, SqueezeExcitation, make_divisible


def stage_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> list[tuple[int, int, int]]:
    """(width, depth, group width) of each stage from the paper's quantized linear parameters, as
    torchvision's ``BlockParams.from_init_params`` computes them (bottleneck multiplier 1).

    Raises:
        ValueError: w_a < 0, w_0 <= 0 or not a multiple of 8, or w_m <= 1.
    """
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError("invalid RegNet settings: need w_a >= 0, w_0 > 0 and a multiple of 8, w_m > 1")
    widths_cont = torch.arange(depth) * w_a + w_0
    capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), 8)) * 8).int().tolist()
    stages: list[list[int]] = []  # [width, depth]
    for w in widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    out = []
    for w, d in stages:
        g = min(group_width, w)
        out.append((make_divisible(w, g), d, g))
    return out


class BottleneckTransform(nn.Sequential):
    """a (1x1) -> b (grouped 3x3, the stride) -> se -> c (1x1, linear)."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float) -> None:
        layers = OrderedDict()
        layers["a"] = Conv2dNormActivation(width_in, width_out, kernel_size=1)
        layers["b"] = Conv2dNormActivation(width_out, width_out, kernel_size=3, stride=stride,
                                           groups=width_out // group_width)
        layers["se"] = SqueezeExcitation(width_out, int(round(se_ratio * width_in)))
        layers["c"] = Conv2dNormActivation(width_out, width_out, kernel_size=1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """relu(proj(x) + f(x)), proj a 1x1 conv -> BN where the shape changes, else the identity."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float) -> None:
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    """RegNet with torchvision's layout (``stem``, ``trunk_output`` of stages ``block1``.. with blocks
    ``block1-0``.., ``avgpool``, ``fc``).

    Args:
        stages: (width, depth, group width) per stage (``stage_params``).
        num_classes: classifier outputs.
        se_ratio: squeeze-and-excitation width relative to the block's input width.
        stem_width: the stem's output channels.
        small_input: stride 1 in the stem and the first stage, for 32x32 images.
    """

    def __init__(self, stages: list[tuple[int, int, int]], num_classes: int = 1000, se_ratio: float = 0.25,
                 stem_width: int = 32, small_input: bool = False) -> None:
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem_width, kernel_size=3, stride=1 if small_input else 2)
        width = stem_width
        trunk = OrderedDict()
        for i, (w, d, g) in enumerate(stages, start=1):
            stage = nn.Sequential()
            for j in range(d):
                stride = 2 if j == 0 and not (small_input and i == 1) else 1
                stage.add_module(f"block{i}-{j}", ResBottleneckBlock(width if j == 0 else w, w, stride, g, se_ratio))
            trunk[f"block{i}"] = stage
            width = w
        self.trunk_output = nn.Sequential(trunk)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

        for m in self.modules():  # torchvision's RegNet initialisation (not the MobileNet family's)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_y_1_6gf(num_classes: int = 1000, small_input: bool = False, **kwargs) -> RegNet:
    """RegNetY-1.6GF: 11,202,430 parameters (1000 classes)."""
    return RegNet(stage_params(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24), num_classes=num_classes,
                  se_ratio=0.25, small_input=small_input, **kwargs)
