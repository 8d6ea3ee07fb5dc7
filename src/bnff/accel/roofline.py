"""GPUs as rooflines, in the same model: what seeds 002 (RTX 2080 Ti) and 000 (V100) measured.

A layer's time in a phase is ``max(FLOPs / peak_flops_per_s, bytes / dram_bytes_per_s)`` from
``bnff.traffic``'s per-layer records (convolutions', linear layers' and pools' own traffic
counted, element size from the machine). A GPU has no PreU/PostU: its memory-bound layers are
passes of their own, so the unfused machine runs the plan's ``unfused`` scheme and a software
fusion (seed 000's, bnff's) the ``bnff`` scheme.

A roofline takes every convolution at the machine's peak where it is compute-bound; real GPU
convolutions reach well below it, which makes our convolutions faster and so every memory-bound
layer's share larger than a profiler measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnff.accel.config import RooflineConfig
from bnff.traffic import Assumptions, compare

MEMORY_KINDS = ("bn", "act", "add")
SEED002_FIG2 = {"fp": {"bn": 0.31, "act": 0.19, "add": 0.10}, "bp": {"bn": 0.46, "act": 0.25, "add": 0.09}}
"""Seed 002 section 1 (Fig. 2): BN, NonL and Add time relative to convolution time on an RTX 2080
Ti (PyTorch profiler), averaged over several CNNs."""
SEED002_RESNET50 = {"fp": 0.85, "bp": 1.11}
"""Seed 002 section 1: BN + NonL + Add time relative to convolution time, ResNet-50, 2080 Ti."""
SEED000_V100 = {"resnet50": 0.205, "inception_v3": 0.185, "densenet121": 0.181}
"""Seed 000 (abstract): V100 compute efficiency gained by its fusion, ResNet-50, Inception-v3, DenseNet."""


@dataclass(frozen=True)
class RoofTime:
    """One layer's time in one phase ("fp" or "bp") under one scheme, seconds; ``bound`` is
    "compute" or "memory"."""

    layer: str
    block: str
    kind: str
    phase: str
    scheme: str
    time_s: float
    bound: str


def layer_times(model: nn.Module, batch: int, machine: RooflineConfig, image_size: int = 224) -> list[RoofTime]:
    """Every layer's FP and BP time under the ``unfused`` and ``bnff`` schemes on ``machine``."""
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(machine.element_bytes)
    if dtype is None:
        raise ValueError(f"{machine.source}: element_bytes = {machine.element_bytes}: expected 2, 4 or 8")
    analyses = compare(model, (batch, 3, image_size, image_size), dtype=dtype, assumptions=Assumptions())
    out = []
    for scheme in ("unfused", "bnff"):
        for r in analyses[scheme].records:
            for phase, flops, nbytes in (("fp", r.flops_fp, r.fp_bytes),
                                         ("bp", r.flops_dgrad + r.flops_wgrad, r.bp_bytes)):
                if not flops and not nbytes:
                    continue
                compute, memory = flops / machine.peak_flops_per_s, nbytes / machine.dram_bytes_per_s
                out.append(RoofTime(r.name, r.block, r.kind, phase, scheme, max(compute, memory),
                                    "compute" if compute >= memory else "memory"))
    return out


def relative_to_conv(times: list[RoofTime]) -> dict[str, dict[str, float]]:
    """Seed 002 Fig. 2's measure, unfused: per phase, BN, activation ("act") and Add time divided
    by convolution time, and their sum ("total")."""
    out = {}
    for phase in ("fp", "bp"):
        rows = [t for t in times if t.scheme == "unfused" and t.phase == phase]
        conv = sum(t.time_s for t in rows if t.kind == "conv")
        shares = {k: sum(t.time_s for t in rows if t.kind == k) / conv for k in MEMORY_KINDS}
        out[phase] = {**shares, "total": sum(shares.values())}
    return out


def fusion_gain(times: list[RoofTime]) -> float:
    """Step time unfused / step time with software fusion (``bnff`` scheme) - 1: the gain in
    compute efficiency (same nominal FLOPs per step) seed 000 reports."""
    total = {s: sum(t.time_s for t in times if t.scheme == s) for s in ("unfused", "bnff")}
    return total["unfused"] / total["bnff"] - 1


__all__ = ["RoofTime", "SEED000_V100", "SEED002_FIG2", "SEED002_RESNET50", "fusion_gain", "layer_times",
           "relative_to_conv"]
