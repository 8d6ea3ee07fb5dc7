"""``bnff simulate``'s outputs: the per-block table and summary (text), JSON, CSV and the figures."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnff.accel import Simulation, area
from bnff.atomic import save_figure
from bnff.atomic import write_csv as write_csv_rows

TABLE4 = {"resnet18": (0.870, 1.007), "resnet50": (0.485, 0.545)}
"""Seed 002 Table 4 as printed: FP and BP improvement of fused over unfused execution, batch 32."""
TABLE4_AS_TEXT = {"resnet50": (0.870, 1.007), "resnet18": (0.485, 0.545)}
"""Table 4 with its rows read as swapped: the seed's text on Figs. 8-9 gives ResNet-50 +87.0% (FP)
and about +100% (BP) (issue 15)."""


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def text(sim: Simulation) -> str:
    """Per-block FP and BP times, unfused vs fused (Figs. 8-9), and the summary (Table 4's form)."""
    console = Console(width=140, record=True, file=io.StringIO())
    t = Table(title=f"{sim.model}, batch {sim.batch}, on {sim.config.source}: time per training step (ms)")
    for col in ("block", "FP unfused", "FP fused", "FP speedup", "BP unfused", "BP fused", "BP speedup"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for b in sim.blocks():
        t.add_row(b["block"], _ms(b["fp_unfused_s"]), _ms(b["fp_fused_s"]), f"{b['fp_unfused_s'] / b['fp_fused_s']:.2f}x",
                  _ms(b["bp_unfused_s"]), _ms(b["bp_fused_s"]), f"{b['bp_unfused_s'] / b['bp_fused_s']:.2f}x"
                  if b["bp_fused_s"] else "")
    console.print(t)
    s = sim.summary()
    line = (f"whole step: FP {_ms(s['fp_unfused_s'])} -> {_ms(s['fp_fused_s'])} ms ({s['fp_improvement']:+.1%}), "
            f"BP {_ms(s['bp_unfused_s'])} -> {_ms(s['bp_fused_s'])} ms ({s['bp_improvement']:+.1%})")
    console.print(line)
    key = sim.model.lower().replace("-", "")
    if key in TABLE4 and sim.batch == 32:
        fp, bp = TABLE4[key]
        fp2, bp2 = TABLE4_AS_TEXT[key]
        console.print(f"seed 002 Table 4 as printed: FP {fp:+.1%}, BP {bp:+.1%}; rows read as swapped (the seed's "
                      f"text on Figs. 8-9): FP {fp2:+.1%}, BP {bp2:+.1%}")
    ap = area_power(sim)
    base, fused = ap["base"], ap["fused"]
    pb, pf = area.TABLE3["base"]["total"], area.TABLE3["fused"]["total"]
    console.print(f"area and power (Table 3's form; unit costs calibrated on the seed's base column): base "
                  f"{base['area_mm2']:.1f} mm², {base['power_w']:.1f} W; fusion-capable {fused['area_mm2']:.1f} mm², "
                  f"{fused['power_w']:.1f} W: {fused['area_mm2'] / base['area_mm2'] - 1:+.1%} area, "
                  f"{fused['power_w'] / base['power_w'] - 1:+.1%} power (seed: {pb[0]} -> {pf[0]} mm², {pb[1]} -> "
                  f"{pf[1]} W: {pf[0] / pb[0] - 1:+.1%}, {pf[1] / pb[1] - 1:+.1%})")
    stalls = sim.stalls()
    if stalls:
        n = len(stalls)
        mean = {k: sum(r[k] for r in stalls) / n for k in ("pre_share", "post_share", "memory_share")}
        worst = max(stalls, key=lambda r: r["pre_share"])
        console.print(f"fused layers' added time (Fig. 10's causes), mean share of their time over {n} layer phases: "
                      f"pre-processing {mean['pre_share']:.1%}, post-processing {mean['post_share']:.1%}, memory "
                      f"{mean['memory_share']:.1%}; largest pre-processing share {worst['pre_share']:.1%} "
                      f"({worst['layer']}, {worst['phase']})")
    return console.export_text()


def area_power(sim: Simulation) -> dict:
    """``{"base": {"area_mm2", "power_w", "components"}, "fused": {...}, "seed_table3": ...}`` of the
    simulated configuration (``bnff.accel.area``); components as (mm², W)."""
    costs = area.calibrate()
    out = {}
    for name, fused in (("base", False), ("fused", True)):
        est = area.estimate(sim.config, fused, costs)
        out[name] = {"area_mm2": est["total"][0], "power_w": est["total"][1],
                     "components": {k: {"area_mm2": v[0], "power_w": v[1]} for k, v in est.items() if k != "total"}}
    out["seed_table3"] = {k: {c: {"area_mm2": v[0], "power_w": v[1]} for c, v in t.items()} for k, t in area.TABLE3.items()}
    return out


def gpu_text(model: str, machine: str, times: list, sim: Simulation | None = None) -> str:
    """A roofline GPU's figures for ``model`` next to the seeds' (``bnff.accel.roofline``): seed 002
    Fig. 2's BN/NonL/Add time relative to convolution time, seed 000's efficiency gain from fusion,
    and, with ``sim`` (the accelerator at the same batch), the unfused accelerator's time per block
    relative to the GPU's (seed 002: within 5% on the 2080 Ti)."""
    from bnff.accel import roofline as rf

    console = Console(width=140, record=True, file=io.StringIO())
    rel = rf.relative_to_conv(times)
    t = Table(title=f"{model} on {machine} (roofline): time of memory-bound layers relative to convolutions, unfused")
    for col in ("phase", "BN", "NonL", "Add", "total", "seed 002 Fig. 2 (mean of its CNNs)", "seed 002, ResNet-50"):
        t.add_column(col, justify="right")
    for phase in ("fp", "bp"):
        seed = rf.SEED002_FIG2[phase]
        t.add_row(phase.upper(), *(f"{rel[phase][k]:.2f}" for k in ("bn", "act", "add", "total")),
                  f"{seed['bn']:.2f} / {seed['act']:.2f} / {seed['add']:.2f} = {sum(seed.values()):.2f}",
                  f"{rf.SEED002_RESNET50[phase]:.2f}")
    console.print(t)
    gain = rf.fusion_gain(times)
    seed = rf.SEED000_V100.get(model)
    console.print(f"software fusion (the plan's bnff scheme): step time unfused / fused - 1 = {gain:+.1%}"
                  + (f" (seed 000 on a V100: {seed:+.1%} compute efficiency)" if seed is not None else ""))
    if sim is not None:
        gpu: dict[str, float] = {}
        for x in times:
            if x.scheme == "unfused":
                name = sim.block_of.get(x.block, x.block)
                gpu[name] = gpu.get(name, 0.0) + x.time_s
        ratios = [f"{b['block']} {(b['fp_unfused_s'] + b['bp_unfused_s']) / gpu[b['block']]:.2f}"
                  for b in sim.blocks() if gpu.get(b["block"])]
        console.print("unfused accelerator / GPU time per block (seed 002: within 5%): " + ", ".join(ratios))
    return console.export_text()


def as_json(sim: Simulation) -> dict:
    """``{"model", "batch", "config", "summary", "blocks", "stalls", "area_power", "layers"}``; times in
    seconds, improvements as unfused / fused - 1, areas in mm², powers in W."""
    return {"model": sim.model, "batch": sim.batch, "config": {"source": sim.config.source, **{
        k: v for k, v in asdict(sim.config).items() if k != "source"}},
            "summary": sim.summary(), "blocks": sim.blocks(), "stalls": sim.stalls(), "area_power": area_power(sim),
            "layers": [t.as_dict() for t in sim.layers]}


def sweep_text(model: str, key: str, rows: list[dict]) -> str:
    """The rows of ``bnff.accel.sweep`` as a table: speedups and step times per point."""
    console = Console(width=140, record=True, file=io.StringIO())
    t = Table(title=f"{model}: sweep of {key}")
    for col in (key, "FP unfused ms", "FP fused ms", "FP improvement", "BP unfused ms", "BP fused ms", "BP improvement",
                "area mm²", "power W"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r[key]:g}", _ms(r["fp_unfused_s"]), _ms(r["fp_fused_s"]), f"{r['fp_improvement']:+.1%}",
                  _ms(r["bp_unfused_s"]), _ms(r["bp_fused_s"]), f"{r['bp_improvement']:+.1%}",
                  f"{r['area_mm2']:.1f}", f"{r['power_w']:.1f}")
    console.print(t)
    return console.export_text()


def write_csv(path: str | Path, sim: Simulation) -> None:
    """One row per layer, phase and scheme (SCALE-Sim style), atomically."""
    write_csv_rows(path, [t.as_dict() for t in sim.layers])


def write_plot(path: str | Path, sim: Simulation) -> None:
    """Figs. 8, 9 and 10 as bar charts (per-block FP and BP time, unfused vs fused; the fused
    layers' stall shares), one figure with three panels; PNG, SVG or PDF by suffix."""
    from matplotlib.figure import Figure

    blocks = sim.blocks()
    labels = [b["block"] for b in blocks]
    fig = Figure(figsize=(max(9.0, 0.45 * len(labels)), 11))
    axes = fig.subplots(3, 1)
    x = range(len(labels))
    for ax, phase, fig_no in ((axes[0], "fp", 8), (axes[1], "bp", 9)):
        ax.bar([i - 0.2 for i in x], [b[f"{phase}_unfused_s"] * 1e3 for b in blocks], 0.4, label="unfused")
        ax.bar([i + 0.2 for i in x], [b[f"{phase}_fused_s"] * 1e3 for b in blocks], 0.4, label="fused")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title(f"{phase.upper()} time per block (seed 002 Fig. {fig_no}'s form)")
        ax.legend()
    stalls = sim.stalls()
    names = [f"{r['layer']} {r['phase']}" for r in stalls]
    bottom = [0.0] * len(stalls)
    for key, label in (("pre_share", "pre-processing"), ("post_share", "post-processing"), ("memory_share", "memory")):
        values = [r[key] for r in stalls]
        axes[2].bar(range(len(stalls)), values, 0.8, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values)]
    axes[2].set_xticks(range(len(stalls)), names, rotation=90, fontsize=5)
    axes[2].set_ylabel("share of the layer's time")
    axes[2].set_title("fused layers: time added by each cause (seed 002 Fig. 10's form)")
    axes[2].legend()
    fig.suptitle(f"{sim.model}, batch {sim.batch}, {sim.config.source}")
    fig.tight_layout()
    save_figure(path, fig)


__all__ = ["TABLE4", "TABLE4_AS_TEXT", "as_json", "gpu_text", "sweep_text", "text", "write_csv", "write_plot"]
