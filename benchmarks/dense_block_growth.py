"""Activation bytes kept for backward by one DenseNet dense block, eager vs bnff, as the block
grows: 6, 12, 24 and 48 layers (DenseNet-121's block 2 setting: 128 input channels, growth 32,
bottleneck 4x32, 28x28 maps, batch 8, fp32). Eager keeps every layer's concatenation and its
normalized copy (quadratic in the number of layers); bnff with inter-composite-layer fusion keeps
each feature map once (linear).

    .venv/bin/python benchmarks/dense_block_growth.py [--json PATH]
"""

import argparse

import torch
from torch import nn

import bnff
from bnff.memory import saved_activation_bytes
from bnff.models.densenet import _DenseBlock
from bnff.atomic import write_json


def block(layers: int, in_channels: int = 128) -> nn.Module:
    """A stem convolution (the block input's producer) and a dense block of ``layers`` layers."""
    return nn.Sequential(nn.Conv2d(3, in_channels, 3, padding=1, bias=False),
                         _DenseBlock(layers, in_channels, bn_size=4, growth_rate=32, drop_rate=0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24, 48])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    x = torch.randn(a.batch, 3, a.size, a.size)
    rows, prev = [], None
    print(f"{'layers':>6} {'eager MiB':>10} {'bnff MiB':>9} {'bnff/eager':>10} {'eager +MiB/layer':>16} {'bnff +MiB/layer':>15}")
    for n in a.layers:
        e = saved_activation_bytes(block(n), x)
        f = saved_activation_bytes(bnff.restructure(block(n)), x)
        row = dict(layers=n, eager_bytes=e, bnff_bytes=f)
        de = df = float("nan")
        if prev is not None:
            de = (e - prev["eager_bytes"]) / (n - prev["layers"]) / 2**20
            df = (f - prev["bnff_bytes"]) / (n - prev["layers"]) / 2**20
        print(f"{n:>6} {e / 2**20:>10.1f} {f / 2**20:>9.1f} {f / e:>10.3f} {de:>16.2f} {df:>15.2f}", flush=True)
        rows.append(row)
        prev = row
    if a.json:
        write_json(a.json, rows)


if __name__ == "__main__":
    main()
