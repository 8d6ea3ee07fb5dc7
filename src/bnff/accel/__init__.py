"""``bnff.accel``: seed 002's training accelerator, modelled layer by layer (``bnff simulate``).

Data flow: model -> ``bnff.graph.layers.build`` (shapes at the mini-batch) -> ``bnff.plan``
(the ``unfused`` and ``fused`` schedules) -> ``bnff.accel.perf`` (each layer's time per phase on
the machine of ``bnff.accel.config``) -> ``Simulation`` (per-block and whole-step sums).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from bnff.accel import area
from bnff.accel.config import AccelConfig, ConfigError, load
from bnff.accel.perf import SCHEMES, LayerTime, layer_times
from bnff.graph.layers import build
from bnff.plan import plan_graph

_RESNET_BLOCK = re.compile(r"^layer(\d+)\.(\d+)$")


def block_names(blocks: list[str]) -> dict[str, str]:
    """Report names of the layers' blocks (``Layer.block``, in graph order with repeats): seed 002's
    ``conv2_x blk0`` for ResNet's ``layer1.0`` (Figs. 8-9), ``stem`` / ``head`` for the one-layer
    blocks before / after the first block of several layers, others as ``bnff traffic`` names them."""
    sizes: dict[str, int] = {}
    for b in blocks:
        sizes[b] = sizes.get(b, 0) + 1
    names, seen_block = {}, False
    for b in sizes:
        m = _RESNET_BLOCK.match(b)
        if m:
            names[b] = f"conv{int(m.group(1)) + 1}_x blk{m.group(2)}"
        elif sizes[b] == 1:
            names[b] = "head" if seen_block else "stem"
        else:
            names[b] = b
        seen_block = seen_block or sizes[b] > 1
    return names


@dataclass
class Simulation:
    """``simulate``'s result.

    Attributes:
        model: the model's name.
        batch: mini-batch size.
        config: the hardware description used.
        layers: every layer's ``LayerTime`` per phase, unfused then fused.
        block_of: ``Layer.block`` -> the block's report name (``block_names``).
    """

    model: str
    batch: int
    config: AccelConfig
    layers: list[LayerTime] = field(default_factory=list)
    block_of: dict[str, str] = field(default_factory=dict)

    def phase_s(self, scheme: str, bp: bool) -> float:
        """Total FP (``bp=False``) or BP time of ``scheme``, seconds."""
        return sum(t.time_s for t in self.layers if t.scheme == scheme and (t.phase != "fp") == bp)

    def improvement(self, bp: bool) -> float:
        """Unfused time / fused time - 1 of FP or BP (seed 002 Table 4: 0.485 for +48.5%)."""
        return self.phase_s("unfused", bp) / self.phase_s("fused", bp) - 1

    def blocks(self) -> list[dict]:
        """Per block, in network order: ``{"block", "fp_unfused_s", "fp_fused_s", "bp_unfused_s",
        "bp_fused_s"}`` (seed 002 Figs. 8-9)."""
        rows: dict[str, dict] = {}
        for t in self.layers:
            name = self.block_of[t.block]
            row = rows.setdefault(name, {"block": name, "fp_unfused_s": 0.0, "fp_fused_s": 0.0,
                                         "bp_unfused_s": 0.0, "bp_fused_s": 0.0})
            row[f"{'fp' if t.phase == 'fp' else 'bp'}_{t.scheme}_s"] += t.time_s
        return list(rows.values())

    def stalls(self) -> list[dict]:
        """Fig. 10's form: every fused convolution phase with hosted work, its time beyond the
        convolution alone split into pre-processing, post-processing and memory stalls (shares of
        the layer's time)."""
        out = []
        for t in self.layers:
            if t.scheme == "fused" and t.compute_s > 0 and t.fused_steps:
                out.append({"layer": t.layer, "block": self.block_of[t.block], "phase": t.phase, "time_s": t.time_s,
                            "pre_share": t.pre_stall_s / t.time_s, "post_share": t.post_stall_s / t.time_s,
                            "memory_share": t.memory_stall_s / t.time_s})
        return out

    def summary(self) -> dict:
        """``{"fp_unfused_s", "fp_fused_s", "bp_unfused_s", "bp_fused_s", "fp_improvement",
        "bp_improvement"}``."""
        return {"fp_unfused_s": self.phase_s("unfused", False), "fp_fused_s": self.phase_s("fused", False),
                "bp_unfused_s": self.phase_s("unfused", True), "bp_fused_s": self.phase_s("fused", True),
                "fp_improvement": self.improvement(False), "bp_improvement": self.improvement(True)}


def simulate(model: nn.Module, batch: int = 32, config: AccelConfig | None = None, image_size: int = 224,
             name: str | None = None) -> Simulation:
    """One training step of ``model`` on the accelerator, unfused and fused, layer by layer.

    Args:
        model: the network (copied to the meta device; nothing is computed).
        batch: mini-batch size (seed 002 section 4.3: 32).
        config: the hardware description (default: ``load()``, seed 002's machine).
        image_size: input height and width, pixels.
        name: the model's name for reports (default: its class name).
    Returns:
        ``Simulation``.
    Raises:
        ValueError: a batch or image size the model cannot run.
    """
    cfg = config or load()
    lg = build(model, (batch, 3, image_size, image_size))
    plan, _, _ = plan_graph(lg.gm)
    times = [t for s in SCHEMES for t in layer_times(lg, plan, cfg, s)]
    return Simulation(name or type(model).__name__, batch, cfg, times, block_names([x.block for x in lg.layers]))


def sweep(model: nn.Module, key: str, values: list[float], batch: int = 32, config: AccelConfig | None = None,
          image_size: int = 224, name: str | None = None) -> list[dict]:
    """``simulate`` at each value of one configuration key ("dram.feature_bytes_per_s",
    "array.pu_rows", ...) or of ``"batch"``: one row per point, ``{key, "fp_improvement",
    "bp_improvement", "fp_unfused_s", "fp_fused_s", "bp_unfused_s", "bp_fused_s", "area_mm2",
    "power_w"}`` (area and power of the fusion-capable machine, ``bnff.accel.area``).

    Raises:
        ConfigError: an unknown key or a value out of range for its unit.
    """
    cfg = config or load()
    costs = area.calibrate()
    rows = []
    for v in values:
        if key == "batch":
            if v != int(v) or v < 1:
                raise ConfigError(f"batch = {v!r}: expected a mini-batch size (integer > 0)")
            point = cfg
            sim = simulate(model, int(v), point, image_size, name)
        else:
            point = cfg.with_value(key, v)
            sim = simulate(model, batch, point, image_size, name)
        mm2, watts = area.estimate(point, fused=True, costs=costs)["total"]
        rows.append({key: v, **sim.summary(), "area_mm2": mm2, "power_w": watts})
    return rows


__all__ = ["AccelConfig", "ConfigError", "LayerTime", "Simulation", "block_names", "load", "simulate", "sweep"]
