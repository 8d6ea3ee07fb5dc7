"""``bnff tile``: per-layer DRAM reads, writes, row-buffer hit rate, energy and time, baseline vs a
tile order, as a table, JSON and CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnff.atomic import atomic_open
from bnff.tiling.schedule import LayerRun


def summary(baseline: list[LayerRun], optimized: list[LayerRun]) -> dict:
    """``{"baseline_energy_pj", "optimized_energy_pj", "energy_reduction", "baseline_dram_bytes",
    "optimized_dram_bytes"}``; a reduction of 0.67 means -67%."""
    be, oe = sum(r.dram.energy_pj for r in baseline), sum(r.dram.energy_pj for r in optimized)
    return {"baseline_energy_pj": be, "optimized_energy_pj": oe, "energy_reduction": 1 - oe / be,
            "baseline_dram_bytes": sum(r.dram.dram_bytes for r in baseline),
            "optimized_dram_bytes": sum(r.dram.dram_bytes for r in optimized)}


def text(model: str, entries: int, device: str, baseline: list[LayerRun], optimized: list[LayerRun]) -> str:
    console = Console(width=150, record=True, file=io.StringIO())
    order = optimized[0].order if optimized else "row"
    t = Table(title=f"{model}: pointwise layers, batch 1, 224x224, buffer {entries} entries of 16 bits; "
                    f"baseline row order vs {order} order (each with its best tiles)")
    for col in ("layer", "M x K x N", f"{order} tiles", "DRAM KiB: base", order, "row hits: base", order,
                "energy uJ: base", order, "change"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for b, o in zip(baseline, optimized):
        g, tl = b.gemm, o.tiles
        t.add_row(b.layer, f"{g.m}x{g.k}x{g.n}", f"{tl.tm}x{tl.tk}x{tl.tn}",
                  f"{b.dram.dram_bytes / 1024:,.0f}", f"{o.dram.dram_bytes / 1024:,.0f}",
                  f"{b.dram.hit_rate:.1%}", f"{o.dram.hit_rate:.1%}", f"{b.dram.energy_pj / 1e6:,.1f}",
                  f"{o.dram.energy_pj / 1e6:,.1f}", f"{o.dram.energy_pj / b.dram.energy_pj - 1:+.1%}")
    console.print(t)
    s = summary(baseline, optimized)
    console.print(f"total DRAM energy {s['baseline_energy_pj'] / 1e6:,.1f} -> {s['optimized_energy_pj'] / 1e6:,.1f} uJ "
                  f"({-s['energy_reduction']:+.1%}); DRAM bytes {s['baseline_dram_bytes']:,} -> {s['optimized_dram_bytes']:,}")
    console.print(f"DRAM: {device}")
    console.print("not yet modelled (issue 16 continues): fused depthwise-separable groups, CP decomposition, "
                  "--reproduce, --sweep-buffer")
    return console.export_text()


def write_csv(path: str | Path, baseline: list[LayerRun], optimized: list[LayerRun]) -> None:
    """One row per layer and schedule, atomically."""
    rows = [{"schedule": "baseline", **r.as_dict()} for r in baseline] + \
           [{"schedule": "optimized", **r.as_dict()} for r in optimized]
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


__all__ = ["summary", "text", "write_csv"]
