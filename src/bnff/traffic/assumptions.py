"""Every assumption of the traffic, footprint and FLOP model, named and documented in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FOOTPRINT_POLICIES = ("autograd", "all_outputs")


@dataclass(frozen=True)
class Assumptions:
    """What the model assumes about the machine and the execution. All sizes in bytes.

    Attributes:
        element_bytes: bytes of one activation or gradient element (fp32: 4, bf16: 2). Set from
            ``analyze(dtype=...)``.
        weight_bytes: bytes of one weight / weight-gradient element read or written by a
            convolution or linear layer (None: same as ``element_bytes``).
        index_bytes: bytes of one max-pool argmax index kept for the backward (PyTorch: int64, 8).
        vector_bytes: bytes of one element of a per-channel vector (BN statistics, fp32: 4).
        mask_bytes: bytes of one dropout-mask element (PyTorch keeps a bool tensor: 1).
        onchip_bytes: on-chip capacity. A layer that sweeps its input twice (unfused BN: statistics,
            then normalization, seed 002 section 1.2.1) reads it once from off-chip if the whole
            mini-batch input fits in this many bytes. 0 (the default, and seed 002's case): nothing
            is reused between sweeps; every tensor a sweep needs is read from off-chip memory.
        count_layer_io: count the convolutions', linear layers' and pools' own traffic (ifmap,
            ofmap, weights; dgrad and wgrad operands), so totals are whole-training figures
            (seed 000). False: only the memory-intensive layers (BN, activation, add,
            concatenation, gradient accumulation), as in seed 002 Tables 1-2.
        footprint: what counts as kept from the forward for the backward.
            ``"autograd"``: what each layer's backward reads, each storage once, in-place layers
            sharing their input's storage: PyTorch's rule, the one ``bnff.memory`` measures.
            ``"all_outputs"``: every layer's ofmap written in the forward stays in off-chip memory
            until the backward (seed 002 Table 2's accounting).
        input_requires_grad: the network input needs a gradient (then the first convolution's dgrad
            runs). False for training on images.
        bn_stats_flops: FLOPs per element of BN's forward statistics (sum x: 1 add; sum x^2: 1 mul
            + 1 add; seed 002 eq. 1, 18).
        bn_apply_flops: FLOPs per element of BN's apply step y = F1*x + F2 (seed 002 eq. 9).
        bn_grad_stats_flops: FLOPs per element of the backward sums S1 = sum dy, S2 = sum dy*x
            (seed 002 eq. 16, 17).
        bn_dx_flops: FLOPs per element of dx = F1*dy + B*x + C (seed 002 eq. 12).
        pointwise_flops: FLOPs per element of an activation, its mask, an add or a gradient
            accumulation.
    """

    element_bytes: int = 4
    weight_bytes: int | None = None
    index_bytes: int = 8
    vector_bytes: int = 4
    mask_bytes: int = 1
    onchip_bytes: int = 0
    count_layer_io: bool = True
    footprint: str = "autograd"
    input_requires_grad: bool = False
    bn_stats_flops: int = 3
    bn_apply_flops: int = 2
    bn_grad_stats_flops: int = 3
    bn_dx_flops: int = 4
    pointwise_flops: int = 1

    def __post_init__(self) -> None:
        if self.footprint not in FOOTPRINT_POLICIES:
            raise ValueError(f"footprint must be one of {FOOTPRINT_POLICIES}, got {self.footprint!r}")
        for name in ("element_bytes", "index_bytes", "vector_bytes", "mask_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.onchip_bytes < 0:
            raise ValueError(f"onchip_bytes must be >= 0, got {self.onchip_bytes}")

    @property
    def weight_element_bytes(self) -> int:
        """Bytes of one weight element."""
        return self.weight_bytes if self.weight_bytes is not None else self.element_bytes

    def with_dtype(self, dtype: torch.dtype) -> "Assumptions":
        """These assumptions with ``element_bytes`` set to ``dtype``'s size."""
        return replace(self, element_bytes=torch.empty((), dtype=dtype).element_size())


SEED002 = Assumptions(element_bytes=4, onchip_bytes=0, count_layer_io=False, footprint="all_outputs")
"""Seed 002's accounting (section 2.4, Tables 1-2): memory-intensive layers only, nothing reused
on chip between sweeps, every ofmap kept in off-chip memory."""

__all__ = ["Assumptions", "FOOTPRINT_POLICIES", "SEED002"]
