"""Per-channel vector mathematics of restructured batch normalization.

Everything here works on per-channel vectors of shape (C,), never on feature maps: these are the
"parameter terms" that seed 002 computes between the statistics step (step 1) and the apply step
(step 2). The element-wise sweeps that use them live in the backends (``bnff.ops.backends``), which
also hand out F1 (``scale``), the backward's B, dgamma, dbeta (``backward_vectors``) and the
running-statistics blend (``running_update``): the reference backend from the functions here, the cpu
backend in one C++ call each, F1, B, dgamma and dbeta with the same operations in the same order (bit
for bit the same values). On small maps a BN's handful of small ATen ops cost more than its sweeps.

Equations (seed 002, Yang/Wang/Zhang 2022; docs/design.md section 3):

    F1 = gamma / sqrt(var + eps)                      (eq. 10)
    F2 = beta - mu * F1                               (eq. 11, corrected)
    F3 = 1 / (var + eps)                              (eq. 15)
    S1 = sum(dy) / m,  S2 = sum(dy * x) / m           (eq. 16, 17)
    B  = F1 * F3 * (mu * S1 - S2)                     (eq. 13)
    C  = -mu * B - F1 * S1                            (eq. 14)
    dx = F1 * dy + B * x + C                          (eq. 12)

bnff evaluates eq. 9 and eq. 12 in *centered* form: x is replaced by (x - mu), which turns F2 into
beta and C into -F1 * S1, and S2 into S2c = sum(dy * (x - mu)) / m = S2 - mu * S1. In real
arithmetic this is the same affine map; in floating point it avoids the cancellation that the raw
form suffers when |mu| >> sigma (F1 * x and F2 are then both huge and nearly opposite).
So with S2c:

    B = -F1 * F3 * S2c,   dx = F1 * dy + B * (x - mu) - F1 * S1
    dgamma = m * S2c / sqrt(var + eps),   dbeta = m * S1

Vectors are computed in the accumulation dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def as_4d(t: Tensor) -> Tensor:
    """A feature map (N, C, L), (N, C, H, W) or (N, C, D, H, W) as the (N, C, H', W') view the sweeps
    take: (N, C, L, 1), itself, (N, C, D*H, W). BN's statistics and apply are per channel over every
    other dimension, so the view changes nothing; NCL / NCDHW stay NCHW-dense, channels_last_3d
    becomes channels_last.

    Raises:
        ValueError: ``t`` has fewer than 3 or more than 5 dimensions.
    """
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(-1)
    if t.dim() == 5:
        return t.flatten(2, 3)
    raise ValueError(f"expected a 3-D, 4-D or 5-D feature map (N, C, ...), got a {t.dim()}-D tensor of shape "
                     f"{tuple(t.shape)}")


def from_4d(t: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """The inverse of ``as_4d`` for a map whose own spatial size is ``spatial`` (L; H, W; D, H, W)."""
    if len(spatial) == 2:
        return t
    if len(spatial) == 1:
        return t.squeeze(-1)
    return t.unflatten(2, tuple(spatial[:2]))


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a dispatch when it is already (the fused operator's per-call tensors:
    a no-op ``.to`` still costs a dispatch, per layer per step)."""
    return t if t.dtype == dtype else t.to(dtype)


def invstd(var: Tensor, eps: float) -> Tensor:
    """1 / sqrt(var + eps), shape (C,)."""
    return torch.rsqrt(var + eps)


def scale(var: Tensor, gamma: Tensor | None, eps: float) -> Tensor:
    """F1 = gamma / sqrt(var + eps) (seed 002 eq. 10); gamma=None (affine=False) means gamma = 1."""
    inv = invstd(var, eps)
    return inv if gamma is None else as_dtype(gamma, inv.dtype) * inv


def backward_coefficient(var: Tensor, f1: Tensor, s2c: Tensor, eps: float) -> Tensor:
    """B = F1 * F3 * (mu * S1 - S2) = -F1 * S2c / (var + eps) (seed 002 eq. 13 and 15), shape (C,)."""
    return -f1 * s2c / (as_dtype(var, f1.dtype) + eps)


def affine_grads(var: Tensor, s1: Tensor, s2c: Tensor, m: int, eps: float) -> tuple[Tensor, Tensor]:
    """dgamma = m * S2c / sqrt(var + eps) and dbeta = m * S1 (docs/design.md section 3), shapes (C,)."""
    return s2c * m * invstd(as_dtype(var, s2c.dtype), eps), s1 * m


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalizes with the mini-batch statistics, exactly as ``_BatchNorm.forward``
    decides: in training mode, or in eval mode when it keeps no running statistics."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def sync_group(bn: nn.modules.batchnorm._BatchNorm):
    """The process group a ``nn.SyncBatchNorm`` (or ``bnff.modules.SyncBatchNorm``) synchronizes its
    statistics over now, or None:
    PyTorch's rule (``SyncBatchNorm.forward``): in training with mini-batch statistics, with
    ``torch.distributed`` initialized and more than one process in ``bn.process_group`` (default
    the world)."""
    synced = isinstance(bn, nn.SyncBatchNorm) or getattr(type(bn), "synchronized", False)
    if not synced or not (bn.training and uses_batch_stats(bn)):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_sums(group, *parts: Tensor) -> list[Tensor]:
    """``parts`` summed over the processes of ``group`` in one float64 all-reduce, each in its shape."""
    import torch.distributed as dist

    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
    dist.all_reduce(flat, group=group)
    return list(torch.split(flat, [p.numel() for p in parts]))


def running_factor(bn: nn.modules.batchnorm._BatchNorm) -> float | None:
    """The first half of PyTorch's running-statistics update: ``num_batches_tracked`` += 1 and the factor
    f of ``running = (1 - f) * running + f * batch``: ``momentum``, or ``1 / num_batches_tracked`` when
    ``momentum is None`` (cumulative moving average). None when nothing more is to be updated: the
    module is not in training mode, tracks no running statistics or keeps no running mean and variance.
    """
    if not (bn.training and bn.track_running_stats):
        return None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # an integer buffer: never requires grad, so no autograd to keep out
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return None if bn.running_mean is None else factor


@torch.no_grad()
def blend_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float,
                        m: int) -> None:
    """The second half, in place: ``running_mean = (1 - f) * running_mean + f * mean`` and the same for
    ``running_var`` with the unbiased variance ``var * m / (m - 1)``; all (C,), m = N*H*W >= 2."""
    rm, rv = running_mean, running_var
    # both buffers in one multi-tensor op each (the same element-wise arithmetic as two mul_/add_ pairs)
    torch._foreach_mul_([rm, rv], 1.0 - factor)
    torch._foreach_add_([rm, rv], [as_dtype(mean, rm.dtype), as_dtype(var * (m / (m - 1)), rv.dtype)], alpha=factor)


def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, m: int,
                         blend=blend_running_stats) -> None:
    """Update ``running_mean``, ``running_var`` and ``num_batches_tracked`` in place, as PyTorch does
    (``running_factor``, then ``blend``: ``blend_running_stats`` or a backend's ``running_update``).

    Args:
        bn: the BatchNorm module whose buffers are updated.
        mean, var: the mini-batch mean and biased variance, shape (C,), not requiring grad.
        m: values per channel in the mini-batch (N * H * W), at least 2.
        blend: ``blend_running_stats``'s signature and arithmetic.
    """
    factor = running_factor(bn)
    if factor is not None:
        blend(bn.running_mean, bn.running_var, mean, var, factor, m)
