"""Saved-activation bytes of eager vs bnff, side by side in one process (docs/design.md section 5).

    .venv/bin/python benchmarks/saved_bytes.py --model resnet50 densenet121 inception_v3 mobilenet_v2 --batch 8

Each model runs at its full input size (299x299 for Inception-v3, 224x224 otherwise, or
``--image-size``), in fp32 and in bf16 autocast with channels_last. ``--json PATH`` writes the rows.
"""

import argparse
import copy

import torch

import bnff
from bnff import models
from bnff.memory import saved_activation_bytes
from bnff.atomic import write_json


def measure(name: str, batch: int, image_size: int) -> list[dict]:
    """Rows {model, batch, image_size, mode, eager_bytes, bnff_bytes, ratio} for fp32 and bf16 channels_last."""
    model = models.MODELS[name]()
    eager, fused = copy.deepcopy(model), bnff.restructure(model)
    x = torch.randn(batch, 3, image_size, image_size)
    rows = []
    for label, amp, fmt in (("fp32", False, torch.contiguous_format), ("bf16 channels_last", True, torch.channels_last)):
        eager.to(memory_format=fmt)
        fused.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            e, f = saved_activation_bytes(eager, xx), saved_activation_bytes(fused, xx)
        rows.append(dict(model=name, batch=batch, image_size=image_size, mode=label, eager_bytes=e, bnff_bytes=f,
                         ratio=f / e))
        print(f"{name} batch {batch} {image_size}x{image_size} {label}: eager {e} B ({e / 2**20:.1f} MiB), "
              f"bnff {f} B ({f / 2**20:.1f} MiB), bnff/eager {f / e:.3f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["resnet50"], choices=sorted(models.MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="default: 299 for inception_v3, else 224")
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args()
    rows = []
    for name in a.model:
        size = a.image_size or (299 if name == "inception_v3" else 224)
        rows += measure(name, a.batch, size)
    if a.json:
        write_json(a.json, rows)


if __name__ == "__main__":
    main()
