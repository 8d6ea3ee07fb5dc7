"""Pointwise layers scheduled on the buffer and run through the DRAM model: the numbers of ``bnff tile``.

Each layer's matrices sit in DRAM one after another, row-major and channels_last (A = the ifmap
[M, K], B = the weights [K, N], C = the ofmap [M, N]), each starting on a DRAM row. Every tile the
schedule moves becomes the accesses of its rows of elements (one access when the tile spans whole
matrix rows), in the order ``gemm.replay`` moves them, and ``dram.Dram`` prices them.

The baseline of seed 003's comparison (issue 16, fixed before any result): each layer in ``row``
order with the tile sizes that minimise its own DRAM traffic, no fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnff.tiling import dram as dram_mod
from bnff.tiling.gemm import Gemm, Tiles, Traffic, best, replay
from bnff.tiling.layers import PointwiseLayer

ELEMENT_BYTES = 2  # one buffer entry = one 16-bit value (issue 16's fixed assumption)


@dataclass(frozen=True)
class LayerRun:
    """One layer (its GEMM) under one schedule: its tiles, DRAM elements (``Traffic``) and DRAM
    statistics (bytes, row-buffer hits, time in s, energy in pJ)."""

    layer: str
    gemm: Gemm
    order: str
    tiles: Tiles
    traffic: Traffic
    dram: dram_mod.DramStats

    def as_dict(self) -> dict:
        s = self.dram
        return {"layer": self.layer, "m": self.gemm.m, "k": self.gemm.k, "n": self.gemm.n, "order": self.order,
                "tm": self.tiles.tm, "tk": self.tiles.tk,
                "tn": self.tiles.tn, "dram_elements": self.traffic.total, "dram_bytes": s.dram_bytes,
                "reads": s.reads, "writes": s.writes, "activates": s.activates, "row_hit_rate": s.hit_rate,
                "time_s": s.time_s, "energy_pj": s.energy_pj}


def dram_of(g: Gemm, t: Tiles, order: str, entries: int, device: dram_mod.Device = dram_mod.DDR3_1333_X8
            ) -> tuple[Traffic, dram_mod.DramStats]:
    """Replay ``g`` tiled by ``t`` in ``order`` and price its tile moves in DRAM (module docstring)."""
    row = device.row_bytes

    def aligned(n: int) -> int:
        return -(-n // row) * row

    shapes = {"A": (g.m, g.k, t.tm, t.tk), "B": (g.k, g.n, t.tk, t.tn), "C": (g.m, g.n, t.tm, t.tn)}
    base, at = {}, 0
    for name, (rows, cols, _, _) in shapes.items():
        base[name] = at
        at += aligned(rows * cols * ELEMENT_BYTES)
    dram = dram_mod.Dram(device)

    def move(matrix: str, rb: int, cb: int, write: bool) -> None:
        rows, cols, tr, tc = shapes[matrix]
        r0, r1 = rb * tr, min(rows, (rb + 1) * tr)
        c0, c1 = cb * tc, min(cols, (cb + 1) * tc)
        if c0 == 0 and c1 == cols:  # whole matrix rows: one contiguous block
            dram.access(base[matrix] + r0 * cols * ELEMENT_BYTES, (r1 - r0) * cols * ELEMENT_BYTES, write)
            return
        for r in range(r0, r1):
            dram.access(base[matrix] + (r * cols + c0) * ELEMENT_BYTES, (c1 - c0) * ELEMENT_BYTES, write)

    traffic = replay(g, t, order, entries, move)
    return traffic, dram.stats()


def run_layer(layer: PointwiseLayer, order: str, entries: int,
              device: dram_mod.Device = dram_mod.DDR3_1333_X8) -> LayerRun:
    """``layer`` with the tile sizes ``gemm.best`` picks for ``order``, priced in DRAM."""
    tiles, _ = best(layer.gemm, order, entries)
    traffic, stats = dram_of(layer.gemm, tiles, order, entries, device)
    return LayerRun(layer.name, layer.gemm, order, tiles, traffic, stats)


__all__ = ["ELEMENT_BYTES", "LayerRun", "dram_of", "run_layer"]
