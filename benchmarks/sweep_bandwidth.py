"""How close each of the cpu backend's sweeps comes to this CPU's memory bandwidth.

    .venv/bin/python benchmarks/sweep_bandwidth.py [--repeats 30] [--json benchmarks/results/sweeps.json]

For ResNet-50 and DenseNet-121 feature-map shapes (batch 16, channels_last, bfloat16 and float32),
times each sweep of ``bnff.ops.backends.cpu`` and, side by side in the same process, ATen's plain
``copy_`` of the same tensor (one read, one write: the bandwidth a sweep can hope for) and ATen's
BatchNorm forward and backward (what eager runs instead). Each sweep's rate is the bytes it must
move (reads + writes of whole feature maps, as the traffic model counts them) over its time: a
sweep at the copy's GB/s is bandwidth-bound, one far below it is bound by its instructions or its
access pattern. The last rows read the BN input from 16 maps, as DenseNet's concatenations are read
(the statistics then run once per map, as when each map is produced). The time is the lower quartile of ``--repeats`` calls after warm-up (the machine
is shared; the quartile is less noisy than the median). Prints the CPU (``bnff.machine``) and a
table; ``--json`` writes the rows.
"""

import argparse
import json
import time

import torch

from bnff.atomic import atomic_open
from bnff.machine import cpu_info, describe
from bnff.ops.backends import cpu

SHAPES = ((16, 64, 112, 112), (16, 256, 56, 56), (16, 512, 28, 28), (16, 1024, 14, 14))
CONCAT = 16  # the last shape again as DenseNet feeds it: a concatenation of 16 maps of 1/16 the channels


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 4]


def measure(shape: tuple[int, ...], dtype: torch.dtype, repeats: int, parts: int = 1) -> dict:
    """GB/s of each sweep and of ATen's copy on one feature-map shape, its BN input read from
    ``parts`` maps of ``C / parts`` channels each (DenseNet's concatenations, read in place); ATen BN
    times in ms (on the concatenated map)."""
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    xs = [p.contiguous(memory_format=cl) for p in x.chunk(parts, dim=1)]
    r = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    c = shape[1]
    mean, f1, beta = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    b, s1 = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    a = cpu.apply([xs], [mean], [f1], [beta], [], "relu", dtype)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    # (name, call, feature maps moved: reads + writes)
    sweeps = (
        ("copy_ (ATen)", lambda: out.copy_(x), 2),
        ("channel_stats", lambda: [cpu.channel_stats(p) for p in xs], 1),
        ("apply", lambda: cpu.apply([xs], [mean], [f1], [beta], [], "relu", dtype), 2),
        ("apply + shortcut", lambda: cpu.apply([xs], [mean], [f1], [beta], [r], "relu", dtype), 3),
        ("grad_stats", lambda: cpu.grad_stats(g, a, "relu", [xs], [mean]), 4),
        ("input_grad", lambda: cpu.input_grad(g, xs, mean, f1, b, s1), 3),
        ("grad_stats_x", lambda: cpu.grad_stats_x(g, "relu", xs, mean, f1, beta, dtype), 2),
        ("input_grad_x", lambda: cpu.input_grad_x(g, "relu", xs, mean, f1, beta, dtype, b, s1), 3),
    )
    row = {"shape": list(shape), "parts": parts, "dtype": str(dtype).removeprefix("torch."), "MB": nbytes / 1e6,
           "GB/s": {}}
    for name, fn, maps in sweeps:
        row["GB/s"][name] = maps * nbytes / _time(fn, repeats) / 1e9
    weight, bias = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    xr = x.detach().requires_grad_(True)
    y = torch.batch_norm(xr, weight.requires_grad_(True), bias.requires_grad_(True), None, None, True, 0.1, 1e-5,
                         False)
    row["ATen BN forward ms"] = 1e3 * _time(lambda: torch.batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5,
                                                                        False), repeats)
    row["ATen BN backward ms"] = 1e3 * _time(lambda: torch.autograd.grad(y, (xr, weight, bias), g, retain_graph=True),
                                             repeats)
    row["bnff stats + apply ms"] = 1e3 * nbytes * (1 / row["GB/s"]["channel_stats"] + 2 / row["GB/s"]["apply"]) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per sweep (default 30)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the cpu backend's kernels did not build; nothing to measure")
    info = cpu_info()
    print(describe(info), f"; kernels built for: {cpu.isa()}", sep="")
    rows = [measure(s, d, args.repeats) for d in (torch.bfloat16, torch.float32) for s in SHAPES]
    rows += [measure(SHAPES[-1], d, args.repeats, CONCAT) for d in (torch.bfloat16, torch.float32)]
    names = list(rows[0]["GB/s"])
    print("| dtype | shape | " + " | ".join(names) + " | ATen BN fwd ms | bnff stats+apply ms | ATen BN bwd ms |")
    print("|---" * (len(names) + 5) + "|")
    for r in rows:
        parts = f" in {r['parts']} maps" if r["parts"] > 1 else ""
        print(f"| {r['dtype']} | {'x'.join(map(str, r['shape']))}{parts} | "
              + " | ".join(f"{r['GB/s'][n]:.1f}" for n in names)
              + f" | {r['ATen BN forward ms']:.2f} | {r['bnff stats + apply ms']:.2f} | {r['ATen BN backward ms']:.2f} |")
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"cpu": info, "kernels": cpu.isa(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
