"""Saved-activation bytes of eager vs bnff when MobileNetV2's ReLU6 is replaced by each activation of the table.

    .venv/bin/python benchmarks/activation_footprint.py --batch 16 --image-size 224 [--json PATH]

MobileNetV2 (``bnff.models``, torchvision's structure) is built with every ``nn.ReLU6`` swapped for
another activation module, in-place where the module has the flag (as torchvision builds its
networks), and trained one forward in fp32. The same network, eager and restructured, is measured in one
process with ``bnff.memory.saved_activation_bytes`` (each storage autograd keeps, once). This shows
what the table's recompute rule (``bnff.activations``) saves for smooth activations. It does not
measure EfficientNet or MobileNetV3 themselves, which also have squeeze-and-excitation blocks.
"""

import argparse
import copy

import torch
from torch import nn

import bnff
from bnff import models
from bnff.atomic import write_json
from bnff.memory import saved_activation_bytes

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
               "mish": nn.Mish, "leaky_relu(0.1)": lambda: nn.LeakyReLU(0.1), "elu(1.0)": nn.ELU}


def swapped(make) -> nn.Module:
    """MobileNetV2 with each ReLU6 replaced by ``make()`` (in place where it can be)."""
    model = models.mobilenet_v2()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                act = make()
                if hasattr(act, "inplace"):
                    act.inplace = True
                setattr(parent, name, act)
    return model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    rows = []
    for kind, make in ACTIVATIONS.items():
        model = swapped(make)
        fused = bnff.restructure(copy.deepcopy(model), backend="reference")
        report = bnff.fusion_report(fused)
        e, f = saved_activation_bytes(model, x), saved_activation_bytes(fused, x)
        rows.append(dict(activation=kind, batch=args.batch, image_size=args.image_size, eager_bytes=e, bnff_bytes=f,
                         ratio=f / e, fused_bns=len(report.fused_bns)))
        print(f"MobileNetV2 with {kind}: eager {e / 2**20:.1f} MiB, bnff {f / 2**20:.1f} MiB, "
              f"bnff/eager {f / e:.3f} ({len(report.fused_bns)} BNs fused)", flush=True)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
