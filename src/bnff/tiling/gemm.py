"""Tiled matrix multiplication against an on-chip buffer: seed 003 chapter 3.

A 1x1 (pointwise) convolution over a channels_last map is the GEMM ``C[M, N] = A[M, K] x B[K, N]``
(M = batch x H x W ofmap pixels, K = input channels, N = output channels; seed 003 section 3.1.1).
It runs tile by tile: ``(Tm, Tk, Tn)`` tiles, the step ``(i, k, j)`` accumulating
``A[i, k] x B[k, j]`` into the partial sums ``C[i, j]``; edge tiles are fragmented (smaller,
section 3.2.4). The buffer holds whole tiles, E entries in all (one entry = one element); a step
needs its three tiles resident, so ``Tm*Tk + Tk*Tn + Tm*Tn <= E`` (section 3.1.3).

``replay`` counts exactly the elements read from and written to DRAM by running the tile sequence
against the buffer: a missing A or B tile is read; a C tile is allocated without a read on its
first step and read back when it returns after an eviction; the least recently used tiles not
needed by the current step are evicted, a C tile written back when evicted (and the rest at the
end). Tile-visiting orders (section 3.2):

* ``row``: C tiles row by row (i outer, j inner), k ascending inside each: output-stationary.
* ``column``: C tiles column by column (j outer, i inner), k ascending.
* ``scan``: serpentine at both levels, so consecutive steps share a tile at every turn (section
  3.2.2): k runs up and down alternately, so the A (or B) tile of the last step of one C tile is
  the first of the next; j runs left and right alternately, so the B tiles at the end of one row
  of C tiles start the next. It is the travelling-salesman view of section 3.2.1: every move to
  the next C tile reuses one operand tile already on chip.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

ORDERS = ("row", "column", "scan")


@dataclass(frozen=True)
class Gemm:
    """``C[M, N] = A[M, K] x B[K, N]``, sizes in elements."""

    m: int
    k: int
    n: int

    def __post_init__(self) -> None:
        if min(self.m, self.k, self.n) < 1:
            raise ValueError(f"GEMM sizes must be >= 1, got M={self.m}, K={self.k}, N={self.n}")


@dataclass(frozen=True)
class Tiles:
    """Tile sizes (elements along M, K, N)."""

    tm: int
    tk: int
    tn: int

    def entries(self) -> int:
        """Buffer entries one step needs: an A, a B and a C tile (seed 003 section 3.1.3)."""
        return self.tm * self.tk + self.tk * self.tn + self.tm * self.tn


@dataclass(frozen=True)
class Traffic:
    """DRAM elements of one schedule: reads of A, B and partial sums of C, writes of C."""

    a_reads: int
    b_reads: int
    c_reads: int
    c_writes: int

    @property
    def reads(self) -> int:
        return self.a_reads + self.b_reads + self.c_reads

    @property
    def total(self) -> int:
        """Reads + writes, elements."""
        return self.reads + self.c_writes


def _count(size: int, t: int) -> int:
    return math.ceil(size / t)


def steps(g: Gemm, t: Tiles, order: str) -> Iterator[tuple[int, int, int]]:
    """The (i, k, j) tile steps of ``order`` (module docstring).

    Raises:
        ValueError: unknown order.
    """
    mt, kt, nt = _count(g.m, t.tm), _count(g.k, t.tk), _count(g.n, t.tn)
    if order == "row":
        outer = ((i, j) for i in range(mt) for j in range(nt))
    elif order == "column":
        outer = ((i, j) for j in range(nt) for i in range(mt))
    elif order == "scan":
        outer = ((i, j if i % 2 == 0 else nt - 1 - j) for i in range(mt) for j in range(nt))
    else:
        raise ValueError(f"unknown tile order {order!r}; choose one of {', '.join(ORDERS)}")
    for c, (i, j) in enumerate(outer):
        ks = range(kt) if order != "scan" or c % 2 == 0 else range(kt - 1, -1, -1)
        for k in ks:
            yield i, k, j


def replay(g: Gemm, t: Tiles, order: str, entries: int, on_move: Callable[[str, int, int, bool], None] | None = None
           ) -> Traffic:
    """DRAM elements of ``g`` tiled by ``t`` in ``order`` with a buffer of ``entries`` entries,
    counted by replaying the tile sequence (module docstring).

    ``on_move(matrix, row_block, col_block, write)`` is called for every tile moved, in order
    ("A", "B" or "C"; C's reads are partial sums coming back).

    Raises:
        ValueError: the three tiles of a step do not fit in ``entries``, or an unknown order.
    """
    if clip(g, t).entries() > entries:
        raise ValueError(f"tiles {t} need {clip(g, t).entries()} entries, more than the buffer's {entries}")

    def size(kind: str, a: int, b: int) -> int:
        dims = {"A": ((g.m, t.tm), (g.k, t.tk)), "B": ((g.k, t.tk), (g.n, t.tn)), "C": ((g.m, t.tm), (g.n, t.tn))}[kind]
        (s0, t0), (s1, t1) = dims
        return min(t0, s0 - a * t0) * min(t1, s1 - b * t1)

    buf: OrderedDict[tuple, int] = OrderedDict()  # resident tile -> its entries, LRU first
    used = 0
    dirty: set[tuple] = set()
    started: set[tuple] = set()
    counts = {"A": 0, "B": 0, "C": 0, "W": 0}
    for i, k, j in steps(g, t, order):
        need = (("A", i, k), ("B", k, j), ("C", i, j))
        for tile in need:
            if tile in buf:
                buf.move_to_end(tile)
                continue
            n = size(*tile)
            while used + n > entries:  # evict the least recently used tile this step does not need
                victim = next(v for v in buf if v not in need)
                used -= buf.pop(victim)
                if victim in dirty:
                    counts["W"] += size(*victim)
                    dirty.discard(victim)
                    if on_move:
                        on_move(*victim, True)
            buf[tile] = n
            used += n
            if tile[0] != "C" or tile in started:  # operands, or a partial sum coming back
                counts[tile[0]] += n
                if on_move:
                    on_move(*tile, False)
        started.add(need[2])
        dirty.add(need[2])
    for tile in buf:  # the finished outputs still on chip
        if tile in dirty:
            counts["W"] += size(*tile)
            if on_move:
                on_move(*tile, True)
    return Traffic(counts["A"], counts["B"], counts["C"], counts["W"])


def clip(g: Gemm, t: Tiles) -> Tiles:
    """``t`` with each size cut to its dimension (a tile larger than the matrix is the matrix)."""
    return Tiles(min(t.tm, g.m), min(t.tk, g.k), min(t.tn, g.n))


def no_reuse(g: Gemm, t: Tiles) -> Traffic:
    """Closed form of ``row`` and ``column`` order when the buffer holds only the three tiles of a
    step and K spans at least two tiles (with one, consecutive C tiles share their A or B tile):
    every C tile reads its whole row panel of A and column panel of B, and is written once.
    A: M*K*ceil(N/Tn), B: K*N*ceil(M/Tm), C: M*N."""
    return Traffic(g.m * g.k * _count(g.n, t.tn), g.k * g.n * _count(g.m, t.tm), 0, g.m * g.n)


def scan_three_tiles(g: Gemm, t: Tiles) -> Traffic:
    """Closed form of ``scan`` order when the buffer holds only the three tiles of a step and the
    tiles divide the matrices: ``no_reuse`` less one A tile at each of the ceil(M/Tm) *
    (ceil(N/Tn) - 1) turns within a row of C tiles and one B tile at each of the ceil(M/Tm) - 1
    turns between rows (seed 003 section 3.2.2)."""
    base, mt, nt = no_reuse(g, t), _count(g.m, t.tm), _count(g.n, t.tn)
    return Traffic(base.a_reads - mt * (nt - 1) * t.tm * t.tk, base.b_reads - (mt - 1) * t.tk * t.tn, 0, base.c_writes)


def estimate(g: Gemm, t: Tiles, entries: int, order: str) -> int:
    """A cheap estimate of ``replay``'s total for ranking candidates in ``best``: an LRU buffer
    under a cyclic access pattern keeps a whole panel or nothing, so along the inner loop of C
    tiles (j in ``row``/``scan``, i in ``column``) the operand panel shared by them (A[i, :] or
    B[:, j]) is read once if it fits with one step's other tiles, else once per C tile; and the
    other operand is read once in all if the whole of it fits besides, else once per panel."""
    mt, nt = _count(g.m, t.tm), _count(g.n, t.tn)
    c = clip(g, t)
    if order == "column":  # B[:, j] shared down a column of C tiles
        shared, shared_n, other, other_n = g.k * c.tn, g.k * g.n, g.m * g.k, mt
        inner, outer = mt, nt
    else:
        shared, shared_n, other, other_n = c.tm * g.k, g.m * g.k, g.k * g.n, nt
        inner, outer = nt, mt
    step_rest = c.tk * (c.tn if order != "column" else c.tm) + c.tm * c.tn
    keeps_panel = shared + step_rest <= entries
    first = shared_n if keeps_panel else shared_n * inner
    second = other if other + (shared if keeps_panel else 0) + c.tm * c.tn <= entries else other * outer
    return first + second + g.m * g.n


BURST_ELEMENTS = 32
"""A 64-byte DRAM burst of 16-bit elements: tile widths along a matrix's contiguous dimension (Tk
of A, Tn of B and C) are whole bursts or the whole row, so no tile moves a fraction of a burst."""


def _candidates(size: int, least: int = 1) -> list[int]:
    out = {size}
    p = least
    while p < size:
        out.add(p)
        p *= 2
    return sorted(out)


def best(g: Gemm, order: str, entries: int, keep: int = 6) -> tuple[Tiles, Traffic]:
    """The tile sizes minimising ``replay``'s DRAM elements for ``order`` under the capacity
    constraint (seed 003 sections 3.1.3, 3.2.5): candidates are powers of two and each full
    dimension, Tk and Tn at least a burst (``BURST_ELEMENTS``); they are ranked by ``estimate`` (cheap) and the best ``keep`` replayed, with ties
    going to the fewest steps.

    Raises:
        ValueError: no tiling fits (``entries`` < 3).
    """
    fits = [Tiles(a, b, c) for a in _candidates(g.m) for b in _candidates(g.k, BURST_ELEMENTS)
            for c in _candidates(g.n, BURST_ELEMENTS) if Tiles(a, b, c).entries() <= entries]
    if not fits:
        raise ValueError(f"a buffer of {entries} entries holds no tiling of {g}")
    fits.sort(key=lambda t: (estimate(g, t, entries, order), -t.entries()))
    results = [(replay(g, t, order, entries), t) for t in fits[:keep]]
    traffic, tiles = min(results, key=lambda r: (r[0].total, _count(g.m, r[1].tm) * _count(g.k, r[1].tk) * _count(g.n, r[1].tn)))
    return tiles, traffic


__all__ = ["BURST_ELEMENTS", "Gemm", "ORDERS", "Tiles", "Traffic", "best", "clip", "estimate", "no_reuse", "replay", "scan_three_tiles", "steps"]
