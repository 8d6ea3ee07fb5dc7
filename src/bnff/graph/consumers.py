"""Which layers can take a BN apply step as their pre-processing (seed 002 section 2.3).

The table that pattern matching (``bnff.plan.match``) consults and that the execution wrappers
(``bnff.ops.consumers``) implement. A consumer must be able to run its backward on an input that
is recomputed instead of stored: a ``Conv1d``, ``Conv2d`` or ``Conv3d`` with zero padding expressible
as explicit symmetric padding (its dgrad/wgrad then run on the recomputed input), or a parameter-free
pool (re-run under autograd). Functional pools travel through graphs by name (``FUNCTIONAL``), since fx graphs cannot
hold function objects as arguments.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

RECOMPUTED_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

FUNCTIONAL = {
    "max_pool2d": F.max_pool2d,
    "avg_pool2d": F.avg_pool2d,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_max_pool2d": F.adaptive_max_pool2d,
}
"""Functional pools a fused operator can feed, by the name used in the rewritten graph."""


def conv_padding(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[int, ...] | None:
    """Explicit symmetric padding of ``conv``, one entry per spatial dimension (rows, columns for a
    ``Conv2d``), or None when ``padding='same'`` needs an asymmetric one (an even total padding is
    split evenly; an odd one cannot be)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def functional_name(fn: object, kwargs: dict) -> str | None:
    """The ``FUNCTIONAL`` name of ``fn`` when called with ``kwargs``, or None if it is not a consumer
    (a pool returning its indices is not: they would be an extra output)."""
    if kwargs.get("return_indices"):
        return None
    return next((name for name, f in FUNCTIONAL.items() if f is fn), None)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot take a BN apply step as pre-processing, or None if it can."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.padding_mode != "zeros":
            return f"consumer convolution uses padding_mode={module.padding_mode!r}"
        if conv_padding(module) is None:
            return "consumer convolution uses asymmetric padding='same'"
        return None
    if isinstance(module, RECOMPUTED_MODULES):
        return None
    return f"consumer {type(module).__name__} takes no pre-processing"


def pointwise(module: nn.Module | None) -> bool:
    """``module`` is a 1x1 ``nn.Conv2d`` with stride 1, no padding, one group and zero padding mode: per
    pixel, a matrix product over channels, so a per-(sample, channel) scale of its input can be folded
    into its weights instead (``bnff.ops.consumers.FoldedGateConsumer``)."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and conv_padding(module) == (0, 0) and module.groups == 1 and module.padding_mode == "zeros")


def takes_gemm_prologue(module: nn.Module | None) -> bool:
    """``module`` is a 1x1 ``nn.Conv2d`` the fused pointwise convolution runs (``bnff_pw`` scheme): equal
    strides, no padding, one group, no bias, zero padding mode; per output pixel a matrix product over
    the channels of one input pixel, so blocks of input rows can be applied in cache and multiplied."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.stride[0] == module.stride[1]
            and conv_padding(module) == (0, 0) and module.groups == 1 and module.bias is None
            and module.padding_mode == "zeros")


def fold_pays(spatial: int, out_channels: int) -> bool:
    """Whether a squeeze-and-excitation gate folded into a pointwise consumer (``GroupPlan.gate_folded``) is
    applied to its weights at a map with ``spatial`` pixels (H*W) and ``out_channels`` outputs: the
    per-sample weights (N, C_out, C) cost fewer elements than the scaled map (N, C, H*W) when
    C_out <= H*W. Otherwise the scaled map is formed, as eager forms it (EfficientNet-B0's last stage:
    1152 channels at 7x7 into 192, where folding measured 2x slower on a 2-core AMD EPYC, Zen 4)."""
    return out_channels <= spatial


__all__ = ["FUNCTIONAL", "RECOMPUTED_MODULES", "conv_padding", "fold_pays", "functional_name", "pointwise",
           "takes_gemm_prologue", "unsupported_reason"]
