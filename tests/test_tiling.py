"""Seed 003's tiling model and the DRAM model (issue 16, first part): replayed counts against closed
forms worked by hand, the DRAM model's row-buffer behaviour, and ``bnff tile``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnff.cli import main
from bnff.tiling import dram
from bnff.tiling.gemm import ORDERS, Gemm, Tiles, best, no_reuse, replay, scan_three_tiles, steps


def test_every_order_visits_every_step_once():
    g, t = Gemm(50, 30, 70), Tiles(16, 8, 32)  # fragmented edges on all three dimensions
    expected = {(i, k, j) for i in range(4) for k in range(4) for j in range(3)}
    for order in ORDERS:
        seq = list(steps(g, t, order))
        assert len(seq) == len(expected) and set(seq) == expected, order


def test_scan_shares_a_tile_at_every_turn():
    seq = list(steps(Gemm(64, 64, 64), Tiles(16, 16, 16), "scan"))
    for (i0, k0, j0), (i1, k1, j1) in zip(seq, seq[1:]):
        assert (i0, k0) == (i1, k1) or (k0, j0) == (k1, j1) or (i0, j0) == (i1, j1)


def test_a_small_case_by_hand():
    """M=K=N=4 in 2x2x2 tiles, a buffer of exactly three tiles (12 entries). Row order: each of the
    4 C tiles reads its 2 A and 2 B tiles (4 elements each): A 32, B 32; C written once: 16. Scan:
    3 turns inside the two rows of C tiles reuse an A tile (-4 each... 2 per row) and 1 turn between
    rows reuses a B tile: A 32 - 2*1*4 = 24, B 32 - 1*4 = 28."""
    g, t = Gemm(4, 4, 4), Tiles(2, 2, 2)
    assert replay(g, t, "row", 12) == no_reuse(g, t)
    r = replay(g, t, "row", 12)
    assert (r.a_reads, r.b_reads, r.c_reads, r.c_writes) == (32, 32, 0, 16)
    s = replay(g, t, "scan", 12)
    assert (s.a_reads, s.b_reads, s.c_reads, s.c_writes) == (24, 28, 0, 16)


@settings(max_examples=60, deadline=None)
@given(mt=st.integers(1, 5), kt=st.integers(1, 5), nt=st.integers(1, 5), tm=st.integers(1, 6),
       tk=st.integers(1, 6), tn=st.integers(1, 6))
def test_replay_equals_the_closed_forms_when_tiles_divide(mt, kt, nt, tm, tk, tn):
    g, t = Gemm(mt * tm, kt * tk, nt * tn), Tiles(tm, tk, tn)
    entries = t.entries()  # exactly the three tiles of a step
    if kt >= 2:  # with a single k step, consecutive C tiles share their A (row) or B (column) tile
        assert replay(g, t, "row", entries) == no_reuse(g, t)
        assert replay(g, t, "column", entries) == no_reuse(g, t)
    assert replay(g, t, "scan", entries) == scan_three_tiles(g, t)


def test_partial_sums_evicted_come_back_and_a_big_buffer_reads_everything_once():
    g, t = Gemm(8, 8, 8), Tiles(4, 4, 4)
    # k outermost is not one of our orders; but with row order and room for one step only, a C
    # tile is finished before it leaves: no partial-sum reads
    assert replay(g, t, "row", t.entries()).c_reads == 0
    whole = replay(g, Tiles(8, 8, 8), "row", 3 * 64)
    assert (whole.a_reads, whole.b_reads, whole.c_writes) == (64, 64, 64)
    big = replay(g, t, "row", 10_000)  # everything fits: each element moves once
    assert (big.a_reads, big.b_reads, big.c_reads, big.c_writes) == (64, 64, 0, 64)


def test_best_respects_the_capacity_and_beats_a_fixed_tiling():
    g = Gemm(3136, 256, 64)
    tiles, traffic = best(g, "row", 65536)
    assert tiles.entries() <= 65536
    assert traffic.total <= replay(g, Tiles(64, 64, 64), "row", 65536).total
    assert traffic.total >= g.m * g.k + g.k * g.n + g.m * g.n  # never below reading and writing once
    with pytest.raises(ValueError, match="holds no tiling"):
        best(g, "row", 2)
    with pytest.raises(ValueError, match="more than the buffer"):
        replay(g, Tiles(512, 256, 64), "row", 65536)


def test_dram_a_sequential_stream_opens_each_row_once():
    d = dram.DDR3_1333_X8
    stats = dram.run([(0, 64 * d.row_bytes, False)])
    assert stats.activates == 64 and stats.reads == 64 * d.row_bytes // 64
    assert stats.hit_rate == pytest.approx(1 - 64 / stats.reads)


def test_dram_a_stride_of_one_bank_row_activates_on_every_access():
    d = dram.DDR3_1333_X8
    stride = d.row_bytes * d.banks  # the next row of the same bank
    stats = dram.run([(i * stride, 64, False) for i in range(100)])
    assert stats.activates == 100 and stats.row_hits == 0 and stats.precharges == 100


def test_dram_energy_grows_linearly_with_repeated_traces():
    d = dram.DDR3_1333_X8
    trace = [(i * 4096 + 64 * (i % 3), 512, i % 2 == 0) for i in range(2000)]
    e1, e3 = dram.run(trace).energy_pj, dram.run(trace * 3).energy_pj
    assert e3 == pytest.approx(3 * e1, rel=0.02)
    # per burst: (IDD4R - IDD3N) x VDD x BL/2 cycles x tCK x 8 chips (Micron's method), by hand
    one = dram.run([(0, 64, False)])
    assert one.energy_parts_pj["read"] == pytest.approx((255 - 90) * 1.5 * 4 * 1.5 * 8)
    assert d.burst_bytes == 64 and d.row_bytes == 8192


def test_tile_cli_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["tile", "--model", "mobilenet_v2", "--buffer-entries", "65536", "--json", str(out),
                 "--csv", str(tmp_path / "t.csv")]) == 0
    printed = capsys.readouterr().out
    assert "features.18.0" in printed and "DDR3_micron_32M_8B_x8_sg15" in printed
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s) >= {"baseline_energy_pj", "optimized_energy_pj", "energy_reduction", "baseline_dram_bytes",
                      "optimized_dram_bytes"}
    assert s["energy_reduction"] == pytest.approx(1 - s["optimized_energy_pj"] / s["baseline_energy_pj"])
    assert s["optimized_energy_pj"] <= s["baseline_energy_pj"] * 1.001
    assert len(data["layers"]) == 2 * 35 - 2  # 34 pointwise layers, baseline and optimized
