"""bnff: batch-normalization fission and fusion for faster, leaner CNN training.

``bnff.restructure(model)`` rewrites a network's BatchNorm2d/ReLU/Add layers into fused operators
with identical training semantics; ``bnff.fusion_report(model)`` says what was fused and
``bnff.fusion_plan(model)`` gives the plan it executes. They load on
first use (PEP 562), so that ``bnff --help`` and torch-free modules import without torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["restructure", "fusion_plan", "fusion_report", "FusionReport", "__version__"]


def __getattr__(name: str):
    if name == "restructure":  # the package bnff.restructure, callable as its function restructure()
        return importlib.import_module("bnff.restructure")
    if name in ("fusion_plan", "fusion_report", "FusionReport"):
        return getattr(importlib.import_module("bnff.restructure"), name)
    raise AttributeError(f"module 'bnff' has no attribute {name!r}")
