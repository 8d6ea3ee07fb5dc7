"""The speed table of docs/speed.md: ``bnff bench`` for each setting in several fresh processes.

    .venv/bin/python benchmarks/speed.py [--processes 3] [--steps 10] [--json benchmarks/results/speed.json]
                                         [--models M ...] [--allocators A ...] [--prefer memory|speed]
                                         [--variants eager compile bnff conv_floor]

Settings: ResNet-50 batch 16 224x224 bf16 and fp32; DenseNet-121, MobileNetV2, EfficientNet-B0,
MobileNetV3-Large, RegNetY-1.6GF and CSPDarknet-53 batch 16 224x224 bf16; each times eager, torch.compile (compile time apart), bnff (default backend), bnff under
torch.compile (bnff+compile) and the conv floor (each convolution on the faster of ATen and libxsmm),
interleaved after warm-up (``bnff.bench``; ``--variants`` leaves some out: eager, bnff and the floor
are needed; ``bnff_libxsmm`` adds bnff with its 1x1 convolutions on libxsmm, unfused). Every setting runs with the default allocator
(what a user gets: eager faults in fresh pages for its large intermediates, bnff reuses its
workspace) and with ``--tuned-malloc`` (no variant faults: the kernels' own gain), each in
``--processes`` fresh processes, so that one process's luck (its pages, its neighbours) cannot
decide a row: a row gives the median of the per-process ratios and their spread (min to max), and
counts as level when the median ratio is within 2% of 1.0. ``--prefer speed`` restructures with
``prefer="speed"`` (groups slower fused on this CPU left unfused; the table then says how many).
Prints the CPU and a markdown table; ``--json`` writes every process's result.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bnff.atomic import atomic_open
from bnff.machine import cpu_info, describe
from bnff.names import BENCH_VARIANTS, DEFAULT_BENCH_VARIANTS

SETTINGS = (("resnet50", "bf16"), ("resnet50", "fp32"), ("densenet121", "bf16"), ("mobilenet_v2", "bf16"),
            ("efficientnet_b0", "bf16"), ("mobilenet_v3_large", "bf16"), ("regnet_y_1_6gf", "bf16"),
            ("cspdarknet53", "bf16"))
ALLOCATORS = ("default", "tuned-malloc")
LEVEL = 0.02  # a median ratio within 2% of 1.0 is level


def _bench(model: str, dtype: str, batch: int, steps: int, allocator: str, prefer: str, variants: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-c", "from bnff.cli import main; main()", "bench", "--model", model,
               "--batch", str(batch), "--dtype", dtype, "--steps", str(steps), "--prefer", prefer, "--variants", *variants,
               "--json", str(out)]
        if allocator == "tuned-malloc":
            cmd.append("--tuned-malloc")
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"bnff bench failed ({' '.join(cmd[3:])}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def _spread(values: list[float], fmt: str) -> str:
    """Median and (min-max) of ``values``."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def _verdict(ratio: float) -> str:
    return "level" if abs(ratio - 1) <= LEVEL else ("faster" if ratio > 1 else "slower")


def row(model: str, dtype: str, allocator: str, runs: list[dict]) -> str:
    """One markdown row from the per-process results of a setting."""
    def col(variant: str, key: str) -> list[float]:
        return [r["results"][variant][key] for r in runs]
    vs_eager = [r["ratios"]["bnff_vs_eager"] for r in runs]
    vs_compile = [r["ratios"]["bnff_vs_compile"] for r in runs if "bnff_vs_compile" in r["ratios"]]
    removed = [r["overhead_removed"] for r in runs if r["overhead_removed"] is not None]
    saved = statistics.median(r["saved_bytes"]["bnff"] / r["saved_bytes"]["eager"] for r in runs)
    unfused = [len(r["unfused_groups"]) for r in runs]
    unfused = f" ({_spread(unfused, 'd')} of {runs[0]['fusable_groups']} groups unfused)" if any(unfused) else ""
    floors = ", ".join(f"{statistics.median(col(v, 'step_over_floor')):.2f}" if v in runs[0]["results"] else "-"
                       for v in ("eager", "compile", "bnff"))
    both = [r["ratios"]["bnff+compile_vs_compile"] for r in runs if "bnff+compile_vs_compile" in r["ratios"]]
    saving_ms = [(r["results"]["eager"]["step_s"] - r["results"]["bnff"]["step_s"]) * 1e3 for r in runs]
    vs_xsmm = [r["ratios"]["bnff_vs_bnff_libxsmm"] for r in runs if "bnff_vs_bnff_libxsmm" in r["ratios"]]
    on_xsmm = runs[0].get("floor_on_libxsmm") or {}
    floor_xsmm = f"{on_xsmm['forward']}, {on_xsmm['backward']} of {on_xsmm['convolutions']}" if on_xsmm else "-"

    def ratio(values: list[float]) -> str:
        return f"{_spread(values, '.2f')}x {_verdict(statistics.median(values))}" if values else "-"

    def img_s(variant: str) -> str:
        return f"{statistics.median(col(variant, 'images_per_s')):.1f}" if variant in runs[0]["results"] else "-"
    return (f"| {model} | {dtype} | {allocator} | {img_s('eager')} | {img_s('compile')} | {img_s('bnff')} "
            f"| {ratio(vs_eager)} | {ratio(vs_compile)} | {ratio(both)} "
            f"| {floors} | {_spread(removed, '+.0%') if removed else ''} | {_spread(saving_ms, '+.0f')} "
            f"| {saved:.2f}{unfused} | {ratio(vs_xsmm)} | {floor_xsmm} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=3, help="fresh processes per setting (default 3)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--models", nargs="+", default=None, help="only these models' settings")
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--prefer", choices=["memory", "speed"], default="memory")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_BENCH_VARIANTS), choices=BENCH_VARIANTS,
                   help="bnff bench's variants (default all but bnff_libxsmm; eager, bnff and conv_floor are needed)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not {"eager", "bnff", "conv_floor"} <= set(args.variants):
        p.error("--variants must include eager, bnff and conv_floor")
    print(describe(cpu_info()))
    print(f"batch {args.batch}, 224x224, channels_last; median (min to max) of {args.processes} fresh processes, "
          f"each the median of {args.steps} interleaved rounds; level = within {LEVEL:.0%} of 1.0; "
          f"prefer={args.prefer!r}\n")
    print("| model | dtype | allocator | eager img/s | compile img/s | bnff img/s | bnff / eager | bnff / compile "
          "| bnff+compile / compile | step / floor: eager, compile, bnff | overhead removed "
          "| eager - bnff (ms per step) | saved activations bnff / eager | bnff / bnff_libxsmm "
          "| floor on libxsmm: forward, backward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for model, dtype in SETTINGS:
        if args.models and model not in args.models:
            continue
        for allocator in args.allocators:
            runs = [_bench(model, dtype, args.batch, args.steps, allocator, args.prefer, args.variants)
                    for _ in range(args.processes)]
            results.append({"model": model, "dtype": dtype, "allocator": allocator, "prefer": args.prefer, "runs": runs})
            print(row(model, dtype, allocator, runs), flush=True)
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
