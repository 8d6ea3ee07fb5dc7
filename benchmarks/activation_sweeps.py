"""What each activation costs inside the cpu backend's apply and backward-statistics sweeps.

    .venv/bin/python benchmarks/activation_sweeps.py [--repeats 20] [--dtype bf16|fp32]
                                                     [--activations relu silu hardswish sigmoid gelu]
                                                     [--json benchmarks/results/activation-sweeps.json]

On EfficientNet-B0 feature-map shapes (batch 16, channels_last), times, side by side in one process,
ATen's ``copy_`` of the map (one read, one write: the memory-bound floor), the ``cpu`` backend's
``apply`` (a = act(F1 (x - mu) + beta)) and ``grad_stats`` (dy = g act'(z) with z recomputed from x,
and the per-channel sums) for each activation, and eager's ``batch_norm`` followed by the activation
(out of place, ``bnff.activations.forward``: what eager runs instead of ``apply``). An activation whose sweeps take much longer than
ReLU's is bound by its arithmetic, not by the bytes. Each time is the lower quartile of ``--repeats``
calls after 3 warm-up calls, in ms. Prints the CPU (``bnff.machine``) and a markdown table.
"""

import argparse
import json

import torch
import torch.nn.functional as F

import sweep_bandwidth
from bnff import activations
from bnff.atomic import atomic_open
from bnff.machine import cpu_info, describe
from bnff.ops.backends import cpu

SHAPES = ((16, 96, 112, 112), (16, 144, 56, 56), (16, 672, 14, 14))  # EfficientNet-B0's SE-group maps
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _time(fn, repeats: int) -> float:
    """Lower quartile of ``repeats`` timed calls of ``fn`` after 3 warm-up calls, in ms (sweep_bandwidth's)."""
    return 1e3 * sweep_bandwidth._time(fn, repeats)


def measure(shape: tuple[int, ...], dtype: torch.dtype, kinds: list[str], repeats: int) -> dict:
    """ms of ``copy_`` and, per activation kind, of ``apply``, ``grad_stats`` and eager's BN + activation."""
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    c = shape[1]
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    weight, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    f1 = cpu.scale(var, weight, 1e-5)
    out = torch.empty_like(x)
    row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "copy_": _time(lambda: out.copy_(x), repeats)}
    for kind in kinds:
        a = cpu.apply([[x]], [mean], [f1], [beta], [], kind, dtype)
        row[kind] = {
            "apply": _time(lambda: cpu.apply([[x]], [mean], [f1], [beta], [], kind, dtype), repeats),
            "grad_stats": _time(lambda: cpu.grad_stats(g, a, kind, [[x]], [mean], [f1], [beta]), repeats),
            "eager BN + act": _time(lambda: activations.forward(
                kind, F.batch_norm(x, mean, var, weight, beta, False)), repeats),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per sweep (default 20)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--activations", nargs="+", default=["relu", "silu", "hardswish", "sigmoid", "gelu"],
                        help="activation kinds of bnff.activations (default: relu silu hardswish sigmoid gelu)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the cpu backend's kernels did not build; nothing to measure")
    for kind in args.activations:
        if activations.spec(kind) is None or cpu.act_why(kind) is not None:
            raise SystemExit(f"activation {kind!r} is not one the kernels compute; choose from {sorted(cpu.ACT_CODES)}")
    info = cpu_info()
    print(describe(info), f"; kernels built for: {cpu.isa()}", sep="")
    rows = [measure(s, DTYPES[args.dtype], args.activations, args.repeats) for s in SHAPES]
    print("| map | copy_ | " + " | ".join(f"{k} apply / grad_stats / eager BN+act" for k in args.activations) + " |")
    print("|---" * (len(args.activations) + 2) + "|")
    for r in rows:
        cells = " | ".join(f"{r[k]['apply']:.2f} / {r[k]['grad_stats']:.2f} / {r[k]['eager BN + act']:.2f}"
                           for k in args.activations)
        print(f"| {r['dtype']} {'x'.join(map(str, r['shape']))} | {r['copy_']:.2f} | {cells} |")
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"cpu": info, "kernels": cpu.isa(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
