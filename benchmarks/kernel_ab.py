"""The cpu backend's sweeps at another commit against this checkout's, side by side in one process.

    .venv/bin/python benchmarks/kernel_ab.py --old REV [--sweeps channel_stats grad_stats_x] [--rounds 15]
                                             [--json PATH]

    .venv/bin/python benchmarks/kernel_ab.py --old REV --model resnet50 [--rounds 10] [--json PATH]

Run-to-run spread on a shared machine (a few tens of percent between processes, in minutes-long
modes) hides a kernel change of 10-30%, and a whole step's change of a few percent. Here both versions run in one process, interleaved: the
C++ source of commit REV (``git show REV:src/bnff/ops/backends/csrc/bnff_cpu.cpp``) is built with
this checkout's flags for this CPU (``cpu.build_spec``) under the op namespace ``bnff_old``, and
each round times every sweep of both versions (the fastest of 5 calls); a version's time is the
lower quartile of ``--rounds`` rounds. The ops are called directly with this checkout's schemas,
so REV must have the same op signatures. Shapes: ResNet-50's BN inputs at batch 16 (channels_last,
bfloat16 and float32). Prints the CPU (``bnff.machine``), GB/s of each version (feature-map bytes
read and written, as ``sweep_bandwidth.py`` counts them) and new / old speed; ``--json`` writes
the rows.

With ``--model``, whole training steps instead (forward, backward, SGD) of that model restructured
by bnff (``cpu`` backend; batch 16, 224x224, channels_last, bf16 autocast, glibc malloc tuned as
``bnff bench --tuned-malloc`` does): one model, one batch, and every ``torch.ops.bnff`` op pointed
at the old build or back at the new one before each step, old and new alternating for
``--rounds`` rounds after 2 warm-up steps each; median step time of each, old / new, and the median (and quartiles) of the rounds' old - new
(a round's two steps share the machine's mode of the moment). The group executor
(``cpu.GROUP_EXECUTOR``), which calls the kernels from C++ by name, is off here, so that every
sweep goes through the re-pointed ``torch.ops.bnff`` ops.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
from pathlib import Path

import torch

import bnff
from bnff.atomic import atomic_open
from bnff.machine import cpu_info, describe
from bnff.ops.pointwise import fastest
from bnff.ops.backends import cpu

SOURCE = "src/bnff/ops/backends/csrc/bnff_cpu.cpp"
SHAPES = ((16, 64, 112, 112), (16, 64, 56, 56), (16, 256, 56, 56), (16, 128, 28, 28), (16, 512, 28, 28),
          (16, 256, 14, 14), (16, 1024, 14, 14), (16, 512, 7, 7), (16, 2048, 7, 7))
SWEEPS = ("channel_stats", "apply", "grad_stats", "input_grad", "grad_stats_x", "input_grad_x")


def build_old(rev: str) -> str:
    """Build commit ``rev``'s kernels under the op namespace ``bnff_old``; return the commit's hash.

    Raises:
        SystemExit: ``rev`` is not a commit of this repository, or has no kernel source.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        text = subprocess.run(["git", "show", f"{commit}:{SOURCE}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--old {rev}: {e.stderr.strip()} (give a commit of this repository that has {SOURCE})")
    for old, new in (("TORCH_LIBRARY(bnff,", "TORCH_LIBRARY(bnff_old,"),
                     ("TORCH_LIBRARY_IMPL(bnff,", "TORCH_LIBRARY_IMPL(bnff_old,")):
        if old not in text:
            raise SystemExit(f"--old {rev}: its kernel source has no '{old}'; it cannot be built beside this one")
        text = text.replace(old, new)
    name, directory, flags = cpu.build_spec()
    directory = directory.parent / f"{name}_old_{commit}"
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "bnff_cpu_old.cpp"
    if not source.exists() or source.read_text() != text:
        source.write_text(text)
    cpu.load_extension(f"{name}_old_{commit}", [str(source)], directory, flags)
    return commit


def calls(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[float, object]]:
    """{sweep: (feature maps moved, a call of it given an op namespace)} on one shape and dtype. Both
    versions read the same tensors (where a map lies relative to another changes a sweep's speed)."""
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x, g = (torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl) for _ in range(2))
    c = shape[1]
    mean, f1, beta = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    b, s1 = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    nhwc, relu = cpu.LAYOUT_CODES["nhwc"], cpu.ACT_CODES["relu"]
    a = torch.ops.bnff.apply([x], [1], [mean], [f1], [beta], [], relu, dtype, nhwc)
    return {
        "channel_stats": (1, lambda ns: ns.channel_stats(x, nhwc)),
        "apply": (2, lambda ns: ns.apply([x], [1], [mean], [f1], [beta], [], relu, dtype, nhwc)),
        "grad_stats": (4, lambda ns: ns.grad_stats(g, a, relu, [x], [1], [mean], nhwc)),
        "input_grad": (3, lambda ns: ns.input_grad(g, [x], mean, f1, b, s1, nhwc)),
        "grad_stats_x": (2, lambda ns: ns.grad_stats_x(g, [x], mean, f1, beta, relu, dtype, nhwc)),
        "input_grad_x": (3, lambda ns: ns.input_grad_x(g, [x], mean, f1, beta, relu, dtype, b, s1, nhwc)),
    }


