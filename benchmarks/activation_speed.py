"""Training-step time of eager vs bnff when MobileNetV2's ReLU6 is replaced by other activations.

    .venv/bin/python benchmarks/activation_speed.py [--rounds 5] [--batch 16] [--image-size 224]
                                                    [--activations relu6 silu hardswish gelu] [--json PATH]

The network of ``activation_footprint.py`` (MobileNetV2, ``bnff.models``, every ``nn.ReLU6`` swapped for
the activation named, in place where the module allows it) trains with SGD, bf16 autocast, channels_last,
glibc malloc tuned (``bnff.bench.tune_malloc``, as ``bnff bench --tuned-malloc``), eager and restructured
on the ``cpu`` backend side by side in one process: each round times one eager step and one bnff step,
after 2 warm-up rounds. A row gives the median of the per-round ratios eager / bnff (> 1: bnff faster),
and checks that no sweep fell back to the reference (the C++ kernels compute every activation). This
measures the kernels' activations, not EfficientNet or MobileNetV3 themselves (squeeze-and-excitation
and depthwise-heavy stages are not in MobileNetV2).
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import bnff
from activation_footprint import ACTIVATIONS, swapped
from bnff.atomic import write_json
from bnff.bench import tune_malloc
from bnff.machine import cpu_info
from bnff.ops.backends import cpu
from bnff.train import training_loss


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        training_loss(out, y).backward()
        opt.step()
        return time.perf_counter() - t

    return step


def measure(kind: str, batch: int, size: int, rounds: int) -> dict:
    """Eager and bnff step times (s per round) and the median ratio for MobileNetV2 with ``kind``."""
    torch.manual_seed(0)
    cl = torch.channels_last
    eager = swapped(ACTIVATIONS[kind]).to(memory_format=cl)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (batch,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = bnff.restructure(copy.deepcopy(eager), backend="cpu", example_input=x)
    steps = {"eager": _step(eager, x, y), "bnff": _step(fused, x, y)}
    fell = cpu.fallbacks()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(rounds + 2):
        for v, step in steps.items():
            t = step()
            if r >= 2:
                times[v].append(t)
    ratios = [e / b for e, b in zip(times["eager"], times["bnff"])]
    return {"activation": kind, "step_s": times, "median_step_s": {v: statistics.median(t) for v, t in times.items()},
            "eager / bnff": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
            "fallbacks": {f"{s}: {why}": n for (s, why), n in (cpu.fallbacks() - fell).items()},
            "fused BNs": len(bnff.fusion_report(fused).fused_bns)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--activations", nargs="+", default=["relu6", "silu", "hardswish", "gelu"], choices=list(ACTIVATIONS))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    tune_malloc()
    info = cpu_info()
    print(f"CPU: {info['model']}, ISA level {cpu.isa()}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, bf16, channels_last, {args.rounds} rounds")
    print("| activation | eager step | bnff step | eager / bnff (median, spread) | fallbacks |")
    print("|---|---|---|---|---|")
    rows = []
    for kind in args.activations:
        r = measure(kind, args.batch, args.image_size, args.rounds)
        rows.append(r)
        m = r["median_step_s"]
        print(f"| {kind} | {m['eager'] * 1e3:.0f} ms | {m['bnff'] * 1e3:.0f} ms | {r['eager / bnff']:.3f} "
              f"({r['spread'][0]:.3f}-{r['spread'][1]:.3f}) | {sum(r['fallbacks'].values())} |", flush=True)
    if args.json:
        write_json(args.json, {"cpu": info, "isa": cpu.isa(), "torch": torch.__version__, "batch": args.batch,
                               "image_size": args.image_size, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
