"""``bnff tile``'s outputs: per op (or fused chain) DRAM bytes, row-buffer hit rate, energy and time,
baseline vs optimised schedule, as a table, JSON and CSV; the thesis' two figures beside ours."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnff.atomic import save_figure
from bnff.atomic import write_csv as write_csv_rows
from bnff.tiling.schedule import Run

PUBLISHED = {"mobilenet_v2": 0.67, "resnet50": 0.20}
"""Seed 003 (abstract): DRAM energy saved by Scan order with fusion, 64K-entry buffer: MobileNetV2
67%, CP-decomposed ResNet-50 20%."""


def summary(baseline: list[Run], optimized: list[Run]) -> dict:
    """``{"baseline_energy_pj", "optimized_energy_pj", "energy_reduction", "baseline_dram_bytes",
    "optimized_dram_bytes", "baseline_time_s", "optimized_time_s"}``; a reduction of 0.67 means -67%."""
    be, oe = sum(r.dram.energy_pj for r in baseline), sum(r.dram.energy_pj for r in optimized)
    return {"baseline_energy_pj": be, "optimized_energy_pj": oe, "energy_reduction": 1 - oe / be,
            "baseline_dram_bytes": sum(r.dram.dram_bytes for r in baseline),
            "optimized_dram_bytes": sum(r.dram.dram_bytes for r in optimized),
            "baseline_time_s": sum(r.dram.time_s for r in baseline),
            "optimized_time_s": sum(r.dram.time_s for r in optimized)}


def _table(title: str, runs: list[Run]) -> Table:
    t = Table(title=title)
    for col in ("op", "kind", "schedule", "DRAM KiB", "row hits", "energy uJ"):
        t.add_column(col, justify="left" if col in ("op", "kind", "schedule") else "right")
    for r in runs:
        t.add_row(r.name if len(r.name) < 60 else r.name[:57] + "...", r.kind, r.detail,
                  f"{r.dram.dram_bytes / 1024:,.0f}", f"{r.dram.hit_rate:.1%}", f"{r.dram.energy_pj / 1e6:,.1f}")
    return t


def text(model: str, entries: int, device: str, baseline: list[Run], optimized: list[Run], assumptions: str,
         skipped: dict[str, str]) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(_table(f"{model}: baseline (each op alone, row order, best tiles)", baseline))
    console.print(_table(f"{model}: optimised", optimized))
    s = summary(baseline, optimized)
    console.print(f"DRAM energy {s['baseline_energy_pj'] / 1e6:,.1f} -> {s['optimized_energy_pj'] / 1e6:,.1f} uJ "
                  f"({-s['energy_reduction']:+.1%}); DRAM bytes {s['baseline_dram_bytes']:,} -> "
                  f"{s['optimized_dram_bytes']:,}; DRAM time {s['baseline_time_s'] * 1e3:.2f} -> "
                  f"{s['optimized_time_s'] * 1e3:.2f} ms")
    console.print(f"assumptions: {assumptions}; buffer {entries} entries of 16 bits; DRAM: {device}")
    if skipped:
        console.print(f"not modelled ({len(skipped)}): " + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:4])
                      + (" ..." if len(skipped) > 4 else ""))
    return console.export_text()


def reproduce_text(rows: list[dict]) -> str:
    console = Console(width=140, record=True, file=io.StringIO())
    t = Table(title="seed 003's headline: DRAM energy saved by Scan order + fusion, 64K entries")
    for col in ("model", "ours", "thesis", "Scan alone", "fusion alone", "assumptions"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["model"], f"{-r['energy_reduction']:+.1%}", f"{-r['published_reduction']:+.0%}",
                  f"{-r['scan_only_reduction']:+.1%}", f"{-r['fusion_only_reduction']:+.1%}", r["assumptions"])
    console.print(t)
    return console.export_text()


def sweep_text(model: str, rows: list[dict]) -> str:
    """``--sweep-buffer``'s rows: energy per buffer size, baseline and optimised."""
    console = Console(width=140, record=True, file=io.StringIO())
    t = Table(title=f"{model}: DRAM energy over buffer sizes (thesis section 5.3's comparison)")
    for col in ("entries", "baseline uJ", "optimised uJ", "saved", "order alone saves"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['buffer_entries']:,}", f"{r['baseline_energy_pj'] / 1e6:,.1f}",
                  f"{r['optimized_energy_pj'] / 1e6:,.1f}", f"{r['energy_reduction']:.1%}",
                  f"{r['scan_only_reduction']:.1%}")
    console.print(t)
    return console.export_text()


def write_sweep_plot(path: str | Path, model: str, rows: list[dict]) -> None:
    """Energy over buffer sizes, baseline and optimised, as a line chart (PNG, SVG or PDF by suffix)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    sizes = [r["buffer_entries"] for r in rows]
    ax.plot(sizes, [r["baseline_energy_pj"] / 1e6 for r in rows], "o-", label="baseline (row order, no fusion)")
    ax.plot(sizes, [r["optimized_energy_pj"] / 1e6 for r in rows], "s-", label="optimised (order + fusion)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("on-chip buffer (16-bit entries)")
    ax.set_ylabel("DRAM energy (uJ)")
    ax.set_title(f"{model}, batch 1: DRAM energy over buffer sizes")
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def write_csv(path: str | Path, baseline: list[Run], optimized: list[Run]) -> None:
    """One row per op (or chain) and schedule, atomically."""
    write_csv_rows(path, [{"schedule": "baseline", **r.as_dict()} for r in baseline]
                   + [{"schedule": "optimized", **r.as_dict()} for r in optimized])


__all__ = ["PUBLISHED", "reproduce_text", "summary", "sweep_text", "text", "write_csv", "write_sweep_plot"]
