"""The fused pointwise convolution (issue 31) layer by layer, against what bnff runs without it.

    .venv/bin/python benchmarks/pointwise_layers.py [--repeats 9] [--blocks 32 64 128] [--backward] [--json PATH]
    .venv/bin/python benchmarks/pointwise_layers.py --model resnet50 [--rounds 10] [--json PATH]

For ResNet-50's 1x1 convolutions at batch 16 (channels_last; the bottlenecks' reduce and expand
layers and the stride-2 projections, each taking BN apply + ReLU of its input and giving the
statistics of its output to the next BN), timed interleaved in one process, float32 and bfloat16:

* ``aten``: ATen's 1x1 convolution alone; ``xsmm``: libxsmm's (``cpu.pointwise_forward`` on a plain
  input); the **floor** is the faster of the two, so that a gain of the GEMM alone is not counted
  as a gain of fusion;
* ``sweeps+aten``: what bnff runs today: its apply sweep, ATen's convolution, its statistics sweep;
* ``sweeps+xsmm``: the same with libxsmm's convolution (unfused libxsmm);
* ``fused``: ``cpu.pointwise_forward`` with statistics (automatic block rows), and ``fused/B`` for
  each ``--blocks`` B.

With ``--backward``, the backward of the stride-1 shapes instead (each a lone BN + ReLU's consumer,
the plan's ``pointwise_backward``): ``aten``: ATen's convolution backward (dgrad and wgrad) alone;
``xsmm``: ``cpu.pointwise_backward`` with an identity BN and no activation (libxsmm's dgrad and wgrad,
plus S1 and S2, so an upper bound of a plain libxsmm backward); ``sweeps+aten``: what bnff runs
without it: the recompute sweep, ATen's convolution backward, ``grad_stats_x``; ``fused``:
``cpu.pointwise_backward``.

With ``--model``, whole bnff training steps instead (``bnff.bench.alternate_steps``: batch 16,
224x224, bf16 autocast or, with ``--step-dtype fp32``, float32, channels_last, tuned allocator), ``BNFF_POINTWISE`` "off" and "auto"
alternating step by step in one process, with the shapes "auto" chose to fuse.

Every result is checked against float64 first. A variant's time is the lower quartile of
``--repeats`` rounds. Overhead removed = 1 - (fused - floor) / (unfused - floor), unfused the faster
of the two unfused variants. Needs the kernels built with libxsmm (``cpu.pointwise_why()``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bnff.atomic import write_json
from bnff.machine import cpu_info, describe
from bnff.ops.backends import cpu

# (batch, H = W of the input, C_in, C_out, stride): ResNet-50's 1x1 shapes
SHAPES = ((16, 56, 64, 256, 1), (16, 56, 256, 64, 1), (16, 56, 256, 512, 2), (16, 28, 128, 512, 1),
          (16, 28, 512, 128, 1), (16, 28, 512, 1024, 2), (16, 14, 256, 1024, 1), (16, 14, 1024, 256, 1),
          (16, 14, 1024, 2048, 2), (16, 7, 512, 2048, 1), (16, 7, 2048, 512, 1))


def _interleaved_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Each call's lower-quartile ms over ``repeats`` rounds that run every call once, after two warm-ups."""
    times = {k: [] for k in calls}
    for f in calls.values():
        f(), f()
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 4] * 1e3 for k, v in times.items()}


