"""bnff on an NVIDIA GPU, in one call (issue 32, item 6): correctness first, then speed and memory.

    PYTHONPATH=src python3 benchmarks/gpu.py [--json gpu.json] [--budget-s 420] [--models resnet50 ...]
    .venv/bin/python benchmarks/gpu.py --dry-run [--models resnet18] [--variants eager bnff]

Runs from the source tree on the GPU machine the ``device`` tool lends (its own torch, no install, none
of the CPU-only dependencies: nothing here imports kornia, energydram or tensorly; plain prints).

1. **Correctness** on the device, per model: one training step of eager and of ``bnff.restructure``
   from the same weights on the same batch (bf16 autocast, channels_last), each against float64
   eager on the device: bnff's error (relative norm) on the output and on the median of the
   parameter gradients at most ``K`` times eager's, the suite's rule (tests/helpers.py). A model
   that fails is reported and not timed.
2. **Speed and memory**, ResNet-50 first (batch 256, 224x224, bf16 autocast, channels_last, SGD):
   images/s of eager, ``torch.compile``, bnff and bnff under ``torch.compile`` (median step after
   warm-up, each step synchronised; compile's warm-up reported apart), the peak memory of each
   variant's steps (``torch.cuda.max_memory_allocated``) and the activations each keeps for its
   backward (``bnff.memory``). Variants run one after the other, not interleaved: a GPU's step time
   is steady, and each variant's peak memory is then its own.

Each measured row is written to ``--json`` at once (atomically), and no new variant starts once
``--budget-s`` has passed, so a run cut short still returns what it measured. bnff runs the ``triton``
backend's sweeps (``bnff.ops.backends.triton``; ``reference``'s if Triton is missing).

``--dry-run`` runs the same code on the CPU at tiny shapes (batch 2, 32x32, 2 steps), with
``TRITON_INTERPRET=1`` set for Triton kernels: the test suite runs it end to end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

K = 4  # bnff may be K times as far from float64 as eager (tests/helpers.py)
MODELS = ("resnet50", "densenet121", "efficientnet_b0")
VARIANTS = ("eager", "compile", "bnff", "bnff+compile")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(out, y):
    import torch.nn.functional as F
    return F.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), y)


def _errors(model, ref, x, y, amp: bool) -> list[float]:
    """Relative errors against ``ref`` (float64 eager, gradients set) of ``model``'s output and of each
    parameter gradient after one step on (x, y); output first."""
    import torch
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    _loss(out, y).backward()
    with torch.no_grad():
        want = ref(x.double())
    errs = [float((out.detach().double() - want).norm() / want.norm())]
    mine = dict(model.named_parameters())  # (bnff.restructure keeps the parameters' names)
    for name, q in ref.named_parameters():
        if q.grad is not None and q.grad.norm() > 0:
            errs.append(float((mine[name].grad.double() - q.grad).norm() / q.grad.norm()))
    return errs


def check(name: str, device, batch: int, size: int, backend: str) -> dict:
    """Step 1: bnff's output and gradients against float64 by the suite's rule, eager's as the bar."""
    import torch

    import bnff
    from bnff import models
    torch.manual_seed(0)
    cl = torch.channels_last
    base = models.MODELS[name](num_classes=10).train().to(device, memory_format=cl)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (batch,), device=device)
    ref = copy.deepcopy(base).double()
    _loss(ref(x.double()), y).backward()
    eager = _errors(copy.deepcopy(base), ref, x, y, amp=True)
    fused = _errors(bnff.restructure(copy.deepcopy(base), backend=backend), ref, x, y, amp=True)
    mid = lambda e: sorted(e[1:])[len(e[1:]) // 2]  # noqa: E731
    ok = fused[0] <= K * eager[0] and mid(fused) <= K * mid(eager)
    return {"model": name, "ok": ok, "output_error": {"eager": eager[0], "bnff": fused[0]},
            "median_grad_error": {"eager": mid(eager), "bnff": mid(fused)}}


def measure(name: str, variant: str, device, batch: int, size: int, steps: int, warmup: int, backend: str) -> dict:
    """Step 2 for one variant: median step seconds, images/s, peak memory, saved activations."""
    import torch

    import bnff
    from bnff import models
    from bnff.memory import saved_activation_bytes
    torch.manual_seed(0)
    cl = torch.channels_last
    net = models.MODELS[name](num_classes=1000).train().to(device, memory_format=cl)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (batch,), device=device)
    if variant.startswith("bnff"):
        net = bnff.restructure(net, backend=backend)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        saved = saved_activation_bytes(net, x)
    run = torch.compile(net) if variant.endswith("compile") else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = run(x)
        _loss(out, y).backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = sum(step() for _ in range(warmup))
    times = [step() for _ in range(steps)]
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"model": name, "variant": variant, "batch": batch, "image_size": size, "step_s": med,
            "images_per_s": batch / med, "warmup_s": warm, "peak_memory_bytes": peak, "saved_activation_bytes": saved}


def _write(path: str | None, result: dict) -> None:
    if path:
        from bnff.atomic import write_json
        write_json(path, result)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-batch", type=int, default=8, help="mini-batch of the correctness check")
    p.add_argument("--budget-s", type=float, default=420.0, help="start nothing new after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes, Triton interpreted")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batch, args.image_size, args.steps, args.warmup, args.check_batch = 2, 32, 2, 1, 2
    import torch

    from bnff.ops import backends
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or with --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    # the Triton kernels: compiled on the GPU, in the interpreter in a dry run; without Triton, PyTorch's sweeps
    backend = "triton" if backends.triton.available(device) else "reference" if device.type == "cuda" else backends.default()
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "backend": backend,
              "triton": _version("triton"), "checks": [], "rows": [], "stopped_by_budget": False}
    print(f"{result['device']} | torch {result['torch']} | CUDA {result['cuda']} | triton {result['triton']} "
          f"| bnff backend {backend}", flush=True)
    for name in args.models:
        if time.perf_counter() - start > args.budget_s:
            result["stopped_by_budget"] = True
            break
        c = check(name, device, args.check_batch, args.image_size, backend)
        result["checks"].append(c)
        _write(args.json, result)
        print(f"{name}: correctness {'ok' if c['ok'] else 'FAILED'} (output error eager {c['output_error']['eager']:.2e}, "
              f"bnff {c['output_error']['bnff']:.2e})", flush=True)
        if not c["ok"]:
            continue
        for v in args.variants:
            if time.perf_counter() - start > args.budget_s:
                result["stopped_by_budget"] = True
                break
            r = measure(name, v, device, args.batch, args.image_size, args.steps, args.warmup, backend)
            result["rows"].append(r)
            _write(args.json, result)
            peak = "" if r["peak_memory_bytes"] is None else f", peak {r['peak_memory_bytes'] / 2 ** 30:.2f} GiB"
            print(f"{name} {v}: {r['images_per_s']:.1f} images/s, step {r['step_s'] * 1e3:.1f} ms{peak}, saved "
                  f"activations {r['saved_activation_bytes'] / 2 ** 20:.0f} MiB (warm-up {r['warmup_s']:.1f} s)", flush=True)
        if result["stopped_by_budget"]:
            break
    if result["stopped_by_budget"]:
        print(f"stopped at the {args.budget_s:.0f} s budget", flush=True)
    _write(args.json, result)
    return result


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
