"""The README's speed table: ``bnff bench`` for the issue's three settings, each in a process of its own.

    .venv/bin/python benchmarks/speed.py [--steps 10] [--json benchmarks/results/speed.json]

Settings: ResNet-50 batch 16 224x224 bf16 and fp32, DenseNet-121 batch 16 224x224 bf16; each times
eager, torch.compile (compile time apart), bnff (default backend) and the conv floor, interleaved
after warm-up (``bnff.bench``). Every setting runs twice, in fresh processes: with the default
allocator (what a user gets: eager faults in fresh pages for its large intermediates, bnff reuses its
workspace) and with ``--tuned-malloc`` (no variant faults: the kernels' own gain). Prints a markdown
table; ``--json`` writes every result.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bnff.atomic import atomic_open

SETTINGS = (("resnet50", "bf16"), ("resnet50", "fp32"), ("densenet121", "bf16"))
ALLOCATORS = ("default", "tuned-malloc")


def _bench(model: str, dtype: str, batch: int, steps: int, allocator: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-c", "from bnff.cli import main; main()", "bench", "--model", model,
               "--batch", str(batch), "--dtype", dtype, "--steps", str(steps), "--json", str(out)]
        if allocator == "tuned-malloc":
            cmd.append("--tuned-malloc")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    print("| model | dtype | allocator | eager img/s | compile img/s | bnff img/s | bnff / eager | bnff / compile "
          "| step / floor: eager, compile, bnff | compile time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, dtype in SETTINGS:
        for allocator in ALLOCATORS:
            res = _bench(model, dtype, args.batch, args.steps, allocator)
            results.append(res)
            r = res["results"]
            print(f"| {model} | {dtype} | {allocator} | {r['eager']['images_per_s']:.1f} "
                  f"| {r['compile']['images_per_s']:.1f} | {r['bnff']['images_per_s']:.1f} "
                  f"| {res['ratios']['bnff_vs_eager']:.2f}x | {res['ratios']['bnff_vs_compile']:.2f}x "
                  f"| {r['eager']['step_over_floor']:.2f}, {r['compile']['step_over_floor']:.2f}, "
                  f"{r['bnff']['step_over_floor']:.2f} | {res['compile_s']:.0f} s |", flush=True)
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
