"""Tables, JSON, CSV and the per-block plot of ``bnff traffic``."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnff.atomic import save_figure, write_json
from bnff.atomic import write_csv as write_csv_rows
from bnff.traffic.analysis import Analysis
from bnff.traffic.account import SCHEMES
from bnff.traffic.assumptions import Assumptions
from bnff.traffic.patterns import BNFF_FIELDS, FIELDS, PATTERNS, PUBLISHED

MiB = 2 ** 20


def _render(table: Table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def patterns_text(table: dict[str, dict[str, float]]) -> str:
    """Seed 002 Tables 1-2 as computed, with the published value where they differ."""
    t = Table(title="Seed 002 Tables 1-2: memory-intensive layers, in units of their mini-batch input")
    t.add_column("")
    for p in PATTERNS:
        t.add_column(p, justify="right")
    for f in FIELDS:
        cells = []
        for p in PATTERNS:
            ours, pub = table[p][f], PUBLISHED[p][f]
            cells.append(f"{ours:g}" if ours == pub else f"{ours:g} (paper {pub:g})")
        t.add_row(f.replace("_", " "), *cells)
    t.add_section()
    for f in BNFF_FIELDS:
        t.add_row(f.replace("_", " ") + " *", *(f"{table[p][f]:g}" for p in PATTERNS))
    return _render(t) + ("* not in the paper: bnff's own sweeps beside library convolutions "
                         "(bnff.traffic.account)\n")


def patterns_json(table: dict[str, dict[str, float]]) -> dict:
    """``{"patterns": {pattern: {field: value}}}``."""
    return {"patterns": {p: {f: table[p][f] for f in FIELDS} for p in PATTERNS}}


def summary(analyses: dict[str, Analysis]) -> dict[str, dict[str, int]]:
    """Scheme -> ``Analysis.summary()``."""
    return {s: analyses[s].summary() for s in SCHEMES}


def per_block(analyses: dict[str, Analysis]) -> "OrderedDict[str, dict[str, int]]":
    """Block -> scheme -> total off-chip bytes, blocks in network order."""
    out: OrderedDict[str, dict[str, int]] = OrderedDict()
    for s in SCHEMES:
        for r in analyses[s].records:
            out.setdefault(r.block, {x: 0 for x in SCHEMES})[s] += r.total_bytes
    return out


def model_text(name: str, analyses: dict[str, Analysis]) -> str:
    """The per-block table and the summary of ``bnff traffic --model``."""
    a = analyses["unfused"]
    n, c, h, w = a.input_shape
    head = (f"{name}, mini-batch {n}x{c}x{h}x{w}, {a.assumptions.element_bytes}-byte elements, "
            f"on-chip reuse {a.assumptions.onchip_bytes} bytes, footprint policy '{a.assumptions.footprint}', "
            f"convolutions' own traffic {'counted' if a.assumptions.count_layer_io else 'not counted'}")
    blocks = Table(title="Off-chip traffic per block (forward + backward), MiB")
    blocks.add_column("block")
    for s in SCHEMES:
        blocks.add_column(s, justify="right")
    ratios = [s for s in SCHEMES if s != "unfused"]
    for s in ratios:
        blocks.add_column(f"{s} / unfused", justify="right")
    for block, v in per_block(analyses).items():
        u = v["unfused"] or 1
        blocks.add_row(block, *(f"{v[s] / MiB:,.1f}" for s in SCHEMES), *(f"{v[s] / u:.3f}" for s in ratios))
    sm = summary(analyses)
    tot = Table(title="Summary (one training step)")
    for col in ("scheme", "FP traffic", "BP traffic", "total traffic", "vs unfused", "footprint", "vs unfused",
                "GFLOP", "vs unfused"):
        tot.add_column(col, justify="right" if col != "scheme" else "left")
    base = sm["unfused"]
    for s in SCHEMES:
        v = sm[s]
        tot.add_row(s, f"{v['fp_bytes'] / MiB:,.1f} MiB", f"{v['bp_bytes'] / MiB:,.1f} MiB",
                    f"{v['total_bytes'] / MiB:,.1f} MiB", f"{v['total_bytes'] / base['total_bytes'] - 1:+.1%}",
                    f"{v['footprint_bytes'] / MiB:,.1f} MiB",
                    f"{v['footprint_bytes'] / base['footprint_bytes'] - 1:+.1%}",
                    f"{v['flops'] / 1e9:,.1f}", f"{v['flops'] / base['flops'] - 1:+.2%}")
    return head + "\n" + _render(blocks) + _render(tot)


def model_json(name: str, analyses: dict[str, Analysis]) -> dict:
    """``{"model", "batch", "input_shape", "assumptions", "schemes": {scheme: totals}, "layers": [...]}``;
    each layer entry is a ``LayerRecord`` with its ``scheme``."""
    a = analyses["unfused"]
    return {"model": name, "batch": a.input_shape[0], "input_shape": list(a.input_shape),
            "assumptions": asdict(a.assumptions), "schemes": summary(analyses),
            "layers": [{"scheme": s, **r.as_dict()} for s in SCHEMES for r in analyses[s].records]}


def write_csv(path: str | Path, analyses: dict[str, Analysis]) -> None:
    """One row per (scheme, layer) with every ``LayerRecord`` field, atomically."""
    write_csv_rows(path, [{"scheme": s, **r.as_dict()} for s in SCHEMES for r in analyses[s].records])


def write_plot(path: str | Path, name: str, analyses: dict[str, Analysis]) -> None:
    """Bar chart of per-block traffic, the schemes side by side (PNG, SVG or PDF by suffix)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left alone

    blocks = per_block(analyses)
    labels = list(blocks)
    fig = Figure(figsize=(max(8.0, 0.28 * len(labels)), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(SCHEMES)
    for i, s in enumerate(SCHEMES):
        ax.bar([x + (i - (len(SCHEMES) - 1) / 2) * width for x in range(len(labels))], [blocks[b][s] / MiB for b in labels],
               width, label=s)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("off-chip traffic per training step (MiB)")
    n = analyses["unfused"].input_shape[0]
    ax.set_title(f"{name}, batch {n}: traffic per block")
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def reproduce_text(rows: list[dict], batch: int, a: Assumptions) -> str:
    """The reproduction table of ``bnff traffic --reproduce`` under assumptions ``a``."""
    reuse = f"{a.onchip_bytes:,}-byte on-chip reuse" if a.onchip_bytes else "no on-chip reuse"
    io_ = "convolutions' own traffic counted" if a.count_layer_io else "memory-intensive layers only"
    t = Table(title=f"Off-chip traffic of a training step vs unfused: published and bnff's model (batch {batch}, "
                    f"{a.element_bytes}-byte elements, {io_}, {reuse})")
    for col in ("model", "source", "published", "ours: bnff", "ours: fused", "closest", "difference", "paper's setting"):
        t.add_column(col, justify="right" if col in ("published", "ours: bnff", "ours: fused", "difference") else "left")
    for r in rows:
        t.add_row(r["model"], r["source"], f"{r['published']:+.0%}", f"{r['bnff']:+.1%}", f"{r['fused']:+.1%}",
                  r["closest"], f"{r['difference_pp']:+.1f} pp", r["setting"])
    return _render(t)


__all__ = ["model_json", "model_text", "patterns_json", "patterns_text", "per_block", "reproduce_text", "summary",
           "write_csv", "write_json", "write_plot"]
