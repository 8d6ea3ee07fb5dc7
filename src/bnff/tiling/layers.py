"""The pointwise (1x1) convolutions of a model as GEMMs (seed 003 section 3.1.1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bnff.graph.kinds import Kind
from bnff.graph.layers import build
from bnff.tiling.gemm import Gemm


@dataclass(frozen=True)
class PointwiseLayer:
    """A 1x1, ungrouped convolution: its name, block and GEMM (M = batch x H_out x W_out ofmap
    pixels, K = input channels, N = output channels)."""

    name: str
    block: str
    gemm: Gemm


def pointwise_layers(model: nn.Module, batch: int = 1, image_size: int = 224) -> list[PointwiseLayer]:
    """Every 1x1 ungrouped ``nn.Conv2d`` of ``model`` in graph order, at an input of
    (batch, 3, image_size, image_size) (shapes from meta tensors; nothing is computed)."""
    lg = build(model, (batch, 3, image_size, image_size))
    modules = dict(lg.gm.named_modules())
    out = []
    for layer in lg.layers:
        if layer.kind != Kind.CONV:
            continue
        m = modules[str(layer.node.target)]
        if tuple(m.kernel_size) != (1, 1) or m.groups != 1:
            continue
        n, c_out, h, w = layer.out_shape
        out.append(PointwiseLayer(layer.name, layer.block, Gemm(n * h * w, m.in_channels, c_out)))
    return out


__all__ = ["PointwiseLayer", "pointwise_layers"]
