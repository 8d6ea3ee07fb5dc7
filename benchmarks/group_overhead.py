"""The fixed cost of a fused group: what bnff adds per group and training step beyond its work.

    .venv/bin/python benchmarks/group_overhead.py [--chunks 10] [--steps 400] [--json benchmarks/results/group-overhead.json]
    .venv/bin/python benchmarks/group_overhead.py --models resnet50 densenet121 mobilenet_v2 [--rounds 20] [--json F]

A full-size step hides a per-group cost of a few hundred microseconds among seconds of convolutions
(DenseNet-121 has 121 groups, ResNet-50 49), and its run-to-run spread is larger than that cost.
Here each fusion pattern runs alone on tiny maps (batch 2, 64 channels, 4x4, channels_last, bf16
autocast), where the sweeps and convolutions take a few microseconds and what is left is the
per-group cost: Python, autograd and the small ATen ops around the sweeps. Each pattern is a small
module (a 1x1 producer convolution, then the pattern, then a 1x1 consumer) run as eager PyTorch and
restructured by bnff (cpu backend), forward and backward, alternately in chunks of ``--steps``; a
variant's time is its fastest chunk's mean. The difference is bnff's fixed cost per group (it
includes the recompute of the applied input, a few microseconds at this size). bnff runs twice:
with the cpu backend's group executor (``cpu.GROUP_EXECUTOR``: a group's forward and backward as one
C++ call each, the default) and with it off (the plan's steps one by one in Python).

Patterns: "bn-relu-conv" (a lone BN feeding a convolution: ResNet's bottleneck entries, DenseNet's
norm2), "bn-add-relu-conv" (a residual block's output: BN + shortcut + ReLU feeding the next
block; the shortcut is a convolution's output, in bf16 as in a network), "concat4-bn-relu-conv"
(DenseNet's norm1: a BN over the concatenation of 4 maps).
Prints the CPU (``bnff.machine``) and a table; ``--json`` writes the rows.

With ``--models``, the same question at full size: whole bnff training steps of each model (batch
16, 224x224, channels_last, bf16 autocast, glibc malloc tuned as ``bnff bench --tuned-malloc``
does), the group executor off and on alternating step by step for ``--rounds`` rounds after 2
warm-up steps each; median step of each, and the median (and quartiles) of the rounds' off - on.
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
from bnff.ops.backends import cpu

C = 64


class _BnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producer, self.bn, self.relu = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True)
        self.consumer = nn.Conv2d(C, C, 1, bias=False)

    def forward(self, x):
        return self.consumer(self.relu(self.bn(self.producer(x))))


class _BnAddReluConv(_BnReluConv):
    def __init__(self) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(C, C, 1, bias=False)

    def forward(self, x):
        return self.consumer(self.relu(self.bn(self.producer(x)) + self.shortcut(x)))


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


def _executor(run, on: bool):
    """``run`` with the cpu backend's group executor on or off."""
    def switched() -> None:
        cpu.GROUP_EXECUTOR = on
        run()
    return switched


def _chunk(run, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t0) / steps


def measure(pattern: str, chunks: int, steps: int) -> dict:
    """Microseconds per forward + backward of ``pattern``: eager, bnff with and without the group
    executor, and bnff's fixed cost (bnff - eager) both ways."""
    torch.manual_seed(0)
    x = torch.randn(2, C, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    eager = PATTERNS[pattern]().train().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = bnff.restructure(copy.deepcopy(eager), example_input=x)
    runs = {"eager": _step(eager, x), "bnff": _executor(_step(fused, x), True),
            "bnff_steps": _executor(_step(fused, x), False)}
    for run in runs.values():
        _chunk(run, steps // 4)
    best = {v: float("inf") for v in runs}
    for _ in range(chunks):  # alternate, so that all see the same machine
        for v, run in runs.items():
            best[v] = min(best[v], _chunk(run, steps))
    us = {v: t * 1e6 for v, t in best.items()}
    return {"pattern": pattern, "eager_us": us["eager"], "bnff_us": us["bnff"], "bnff_steps_us": us["bnff_steps"],
            "fixed_cost_us": us["bnff"] - us["eager"], "fixed_cost_steps_us": us["bnff_steps"] - us["eager"]}


def measure_model(model: str, rounds: int) -> dict:
    """Median bnff training-step seconds of ``model`` with the group executor off and on, alternating."""
    from bnff.bench import alternate_steps

    r = alternate_steps(model, {"off": lambda: setattr(cpu, "GROUP_EXECUTOR", False),
                                "on": lambda: setattr(cpu, "GROUP_EXECUTOR", True)}, rounds)
    return {"model": model, "step_s": r["step_s"], "median_step_s": r["median_step_s"],
            "off - on per round, s": r["first - last per round, s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=10, help="alternating chunks per variant (the fastest counts)")
    p.add_argument("--steps", type=int, default=400, help="steps per chunk")
    p.add_argument("--models", nargs="+", help="time full-size training steps of these models instead, executor off/on")
    p.add_argument("--rounds", type=int, default=20, help="with --models: alternating rounds")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.models:
        rows = [measure_model(m, args.rounds) for m in args.models]
        table = Table(title="bnff training step, batch 16, 224x224, bf16, tuned malloc: group executor off / on")
        for col in ("model", "executor off (s)", "on (s)", "off - on per round, median (ms)", "quartiles (ms)"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            d = r["off - on per round, s"]
            table.add_row(r["model"], f"{r['median_step_s']['off']:.3f}", f"{r['median_step_s']['on']:.3f}",
                          f"{d['median'] * 1e3:+.1f}", f"{d['quartiles'][0] * 1e3:+.1f} to {d['quartiles'][2] * 1e3:+.1f}")
    else:
        rows = [measure(name, args.chunks, args.steps) for name in PATTERNS]
        table = Table(title="per group, forward + backward, batch 2 x 64 x 4 x 4, bf16 autocast")
        for col in ("pattern", "eager (us)", "bnff (us)", "bnff - eager (us)", "executor off: bnff (us)",
                    "bnff - eager (us)"):
            table.add_column(col, justify="left" if col == "pattern" else "right")
        for r in rows:
            table.add_row(r["pattern"], f"{r['eager_us']:.0f}", f"{r['bnff_us']:.0f}", f"{r['fixed_cost_us']:+.0f}",
                          f"{r['bnff_steps_us']:.0f}", f"{r['fixed_cost_steps_us']:+.0f}")
    console.print(table)
    info = cpu_info()
    console.print(describe(info))
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"cpu": info, "torch": torch.__version__, "chunks": args.chunks, "steps": args.steps,
                       "rounds": args.rounds if args.models else None, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
