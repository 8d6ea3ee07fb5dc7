"""Schedules of a model's ops on the buffer, run through the DRAM model: the numbers of ``bnff tile``.

Every tensor sits in DRAM row-major and channels_last, each starting on a DRAM row; every piece a
schedule moves becomes DRAM accesses in the order it moves them, priced by ``dram.Dram``.

* A pointwise op (1x1) runs as a tiled GEMM (``gemm.best`` tiles for the order, ``gemm.replay``
  moves): A = the ifmap [H*W, C_in], B = the weights [C_in, C_out], C = the ofmap.
* A depthwise op streams its input rows once (a line buffer of Kh rows) and writes its output
  rows once; its weights are read once.
* An add reads its two inputs and writes its result, row by row.
* A residual add fused into the 1x1 that produces one of its inputs (the optimised schedule, when
  that output feeds only the add and neither is in a fused chain): the GEMM's epilogue reads the
  shortcut's tile as each C tile is written and writes the sum, so the add moves no data of its
  own. This is bnff's residual Add done inside a convolution (seed 002 section 2.3); it was added
  after the first reproduction, which left ResNet-50's adds as separate passes (docs/tile.md).
* A fused chain (thesis section 4; ``layers.chains``) runs band by band: for R rows of its final
  output it reads the input rows they need (the halo of every depthwise stage included, so rows
  on a band boundary are read again), keeps every intermediate band on chip, reads the residual
  rows when the chain ends with an add, and writes the R output rows. Its weights stay on chip
  when they fit beside the bands, else they are read again for every band. R is the band height
  with the fewest DRAM elements whose bands fit in the buffer; a chain whose one-row band does
  not fit runs unfused.

The baseline of the thesis' comparison (issue 16, fixed before any result): every op on its own,
pointwise ops in ``row`` order with the tile sizes that minimise their own DRAM traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnff.tiling import dram as dram_mod
from bnff.tiling.gemm import best, replay
from bnff.tiling.layers import Op, OpList, chains

ELEMENT_BYTES = 2  # one buffer entry = one 16-bit value (issue 16's fixed assumption)


@dataclass(frozen=True)
class Run:
    """One op, or one fused chain, under one schedule.

    Attributes:
        name: the op's name, or the chain's ops joined by "+".
        kind: "pointwise", "depthwise", "add" or "fused".
        detail: the tiles (pointwise), or the band height and whether weights stay (fused).
        dram_elements: elements moved (reads + writes).
        dram: the DRAM statistics (bursts, row-buffer hits, time in s, energy in pJ).
    """

    name: str
    kind: str
    detail: str
    dram_elements: int
    dram: dram_mod.DramStats

    def as_dict(self) -> dict:
        s = self.dram
        return {"name": self.name, "kind": self.kind, "detail": self.detail, "dram_elements": self.dram_elements,
                "dram_bytes": s.dram_bytes, "reads": s.reads, "writes": s.writes, "activates": s.activates,
                "row_hit_rate": s.hit_rate, "time_s": s.time_s, "energy_pj": s.energy_pj}


class _Memory:
    """Addresses: each tensor (by name) gets its own region, starting on a DRAM row."""

    def __init__(self, device: dram_mod.Device) -> None:
        self.row, self.at, self.base = device.row_bytes, 0, {}
        self.dram = dram_mod.Dram(device)

    def region(self, name: str, elements: int) -> int:
        if name not in self.base:
            self.base[name] = self.at
            self.at += -(-elements * ELEMENT_BYTES // self.row) * self.row
        return self.base[name]

    def rows(self, name: str, elements: int, first_row: int, n_rows: int, row_elements: int, write: bool) -> int:
        """Access ``n_rows`` whole rows of ``row_elements`` from row ``first_row``; returns elements."""
        base = self.region(name, elements)
        self.dram.access(base + first_row * row_elements * ELEMENT_BYTES, n_rows * row_elements * ELEMENT_BYTES, write)
        return n_rows * row_elements


def pointwise(op: Op, order: str, entries: int, device: dram_mod.Device = dram_mod.DDR3_1333_X8,
              add: Op | None = None) -> Run:
    """A pointwise op as a tiled GEMM with ``gemm.best``'s tiles for ``order``; with ``add``, the
    residual add that takes its output done in its epilogue (module docstring): the shortcut's
    tile is read every time a C tile is written (also for a partial sum written back early, so
    the count never flatters the fusion)."""
    g = op.gemm
    tiles, _ = best(g, order, entries)
    mem = _Memory(device)
    shapes = {"A": (g.m, g.k, tiles.tm, tiles.tk), "B": (g.k, g.n, tiles.tk, tiles.tn), "C": (g.m, g.n, tiles.tm, tiles.tn)}
    if add is not None:
        shapes["R"] = shapes["C"]
    for name, (r, c, _, _) in shapes.items():
        mem.region(name, r * c)
    shortcut = [0]

    def tile(matrix: str, rb: int, cb: int, write: bool) -> int:
        rows, cols, tr, tc = shapes[matrix]
        r0, r1 = rb * tr, min(rows, (rb + 1) * tr)
        c0, c1 = cb * tc, min(cols, (cb + 1) * tc)
        base = mem.base[matrix]
        if c0 == 0 and c1 == cols:  # whole matrix rows: one contiguous block
            mem.dram.access(base + r0 * cols * ELEMENT_BYTES, (r1 - r0) * cols * ELEMENT_BYTES, write)
        else:
            for r in range(r0, r1):
                mem.dram.access(base + (r * cols + c0) * ELEMENT_BYTES, (c1 - c0) * ELEMENT_BYTES, write)
        return (r1 - r0) * (c1 - c0)

    def move(matrix: str, rb: int, cb: int, write: bool) -> None:
        if add is not None and matrix == "C" and write:
            shortcut[0] += tile("R", rb, cb, False)
        tile(matrix, rb, cb, write)

    traffic = replay(g, tiles, order, entries, move)
    detail = f"{order} {tiles.tm}x{tiles.tk}x{tiles.tn}"
    if add is None:
        return Run(op.name, "pointwise", detail, traffic.total, mem.dram.stats())
    return Run(f"{op.name}+{add.name}", "fused", detail + ", add in epilogue", traffic.total + shortcut[0],
               mem.dram.stats())


def epilogue_adds(ol: OpList, taken: set[str]) -> dict[str, Op]:
    """Pointwise op name -> the residual add fused into its epilogue: adds outside ``taken`` (the
    fused chains' ops) with an input made by such a pointwise op that feeds only the add (the
    first such input)."""
    by_name = {o.name: o for o in ol.ops}
    out = {}
    for a in ol.ops:
        if a.kind != "add" or a.name in taken:
            continue
        for s in a.sources:
            p = by_name.get(s)
            if p is not None and p.kind == "pointwise" and p.name not in taken and ol.users.get(s, 0) == 1:
                out[p.name] = a
                break
    return out


def _stream(op: Op, device: dram_mod.Device) -> Run:
    """A depthwise op or an add on its own: inputs read and output written once, row by row."""
    mem = _Memory(device)
    moved = 0
    if op.kind == "depthwise":
        moved += mem.rows("w", op.weight_elements, 0, 1, op.weight_elements, False)
    ins = ["x"] if op.kind == "depthwise" else ["x", "r"]
    done_in = 0
    for row in range(op.h_out):
        need = min(op.h_in, (row * op.sh + op.kh) if op.kind == "depthwise" else row + 1)
        for name in ins:  # the input rows this output row needs beyond those already read
            if need > done_in:
                moved += mem.rows(name, op.in_elements, done_in, need - done_in, op.w_in * op.in_channels, False)
        done_in = max(done_in, need)
        moved += mem.rows("y", op.out_elements, row, 1, op.w_out * op.channels, True)
    return Run(op.name, op.kind, "", moved, mem.dram.stats())


def _band_rows(chain: list[Op], rows_out: int) -> list[int]:
    """Rows of each conv op's input needed for ``rows_out`` rows of the chain's last conv output."""
    convs = [o for o in chain if o.kind != "add"]
    need, out = rows_out, []
    for o in reversed(convs):
        need = (need - 1) * o.sh + o.kh if o.kind == "depthwise" else need
        out.append(need)
    return list(reversed(out))


def fused_plan(chain: list[Op], entries: int) -> tuple[int, bool, int] | None:
    """(band rows R, weights stay on chip, DRAM elements) with the fewest elements, or None when a
    one-row band does not fit (module docstring)."""
    convs = [o for o in chain if o.kind != "add"]
    last, first = convs[-1], convs[0]
    weights = sum(o.weight_elements for o in convs)
    residual = chain[-1].out_elements if chain[-1].kind == "add" else 0
    best_plan = None
    for r in range(1, last.h_out + 1):
        rows_in = _band_rows(chain, r)
        # on chip: every intermediate band (the outputs of all but the last conv), one input row
        # and one output row in flight
        inter = sum(min(rows_in[i + 1], o.h_out) * o.w_out * o.channels for i, o in enumerate(convs[:-1]))
        space = inter + first.w_in * first.in_channels + last.w_out * last.channels
        if space > entries:
            break
        stay = space + weights <= entries
        bands = math.ceil(last.h_out / r)
        reads = sum(min(rows_in[0], first.h_in) for _ in range(bands)) * first.w_in * first.in_channels
        moved = reads + last.out_elements + residual + weights * (1 if stay else bands)
        if best_plan is None or moved < best_plan[2]:
            best_plan = (r, stay, moved)
    return best_plan


def fused(chain: list[Op], entries: int, device: dram_mod.Device = dram_mod.DDR3_1333_X8) -> Run | None:
    """A chain run band by band (module docstring), or None when it does not fit."""
    plan = fused_plan(chain, entries)
    if plan is None:
        return None
    r, stay, _ = plan
    convs = [o for o in chain if o.kind != "add"]
    first, last = convs[0], convs[-1]
    add = chain[-1] if chain[-1].kind == "add" else None
    weights = sum(o.weight_elements for o in convs)
    mem = _Memory(device)
    moved = 0
    rows_per_in = _band_rows(chain, r)[0]
    for b in range(math.ceil(last.h_out / r)):
        out0, out1 = b * r, min(last.h_out, (b + 1) * r)
        if b == 0 or not stay:
            moved += mem.rows("w", weights, 0, 1, weights, False)
        in0 = out0
        for o in reversed(convs):  # map the band's first output row back to the chain input
            in0 = in0 * o.sh - (o.kh // 2 if o.kind == "depthwise" else 0)
        in0 = max(0, in0)
        n_in = min(first.h_in - in0, rows_per_in)
        moved += mem.rows("x", first.in_elements, in0, n_in, first.w_in * first.in_channels, False)
        if add is not None:
            moved += mem.rows("r", add.out_elements, out0, out1 - out0, last.w_out * last.channels, False)
        moved += mem.rows("y", last.out_elements, out0, out1 - out0, last.w_out * last.channels, True)
    detail = f"band {r} rows, weights {'on chip' if stay else 'per band'}"
    return Run("+".join(o.name for o in chain), "fused", detail, moved, mem.dram.stats())


def baseline(ol: OpList, entries: int, device: dram_mod.Device = dram_mod.DDR3_1333_X8) -> list[Run]:
    """Every op on its own; pointwise ops in ``row`` order with their best tiles."""
    return [pointwise(o, "row", entries, device) if o.kind == "pointwise" else _stream(o, device) for o in ol.ops]


def optimized(ol: OpList, entries: int, order: str = "scan", fusion: bool = True,
              device: dram_mod.Device = dram_mod.DDR3_1333_X8) -> list[Run]:
    """The chains fused (when ``fusion`` and they fit), residual adds outside them fused into the
    epilogue of the 1x1 that produces one of their inputs (when ``fusion``), every other op on its
    own, pointwise ops in ``order`` with their best tiles. A fusion that would cost more DRAM
    energy than its ops one by one is not made."""
    runs: list[Run] = []
    in_chain: dict[str, list[Op]] = {}
    for ch in chains(ol) if fusion else []:
        for o in ch:
            in_chain[o.name] = ch
    epilogue = epilogue_adds(ol, set(in_chain)) if fusion else {}
    def alone(o: Op) -> Run:
        return pointwise(o, order, entries, device) if o.kind == "pointwise" else _stream(o, device)

    done: set[str] = set()

    def where_it_pays(group: list[Op], run: Run) -> list[Run]:
        """``run`` (the group fused) or the group's ops one by one, whichever costs less DRAM energy:
        a chain whose weights are read again for every band can move more than its ops alone."""
        done.update(x.name for x in group)
        parts = [alone(x) for x in group]
        return [run] if run.dram.energy_pj <= sum(p.dram.energy_pj for p in parts) else parts

    for o in ol.ops:
        if o.name in done:
            continue
        if o.name in epilogue:
            add = epilogue[o.name]
            runs += where_it_pays([o, add], pointwise(o, order, entries, device, add=add))
            continue
        ch = in_chain.get(o.name)
        run = fused(ch, entries, device) if ch is not None else None
        runs += [alone(o)] if run is None else where_it_pays(ch, run)
    return runs


__all__ = ["ELEMENT_BYTES", "Run", "baseline", "epilogue_adds", "fused", "fused_plan", "optimized", "pointwise"]
