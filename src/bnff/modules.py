"""The ``nn.Module`` bnff provides: ``SyncBatchNorm``, synchronized BN that works on any device.

PyTorch's ``nn.SyncBatchNorm`` computes its statistics over every process of a group, but
``DistributedDataParallel`` refuses it on CPU ("SyncBatchNorm layers only work with GPU modules").
``bnff.restructure`` therefore turns every ``nn.SyncBatchNorm`` of a model into this class (the same
object, its class changed: parameters, buffers, ``state_dict`` keys and ``process_group`` stay), so
DDP accepts the restructured model with gloo on CPU. Fused, its statistics step all-reduces the
sums (``bnff.ops.fused``); left unfused, its own ``forward`` below is the synchronized BN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization over the mini-batches of all processes of ``process_group`` (default:
    the world), with ``nn.SyncBatchNorm``'s semantics: in training, with ``torch.distributed``
    initialized and more than one process, the mean and biased variance are those of the union of
    the processes' mini-batches (sums all-reduced in float64 with the counts, so uneven batches
    weigh by their size) and the running variance is unbiased over the global count; otherwise it
    is ``BatchNorm``. Input (N, C, ...) with at least 2 dimensions; output the same shape.

    Raises:
        ValueError: input with fewer than 2 dimensions, or one value per channel in training.
    """

    synchronized = True  # read by bnff.ops.bn_math.sync_group

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        from bnff.ops import bn_math

        group = bn_math.sync_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        import torch.distributed.nn.functional as dist_fn

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        m = x.numel() // c
        local = torch.cat([torch.full((1,), float(m), dtype=torch.float64, device=x.device),
                           x.sum(dims, dtype=torch.float64), (x.to(torch.float64) ** 2).sum(dims)])
        total = dist_fn.all_reduce(local, group=group)  # differentiable: its backward sums the gradients
        count = total[0]
        mean = total[1:1 + c] / count
        var = (total[1 + c:] / count - mean * mean).clamp_min(0)
        n = int(count.item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n} over all processes")
        bn_math.update_running_stats(self, mean.detach(), var.detach(), n)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @classmethod
    def adopt(cls, model: nn.Module) -> list[str]:
        """Turn every ``nn.SyncBatchNorm`` of ``model`` (with PyTorch's own forward) into this class,
        in place; returns their names. A subclass with its own forward is left alone."""
        names = []
        for name, m in model.named_modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = cls
                names.append(name)
        return names


__all__ = ["SyncBatchNorm"]