def measure(n: int, hw: int, cin: int, cout: int, stride: int, dtype: torch.dtype, repeats: int,
            blocks: tuple[int, ...]) -> dict:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, cin, hw, hw, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype)
    mean, var = torch.randn(cin, generator=gen) * 0.1, torch.rand(cin, generator=gen) + 0.5
    gamma, beta = torch.rand(cin, generator=gen) + 0.5, torch.randn(cin, generator=gen) * 0.1
    f1 = gamma * torch.rsqrt(var + 1e-5)
    a = cpu.apply([[z]], [mean], [f1], [beta], [], "relu", dtype)
    # float64 truth: the output of the applied map, and its statistics
    y64 = F.conv2d(a.double(), w.double(), stride=stride)
    m64, v64 = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def fused(b: int = 0):
        return cpu.pointwise_forward([[z]], [mean], [f1], [beta], [], "relu", w, stride, True, b)

    def unfused(conv):
        def run():
            y = conv(cpu.apply([[z]], [mean], [f1], [beta], [], "relu", dtype))
            return (y, *cpu.channel_stats(y))
        return run

    def aten(x):
        return F.conv2d(x, w, stride=stride)

    def xsmm(x):
        return cpu.pointwise_forward([], [], [], [], [x], None, w, stride)[0]

    calls = {"aten": lambda: aten(a), "xsmm": lambda: xsmm(a), "sweeps+aten": unfused(aten),
             "sweeps+xsmm": unfused(xsmm), "fused": fused, **{f"fused/{b}": (lambda b=b: fused(b)) for b in blocks}}
    for k, f in calls.items():
        out = f()
        y = out[0] if isinstance(out, tuple) else out
        err = ((y.double() - y64).norm() / y64.norm()).item()
        assert err < tol, (k, err)
        if isinstance(out, tuple):
            assert torch.allclose(out[1].double(), m64, rtol=tol, atol=tol * v64.sqrt().mean().item()), k
            assert torch.allclose(out[2].double(), v64, rtol=tol * 10, atol=0), k
    ms = _interleaved_ms(calls, repeats)
    floor = min(ms["aten"], ms["xsmm"])
    unf = min(ms["sweeps+aten"], ms["sweeps+xsmm"])
    return {"shape": [n, cin, hw, hw], "cout": cout, "stride": stride, "dtype": str(dtype).removeprefix("torch."),
            "ms": ms, "floor": floor, "unfused": unf,
            "overhead_removed": 1 - (ms["fused"] - floor) / max(unf - floor, 1e-9)}


