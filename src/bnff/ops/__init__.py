"""Fused operators of restructured batch normalization.

``bn_statistics`` (step 1, forward statistics) and ``bn_apply`` (step 2, fused with activation,
residual add and the consumer) are what ``bnff.restructure`` writes into a model's graph; the
element-wise sweeps behind them come from a backend (``bnff.ops.backends``).
"""

from bnff.ops.fused import bn_apply, bn_statistics

__all__ = ["bn_apply", "bn_statistics"]
