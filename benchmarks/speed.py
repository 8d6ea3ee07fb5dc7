"""The README's speed table: ``bnff bench`` for the issue's three settings, in one process each.

    .venv/bin/python benchmarks/speed.py [--steps 10] [--json benchmarks/results/speed.json]

Settings: ResNet-50 batch 16 224x224 bf16 and fp32, DenseNet-121 batch 16 224x224 bf16; each times
eager, torch.compile (compile time apart), bnff (default backend) and the conv floor, interleaved
after warm-up (``bnff.bench``). Prints a markdown table; ``--json`` writes every result.
"""

import argparse
import json

from bnff.bench import BenchConfig, run

SETTINGS = (("resnet50", "bf16"), ("resnet50", "fp32"), ("densenet121", "bf16"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    print("| model | dtype | eager img/s | compile img/s | bnff img/s | bnff / eager | bnff / compile "
          "| step / floor: eager, compile, bnff | compile time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, dtype in SETTINGS:
        res = run(BenchConfig(model=model, batch=args.batch, dtype=dtype, steps=args.steps, warmup=2))
        results.append(res)
        r = res["results"]
        print(f"| {model} | {dtype} | {r['eager']['images_per_s']:.1f} | {r['compile']['images_per_s']:.1f} "
              f"| {r['bnff']['images_per_s']:.1f} | {res['ratios']['bnff_vs_eager']:.2f}x "
              f"| {res['ratios']['bnff_vs_compile']:.2f}x "
              f"| {r['eager']['step_over_floor']:.2f}, {r['compile']['step_over_floor']:.2f}, "
              f"{r['bnff']['step_over_floor']:.2f} | {res['compile_s']:.0f} s |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
