"""Fused operators of restructured batch normalization.

``feature_statistics`` and ``bn_statistics`` (step 1, forward statistics, shared across BNs by
ICF) and ``bn_apply`` (step 2, fused with activation, residual add and the consumers) are what
``bnff.restructure`` writes into a model's graph; the element-wise sweeps behind them come from a
backend (``bnff.ops.backends``).
"""

from bnff.ops.fused import bn_apply, bn_statistics, feature_statistics

__all__ = ["bn_apply", "bn_statistics", "feature_statistics"]