def measure_backward(n: int, hw: int, cin: int, cout: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, hw, hw, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(n, cout, hw, hw, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype)
    mean, f1, beta = torch.randn(cin, generator=gen) * 0.1, torch.rand(cin, generator=gen) + 0.5, torch.randn(cin, generator=gen) * 0.1
    zeros, ones = torch.zeros(cin), torch.ones(cin)
    a = cpu.apply([[x]], [mean], [f1], [beta], [], "relu", dtype)
    g64 = torch.einsum("nohw,oc->nchw", dy.double(), w.double()[:, :, 0, 0])
    dw64 = torch.einsum("nohw,nchw->oc", dy.double(), a.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def aten(inp):
        return torch.ops.aten.convolution_backward(dy, inp, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                   [True, True, False])[:2]

    def unfused():
        g, dw = aten(cpu.apply([[x]], [mean], [f1], [beta], [], "relu", dtype))
        cpu.grad_stats_x(g, "relu", [x], mean, f1, beta, dtype)
        return g, dw

    calls = {"aten": lambda: aten(a), "xsmm": lambda: cpu.pointwise_backward([a], zeros, ones, zeros, None, dy, w)[:2],
             "sweeps+aten": unfused, "fused": lambda: cpu.pointwise_backward([x], mean, f1, beta, "relu", dy, w)[:2]}
    for k, f in calls.items():
        g, dw = f()
        for got, want in ((g, g64), (dw, dw64)):
            err = ((got.double().reshape(want.shape) - want).norm() / want.norm()).item()
            assert err < tol, (k, err)
    ms = _interleaved_ms(calls, repeats)
    floor, unf = min(ms["aten"], ms["xsmm"]), ms["sweeps+aten"]
    return {"shape": [n, cin, hw, hw], "cout": cout, "stride": 1, "dtype": str(dtype).removeprefix("torch."),
            "direction": "backward", "ms": ms, "floor": floor, "unfused": unf,
            "overhead_removed": 1 - (ms["fused"] - floor) / max(unf - floor, 1e-9)}


def measure_steps(model: str, rounds: int, dtype: str) -> dict:
    """Median bnff step seconds of ``model`` with the fused pointwise convolutions off and on ("auto")."""
    from bnff.bench import alternate_steps
    from bnff.ops import pointwise

    r = alternate_steps(model, {"off": lambda: setattr(pointwise, "MODE", "off"),
                                "auto": lambda: setattr(pointwise, "MODE", "auto")}, rounds, dtype)
    med = r["median_step_s"]
    ch = pointwise.choices()
    fwd = {k: on for k, on in ch.items() if k[0] != "backward"}
    bwd = {k[2:]: on for k, on in ch.items() if k[0] == "backward"}
    fused = [[list(k[0]), list(k[1]), str(k[3])] for k, on in fwd.items() if on]
    fused_bwd = [[list(k[0]), list(k[1]), str(k[3])] for k, on in bwd.items() if on]
    return {"model": model, "dtype": dtype, "step_s": r["step_s"], "median_step_s": med, "off/auto": med["off"] / med["auto"],
            "off - auto per round, s": r["first - last per round, s"], "shapes fused": fused,
            "shapes timed": len(fwd), "backward shapes fused": fused_bwd, "backward shapes timed": len(bwd)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="time whole bnff training steps of this model instead (bnff.models name)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--step-dtype", choices=["bf16", "fp32"], default="bf16", help="--model: the steps' dtype")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--blocks", type=int, nargs="*", default=[])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--backward", action="store_true", help="time the backward of the stride-1 shapes instead")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if cpu.pointwise_why():
        raise SystemExit(f"the fused pointwise convolution is unavailable: {cpu.pointwise_why()}")
    info = cpu_info()
    print(describe(info), f"| ATen {torch.backends.cpu.get_cpu_capability()} | libxsmm target {cpu.pointwise_target()}"
          f" | {torch.get_num_threads()} threads")
    if args.model:
        r = measure_steps(args.model, args.rounds, args.step_dtype)
        med, d = r["median_step_s"], r["off - auto per round, s"]
        print(f"{args.model} {args.step_dtype} batch 16: median step off {med['off']:.3f} s, auto {med['auto']:.3f} s, off/auto "
              f"{r['off/auto']:.3f}; off - auto per round median {d['median'] * 1e3:+.1f} ms (quartiles "
              f"{d['quartiles'][0] * 1e3:+.1f}, {d['quartiles'][2] * 1e3:+.1f}); auto fused {len(r['shapes fused'])} "
              f"of {r['shapes timed']} shapes forward, {len(r['backward shapes fused'])} of "
              f"{r['backward shapes timed']} backward")
        if args.json:
            write_json(args.json, {"cpu": info, "libxsmm_target": cpu.pointwise_target(), "rounds": args.rounds, **r})
        return
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for n, hw, cin, cout, stride in SHAPES:
            if args.backward and stride != 1:
                continue
            r = (measure_backward(n, hw, cin, cout, dtype, args.repeats) if args.backward
                 else measure(n, hw, cin, cout, stride, dtype, args.repeats, tuple(args.blocks)))
            rows.append(r)
            print(f"{r['dtype']:8s} {cin:4d}->{cout:4d} {hw:2d}x{hw:<2d} s{stride} "
                  + "  ".join(f"{k} {v:6.2f}" for k, v in r["ms"].items())
                  + f"  overhead removed {r['overhead_removed']:+.0%}", flush=True)
        sub = [r for r in rows if r["dtype"] == name]
        tot = {k: sum(r[k] if k in ("floor", "unfused") else r["ms"].get(k, 0.0) for r in sub)
               for k in ("floor", "unfused", "fused", "sweeps+aten", "sweeps+xsmm")}
        print(f"{name}: sum over shapes floor {tot['floor']:.1f} ms, sweeps+aten {tot['sweeps+aten']:.1f}, "
              + ("" if args.backward else f"sweeps+xsmm {tot['sweeps+xsmm']:.1f}, ")
              + f"fused {tot['fused']:.1f}; overhead removed "
              f"{1 - (tot['fused'] - tot['floor']) / (tot['unfused'] - tot['floor']):+.0%}", flush=True)
    if args.json:
        write_json(args.json, {"cpu": info, "aten_capability": torch.backends.cpu.get_cpu_capability(),
                               "libxsmm_target": cpu.pointwise_target(), "threads": torch.get_num_threads(),
                               "repeats": args.repeats, "direction": "backward" if args.backward else "forward",
                               "rows": rows})


if __name__ == "__main__":
    main()
