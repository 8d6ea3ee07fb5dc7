"""Area and power of the accelerator, base and fusion-capable, by component (seed 002 Table 3).

Unit costs are calibrated on the *base* accelerator's column of Table 3 (ST 28 nm, 800 MHz) at the
seed's own configuration, then applied to the units fusion adds (seed 002 sections 3.1, 4.2)
without any per-component correction:

* **PU**: the base PU column divided by its MACs gives the cost of one MAC slot (a 16-bit
  multiplier with 32-bit accumulation, with its share of the Ofreg and the Adders).
* **PostU** (one per two PUs, 4 MACs of 32 bits) and **DivSqrt** (one per column; modelled as an
  iterative divide/square-root unit around one 32-bit multiply-add): a 32-bit MAC costs
  ``MAC32_OVER_MAC16_AREA`` (2.04) times the PU's MAC in area and ``MAC32_OVER_MAC16_ENERGY``
  (2.30) in power, from Horowitz's 45 nm figures (``HOROWITZ_45NM``: a 32-bit FP multiplier plus
  adder against a 16-bit FP multiplier plus 32-bit FP adder); only the ratio is used.
* **PreU** (16 MACs of 16 bits per PU row, with their SrcReg) at the PU's MAC-slot cost, plus a
  second Ifreg per row: section 3.2.1 writes each pre-processed row from Ifreg back to Fbuf_In
  while the next row is computed, so Ifreg is double-buffered (our reading; the seed's Table 3
  doubles Ifreg exactly, 2.4 -> 4.8 mm²).
* **SRAM** (Fbuf_In, Fbuf_Out, Wbuf, Bbuf): per macro, a periphery cost plus a cost per kB,
  least-squares fitted to the base column's three buffers (16 macros of 768 kB, 256 of 64 kB, 32
  of 36 kB); Bbuf is 32 macros of 6 kB.
* Ifreg, Wreg and the control unit scale with PU rows, PU columns and nothing, from the base column.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnff.accel.config import AccelConfig, load

HOROWITZ_45NM = {"fp16_mul": (1640.0, 1.1), "fp32_mul": (7700.0, 3.7), "fp16_add": (1360.0, 0.4),
                 "fp32_add": (4184.0, 0.9)}
"""(area µm², energy pJ per operation) at 45 nm: M. Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014, Figure 1.1.9."""
MAC32_OVER_MAC16_AREA = ((HOROWITZ_45NM["fp32_mul"][0] + HOROWITZ_45NM["fp32_add"][0])
                         / (HOROWITZ_45NM["fp16_mul"][0] + HOROWITZ_45NM["fp32_add"][0]))
MAC32_OVER_MAC16_ENERGY = ((HOROWITZ_45NM["fp32_mul"][1] + HOROWITZ_45NM["fp32_add"][1])
                           / (HOROWITZ_45NM["fp16_mul"][1] + HOROWITZ_45NM["fp32_add"][1]))

TABLE3 = {
    "base": {"PU": (45.4, 41.7), "Ifreg": (2.4, 2.2), "Wreg": (5.4, 3.0), "Fbuf_Out": (58.7, 17.8),
             "Fbuf_In": (29.4, 8.9), "Wbuf": (4.2, 1.3), "Bbuf": (0.0, 0.0), "Inst_Queue": (0.0, 0.0),
             "Ctrl Unit": (0.3, 0.2), "total": (145.6, 75.2)},
    "fused": {"PU": (50.6, 46.4), "Ifreg": (4.8, 4.5), "Wreg": (5.4, 3.0), "Fbuf_Out": (58.7, 17.8),
              "Fbuf_In": (29.4, 8.9), "Wbuf": (4.2, 1.3), "Bbuf": (1.7, 0.7), "Inst_Queue": (0.0, 0.0),
              "Ctrl Unit": (0.3, 0.2), "total": (154.9, 82.9)},
}
"""Seed 002 Table 3: (area mm², power W) per component, base and fusion-capable accelerator."""

COMPONENTS = ("PU", "Ifreg", "Wreg", "Fbuf_Out", "Fbuf_In", "Wbuf", "Bbuf", "Inst_Queue", "Ctrl Unit")


def _macros(cfg: AccelConfig) -> dict[str, tuple[int, float]]:
    """SRAM buffer -> (macros, kB each): one Fbuf_In per PU row, one Fbuf_Out per two PUs, one
    Wbuf and one Bbuf per column (seed 002 section 4.2)."""
    a, b = cfg.array, cfg.buffers
    pairs = a.pu_rows * a.pu_cols // 2
    return {"Fbuf_In": (a.pu_rows, b.fbuf_in_bytes / a.pu_rows / 1024),
            "Fbuf_Out": (pairs, b.fbuf_out_bytes / pairs / 1024),
            "Wbuf": (a.pu_cols, b.wbuf_bytes / a.pu_cols / 1024),
            "Bbuf": (a.pu_cols, b.bbuf_bytes / a.pu_cols / 1024)}


@dataclass(frozen=True)
class UnitCosts:
    """Calibrated unit costs (28 nm, 800 MHz); each a pair (mm², W).

    Attributes:
        mac: one PU MAC slot (16-bit multiply, 32-bit accumulate, with its Ofreg/Adder share).
        sram_kb: SRAM per kB; sram_macro: SRAM periphery per macro.
        ifreg_row, wreg_col: an Ifreg per PU row, a Wreg per PU column.
        ctrl: the control unit and instruction queue.
    """

    mac: tuple[float, float]
    sram_kb: tuple[float, float]
    sram_macro: tuple[float, float]
    ifreg_row: tuple[float, float]
    wreg_col: tuple[float, float]
    ctrl: tuple[float, float]


def _fit(points: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares of total = n * (per_kb * kb + per_macro) over (n, kb, total): (per_kb, per_macro)."""
    # normal equations of y/n = per_kb * kb + per_macro
    xs = [kb for _, kb, _ in points]
    ys = [total / n for n, _, total in points]
    k = len(points)
    mx, my = sum(xs) / k, sum(ys) / k
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def calibrate() -> UnitCosts:
    """Unit costs from Table 3's base column at seed 002's own configuration (module docstring)."""
    seed, base = load(), TABLE3["base"]
    macros = _macros(seed)
    per = []
    for i in (0, 1):
        per.append(_fit([(macros[b][0], macros[b][1], base[b][i]) for b in ("Fbuf_In", "Fbuf_Out", "Wbuf")]))
    a = seed.array
    return UnitCosts(mac=(base["PU"][0] / a.macs, base["PU"][1] / a.macs),
                     sram_kb=(per[0][0], per[1][0]), sram_macro=(per[0][1], per[1][1]),
                     ifreg_row=(base["Ifreg"][0] / a.pu_rows, base["Ifreg"][1] / a.pu_rows),
                     wreg_col=(base["Wreg"][0] / a.pu_cols, base["Wreg"][1] / a.pu_cols),
                     ctrl=(base["Ctrl Unit"][0], base["Ctrl Unit"][1]))


