"""Seed 002's five connection patterns as tiny networks, and its Tables 1-2 computed from them.

Each pattern is a real ``nn.Module`` analysed by ``bnff.traffic.analyze`` like any network, under
``SEED002`` assumptions (memory-intensive layers only, nothing reused on chip, every ofmap kept).
Every feature map has the same shape, so dividing by the bytes of one (C1's ofmap, the
memory-intensive layer's mini-batch input) gives seed 002's units. In patterns (4) the result
also leaves the pattern as the next block's shortcut: its gradient comes back from there
(Scut_oerr in seed 002 eq. 20), which is what makes those patterns' backward cost what the
seed says.

    (1)   C1 -> ReLU -> C2
    (2)   C1 -> BN -> C2
    (3)   C1 -> BN -> ReLU -> C2
    (4)-1 C1 -> BN -> Add(x) -> ReLU -> C2           (identity shortcut x)
    (4)-2 C1 -> BN -> Add(C3 -> BN3) -> ReLU -> C2   (projection shortcut)
"""

from __future__ import annotations

import torch
from torch import nn

from bnff.traffic.analysis import compare
from bnff.traffic.assumptions import SEED002, Assumptions

PATTERNS = ("(1)", "(2)", "(3)", "(4)-1", "(4)-2")
FIELDS = ("fp_unfused", "fp_fused", "bp_unfused", "bp_fused", "footprint_unfused", "footprint_fused")
BNFF_FIELDS = ("fp_bnff", "bp_bnff", "footprint_bnff")

PUBLISHED = {
    "(1)": {"fp_unfused": 2, "fp_fused": 0, "bp_unfused": 3, "bp_fused": 0, "footprint_unfused": 1, "footprint_fused": 0},
    "(2)": {"fp_unfused": 3, "fp_fused": 0, "bp_unfused": 5, "bp_fused": 1, "footprint_unfused": 1, "footprint_fused": 0},
    "(3)": {"fp_unfused": 5, "fp_fused": 0, "bp_unfused": 8, "bp_fused": 1, "footprint_unfused": 2, "footprint_fused": 0},
    "(4)-1": {"fp_unfused": 8, "fp_fused": 2, "bp_unfused": 11, "bp_fused": 3, "footprint_unfused": 3, "footprint_fused": 1},
    "(4)-2": {"fp_unfused": 11, "fp_fused": 2, "bp_unfused": 16, "bp_fused": 5, "footprint_unfused": 4, "footprint_fused": 1},
}
"""Seed 002 Table 1 (off-chip traffic of the memory-intensive layers, FP and BP) and Table 2
(off-chip memory they occupy), in units of one such layer's mini-batch input."""


def _conv(c: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, bias=False)


class Pattern(nn.Module):
    """One of seed 002's connections (module docstring) on (N, C, H, W) maps of one shape.

    Args:
        name: "(1)", "(2)", "(3)", "(4)-1" or "(4)-2".
        channels: C of every feature map.
    Raises:
        ValueError: unknown pattern name.
    """

    def __init__(self, name: str, channels: int = 8) -> None:
        super().__init__()
        if name not in PATTERNS:
            raise ValueError(f"unknown pattern {name!r}; choose one of {', '.join(PATTERNS)}")
        self.name = name
        self.c1, self.c2 = _conv(channels), _conv(channels)
        self.bn = nn.BatchNorm2d(channels) if name != "(1)" else None
        if name == "(4)-2":
            self.c3, self.bn3 = _conv(channels), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor):
        y = self.c1(x)
        if self.name == "(1)":
            return self.c2(torch.relu(y))
        y = self.bn(y)
        if self.name == "(2)":
            return self.c2(y)
        if self.name == "(3)":
            return self.c2(torch.relu(y))
        shortcut = x if self.name == "(4)-1" else self.bn3(self.c3(x))
        z = torch.relu(y + shortcut)
        return self.c2(z), z  # z is also the next block's shortcut


def table(assumptions: Assumptions = SEED002, shape: tuple[int, int, int, int] = (2, 8, 8, 8)) -> dict[str, dict[str, float]]:
    """Seed 002 Tables 1-2 computed by the traffic model on the ``Pattern`` networks.

    Args:
        assumptions: the accounting (default ``SEED002``, the seed's own).
        shape: (N, C, H, W) of every feature map.
    Returns:
        ``{pattern: {"fp_unfused", "fp_fused", "bp_unfused", "bp_fused", "footprint_unfused",
        "footprint_fused", "fp_bnff", "bp_bnff", "footprint_bnff"}}`` for the memory-intensive layers
        (BN, ReLU, Add), in units of one feature map's bytes; the ``bnff`` scheme's values are ours
        (not in the paper).
    """
    out: dict[str, dict[str, float]] = {}
    for name in PATTERNS:
        analyses = compare(Pattern(name, shape[1]), shape, dtype=None, assumptions=assumptions)
        unit = shape[0] * shape[1] * shape[2] * shape[3] * assumptions.element_bytes
        row = {}
        for scheme in ("unfused", "fused", "bnff"):
            mi = analyses[scheme].memory_intensive()
            row[f"fp_{scheme}"] = mi["fp_bytes"] / unit
            row[f"bp_{scheme}"] = mi["bp_bytes"] / unit
            row[f"footprint_{scheme}"] = mi["footprint_bytes"] / unit
        out[name] = {f: row[f] for f in FIELDS + BNFF_FIELDS}
    return out


__all__ = ["BNFF_FIELDS", "FIELDS", "PATTERNS", "PUBLISHED", "Pattern", "table"]
