"""Command line: ``bnff train`` (more subcommands arrive with the traffic model and benchmarks)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bnff import models
from bnff.data import DataError


def _train(args: argparse.Namespace) -> int:
    import torch

    from bnff import data as data_mod
    from bnff.train import TrainConfig, train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = data_mod.load(args.data, image_size=args.image_size, seed=args.seed)
    print(f"data {ds.name}: {len(ds.train_y)} train / {len(ds.test_y)} test images, "
          f"{ds.train_x.shape[-1]}x{ds.train_x.shape[-1]}, {len(ds.classes)} classes")
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      dtype=args.dtype, backend=args.backend, seed=args.seed, limit_batches=args.limit_batches)
    out = Path(args.out) if args.out else Path("runs") / time.strftime(f"{args.model}-%Y%m%d-%H%M%S")
    metrics = train(cfg, ds, out)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnff", description="Batch-normalization fission and fusion for CNN training.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train eager and restructured copies side by side",
                       description="Train a CNN twice from the same initial weights on the same batches, eagerly and "
                                   "restructured by bnff, and compare loss, accuracy, images/s and saved activations.")
    t.add_argument("--data", default="digits", help="digits (default, shipped with scikit-learn), cifar10:PATH "
                                                   "(python-pickle batches) or folder:PATH (one sub-folder per class)")
    t.add_argument("--model", default="resnet18", choices=sorted(models.MODELS),
                   help="architecture (small-input variant for images of 64 pixels or less)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle SGD schedule")
    t.add_argument("--image-size", type=int, default=32, help="images are resized to this square size")
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 runs under CPU autocast")
    t.add_argument("--backend", default="reference", help="bnff sweep backend")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit-batches", type=int, default=None, help="quick runs: at most this many training batches per epoch, and "
                                                                    "this many batches' worth of test images")
    t.add_argument("--out", default=None, help="run folder (default runs/MODEL-TIMESTAMP)")
    t.add_argument("--json", default=None, help="also write the metrics JSON here")
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnff`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError) as exc:
        print(f"bnff: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
