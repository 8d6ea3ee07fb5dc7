"""Saved-activation bytes of eager vs bnff, side by side in one process (DESIGN.md section 5).

    .venv/bin/python benchmarks/saved_bytes.py --model resnet50 --batch 8 --image-size 224
"""

import argparse
import copy

import torch

import bnff
from bnff import models
from bnff.memory import saved_activation_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    a = p.parse_args()
    model = models.MODELS[a.model]()
    eager, fused = copy.deepcopy(model), bnff.restructure(model)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    for label, amp, fmt in (("fp32", False, torch.contiguous_format), ("bf16 channels_last", True, torch.channels_last)):
        eager.to(memory_format=fmt)
        fused.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            e, f = saved_activation_bytes(eager, xx), saved_activation_bytes(fused, xx)
        print(f"{a.model} batch {a.batch} {a.image_size}x{a.image_size} {label}: eager {e} B ({e / 2**20:.1f} MiB), "
              f"bnff {f} B ({f / 2**20:.1f} MiB), bnff/eager {f / e:.3f}")


if __name__ == "__main__":
    main()
