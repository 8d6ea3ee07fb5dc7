"""The machine a measurement ran on, as speed figures must name it: CPU model, ISA flags, ATen's level.

Speed claims are ratios measured on one machine (docs/design.md section 5); the CPU changes from one
machine to the next (AVX-512 with or without AMX, AVX2 only), so every benchmark result carries
these facts.
"""

from __future__ import annotations

import platform
from pathlib import Path

# the flags that decide which kernels ATen, oneDNN and bnff's own build use
ISA_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni")


def cpu_info() -> dict:
    """``{"model": str, "isa_flags": [str], "aten_capability": str}``: the CPU's model name and
    ISA-relevant flags as ``lscpu`` shows them (read from ``/proc/cpuinfo`` on Linux; elsewhere
    ``platform.processor()`` and no flags), and ATen's dispatch level
    (``torch.backends.cpu.get_cpu_capability()``)."""
    import torch

    model, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(ISA_FLAG_PREFIXES))
            if model and flags:
                break
    return {"model": model, "isa_flags": flags, "aten_capability": torch.backends.cpu.get_cpu_capability()}


def describe(info: dict) -> str:
    """One line: "CPU: <model>; ISA: <flags>; ATen: <level>"."""
    return f"CPU: {info['model']}; ISA: {' '.join(info['isa_flags']) or '(none listed)'}; ATen: {info['aten_capability']}"


__all__ = ["ISA_FLAG_PREFIXES", "cpu_info", "describe"]
