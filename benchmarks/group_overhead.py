"""The fixed cost of a fused group: what bnff adds per group and training step beyond its work.

    .venv/bin/python benchmarks/group_overhead.py [--chunks 10] [--steps 400] [--json benchmarks/results/group-overhead.json]

A full-size step hides a per-group cost of a few hundred microseconds among seconds of convolutions
(DenseNet-121 has 121 groups, ResNet-50 49), and its run-to-run spread is larger than that cost.
Here each fusion pattern runs alone on tiny maps (batch 2, 64 channels, 4x4, channels_last, bf16
autocast), where the sweeps and convolutions take a few microseconds and what is left is the
per-group cost: Python, autograd and the small ATen ops around the sweeps. Each pattern is a small
module (a 1x1 producer convolution, then the pattern, then a 1x1 consumer) run as eager PyTorch and
restructured by bnff (cpu backend), forward and backward, alternately in chunks of ``--steps``; a
variant's time is its fastest chunk's mean. The difference is bnff's fixed cost per group (it
includes the recompute of the applied input, a few microseconds at this size).

Patterns: "bn-relu-conv" (a lone BN feeding a convolution: ResNet's bottleneck entries, DenseNet's
norm2), "bn-add-relu-conv" (a residual block's output: BN + identity shortcut + ReLU feeding the
next block), "concat4-bn-relu-conv" (DenseNet's norm1: a BN over the concatenation of 4 maps).
Prints the CPU (``bnff.machine``) and a table; ``--json`` writes the rows.
"""

import argparse
import copy
import json
import time

import torch
from torch import nn

import bnff
from bnff.atomic import atomic_open
from bnff.machine import cpu_info, describe

C = 64


class _BnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producer, self.bn, self.relu = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True)
        self.consumer = nn.Conv2d(C, C, 1, bias=False)

    def forward(self, x):
        return self.consumer(self.relu(self.bn(self.producer(x))))


class _BnAddReluConv(_BnReluConv):
    def forward(self, x):
        return self.consumer(self.relu(self.bn(self.producer(x)) + x))


class _Concat4BnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producers = nn.ModuleList(nn.Conv2d(C, C // 4, 1, bias=False) for _ in range(4))
        self.bn, self.relu, self.consumer = nn.BatchNorm2d(C), nn.ReLU(inplace=True), nn.Conv2d(C, C, 1, bias=False)

    def forward(self, x):
        return self.consumer(self.relu(self.bn(torch.cat([p(x) for p in self.producers], 1))))


PATTERNS = {"bn-relu-conv": _BnReluConv, "bn-add-relu-conv": _BnAddReluConv,
            "concat4-bn-relu-conv": _Concat4BnReluConv}


def _step(net: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().sum().backward()
    return run


def _chunk(run, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t0) / steps


def measure(pattern: str, chunks: int, steps: int) -> dict:
    """Eager's and bnff's microseconds per forward + backward of ``pattern`` and their difference."""
    torch.manual_seed(0)
    x = torch.randn(2, C, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    eager = PATTERNS[pattern]().train().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = bnff.restructure(copy.deepcopy(eager), example_input=x)
    runs = {"eager": _step(eager, x), "bnff": _step(fused, x)}
    for run in runs.values():
        _chunk(run, steps // 4)
    best = {v: float("inf") for v in runs}
    for _ in range(chunks):  # alternate, so that both see the same machine
        for v, run in runs.items():
            best[v] = min(best[v], _chunk(run, steps))
    us = {v: t * 1e6 for v, t in best.items()}
    return {"pattern": pattern, "eager_us": us["eager"], "bnff_us": us["bnff"], "fixed_cost_us": us["bnff"] - us["eager"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=10, help="alternating chunks per variant (the fastest counts)")
    p.add_argument("--steps", type=int, default=400, help="steps per chunk")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = [measure(name, args.chunks, args.steps) for name in PATTERNS]
    table = Table(title="per group, forward + backward, batch 2 x 64 x 4 x 4, bf16 autocast")
    for col in ("pattern", "eager (us)", "bnff (us)", "bnff - eager (us)"):
        table.add_column(col, justify="left" if col == "pattern" else "right")
    for r in rows:
        table.add_row(r["pattern"], f"{r['eager_us']:.0f}", f"{r['bnff_us']:.0f}", f"{r['fixed_cost_us']:+.0f}")
    console = Console()
    console.print(table)
    info = cpu_info()
    console.print(describe(info))
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"cpu": info, "torch": torch.__version__, "chunks": args.chunks, "steps": args.steps,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
