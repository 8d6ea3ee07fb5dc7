"""bnff: batch-normalization fission and fusion for faster, leaner CNN training.

``bnff.restructure(model)`` rewrites a network's BatchNorm2d/ReLU/Add layers into fused operators
with identical training semantics; ``bnff.fusion_report(model)`` says what was fused.
"""

from bnff.restructure import FusionReport, fusion_report, restructure

__version__ = "0.1.0"
__all__ = ["restructure", "fusion_report", "FusionReport", "__version__"]