def estimate(cfg: AccelConfig, fused: bool, costs: UnitCosts | None = None) -> dict[str, tuple[float, float]]:
    """(area mm², power W) per component of Table 3 and "total", for the base (``fused=False``) or
    the fusion-capable accelerator described by ``cfg``."""
    c = costs or calibrate()
    a, f = cfg.array, cfg.fusion
    out: dict[str, tuple[float, float]] = {}

    def mac32(n: int) -> tuple[float, float]:
        return n * c.mac[0] * MAC32_OVER_MAC16_AREA, n * c.mac[1] * MAC32_OVER_MAC16_ENERGY

    pu = [a.macs * c.mac[0], a.macs * c.mac[1]]
    ifreg = [a.pu_rows * c.ifreg_row[0], a.pu_rows * c.ifreg_row[1]]
    if fused:
        post = mac32(a.pu_rows * a.pu_cols // 2 * f.postu_macs_per_pu_pair)
        divsqrt = mac32(a.pu_cols * f.divsqrt_per_col)
        preu = a.pu_rows * f.preu_macs_per_row
        for i in (0, 1):
            pu[i] += post[i] + divsqrt[i]
            ifreg[i] += preu * c.mac[i] + a.pu_rows * c.ifreg_row[i]  # PreU MACs and the second Ifreg
    out["PU"], out["Ifreg"] = (pu[0], pu[1]), (ifreg[0], ifreg[1])
    out["Wreg"] = (a.pu_cols * c.wreg_col[0], a.pu_cols * c.wreg_col[1])
    for name, (n, kb) in _macros(cfg).items():
        if name == "Bbuf" and not fused:
            out[name] = (0.0, 0.0)
            continue
        out[name] = tuple(n * (c.sram_kb[i] * kb + c.sram_macro[i]) for i in (0, 1))
    out["Inst_Queue"] = (0.0, 0.0)
    out["Ctrl Unit"] = c.ctrl
    out["total"] = (sum(v[0] for v in out.values()), sum(v[1] for v in out.values()))
    return {k: out[k] for k in (*COMPONENTS, "total")}


__all__ = ["COMPONENTS", "HOROWITZ_45NM", "MAC32_OVER_MAC16_AREA", "MAC32_OVER_MAC16_ENERGY", "TABLE3",
           "UnitCosts", "calibrate", "estimate"]