def measure(shape: tuple[int, ...], dtype: torch.dtype, sweeps: list[str], rounds: int) -> dict:
    """One shape's row: GB/s of each sweep, old and new, and new / old speed."""
    fns = calls(shape, dtype)
    runs = {(s, v): functools.partial(fns[s][1], ns) for s in sweeps
            for v, ns in (("old", torch.ops.bnff_old), ("new", torch.ops.bnff))}
    for fn in runs.values():
        fn()
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key].append(fastest(fn, runs=5, warmup=0))
    q = {key: sorted(t)[len(t) // 4] for key, t in times.items()}
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "GB/s": {f"{s} {v}": fns[s][0] * nbytes / q[(s, v)] / 1e9 for s, v in runs},
            "new/old speed": {s: q[(s, "old")] / q[(s, "new")] for s in sweeps}}


def measure_steps(model: str, rounds: int) -> dict:
    """Median bnff training-step seconds of ``model`` with the old and the new kernels, alternating."""
    from bnff.bench import alternate_steps

    cpu.GROUP_EXECUTOR = False  # it calls the kernels by name, past the re-pointed ops
    ns = torch.ops.bnff
    ops = {v: {name: getattr(lib, name) for name in SWEEPS + ("scale", "backward_vectors", "running_update")}
           for v, lib in (("old", torch.ops.bnff_old), ("new", torch.ops.bnff))}

    def point(v: str):
        return lambda: [setattr(ns, name, op) for name, op in ops[v].items()]

    r = alternate_steps(model, {"old": point("old"), "new": point("new")}, rounds)
    med = r["median_step_s"]
    return {"model": model, "step_s": r["step_s"], "median_step_s": med, "old/new": med["old"] / med["new"],
            "old - new per round, s": r["first - last per round, s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="sweeps to time")
    parser.add_argument("--model", help="time whole bnff training steps of this model instead (bnff.models name)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the cpu backend's kernels did not build; nothing to measure")
    commit = build_old(args.old)
    info = cpu_info()
    print(describe(info), f"; kernels built for: {cpu.isa()}; old = {commit}", sep="")
    if args.model:
        r = measure_steps(args.model, args.rounds)
        d = r["old - new per round, s"]
        print(f"{args.model}: bnff step {r['median_step_s']['old']:.3f} s (old) vs {r['median_step_s']['new']:.3f} s "
              f"(new), medians of {args.rounds}: old / new {r['old/new']:.3f}; old - new per round "
              f"{1e3 * d['median']:+.0f} ms (quartiles {1e3 * d['quartiles'][0]:+.0f} to {1e3 * d['quartiles'][2]:+.0f})")
        if args.json:
            with atomic_open(args.json) as f:
                json.dump({"cpu": info, "kernels": cpu.isa(), "old": commit, "rounds": args.rounds, **r}, f, indent=1)
        return
    rows = []
    print("| dtype | shape | " + " | ".join(f"{s} old, new GB/s | new/old" for s in args.sweeps) + " |")
    print("|---" * (2 + 2 * len(args.sweeps)) + "|")
    for dtype in (torch.bfloat16, torch.float32):
        for shape in SHAPES:
            r = measure(shape, dtype, args.sweeps, args.rounds)
            rows.append(r)
            print(f"| {r['dtype']} | {'x'.join(map(str, shape))} | " + " | ".join(
                f"{r['GB/s'][s + ' old']:.1f}, {r['GB/s'][s + ' new']:.1f} | {r['new/old speed'][s]:.2f}"
                for s in args.sweeps) + " |", flush=True)
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"cpu": info, "kernels": cpu.isa(), "old": commit, "rounds": args.rounds, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
