"""The vocabulary of a fusion plan: tensors named by layer and role, and steps that move them.

A ``Step`` is plain data, ``(phase, kind, reads, writes, keeps, recomputes, flops)`` (docs/design.md
section 8). Tensors are named, never sized: a ``Ref`` gives the fx node whose output shape the
tensor has and the tensor's role, so one plan serves any mini-batch and image size; bytes and
FLOPs follow from the shapes of a given input (``bnff.traffic``). ``reads`` and ``writes`` of a
step are off-chip accesses of the execution scheme the step belongs to: a value that stays on
chip (inside a convolution of the ``fused`` scheme) is not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = {
    "ofmap": "the output feature map of the node (a BN input x, a shortcut r, the group result a)",
    "grad": "dL/d(the node's output): g_a at a group result, dx at a BN's feature map",
    "dgrad": "the data gradient one consumer's backward hands to the group result (the step names which)",
    "dy": "dL/d(BN output), the activation mask applied (seed 002 eq. 19, 20)",
    "z": "the pre-activation sum_k BN_k(x_k) + sum_j r_j, recomputed on the way for an activation whose "
         "derivative reads its input (SiLU, GELU, ...; bnff.activations)",
    "mean": "per-channel (C,) mean of a BN (vector)",
    "var": "per-channel (C,) biased variance of a BN (vector)",
    "s1": "per-channel (C,) S1 = sum(dy)/m of a BN (vector; seed 002 eq. 16)",
    "s2": "per-channel (C,) S2 = sum(dy*(x-mu))/m of a BN (vector; seed 002 eq. 17, centered)",
}
"""Roles a ``Ref`` can name, with their meaning."""

VECTOR_ROLES = frozenset({"mean", "var", "s1", "s2"})

FLOP_KINDS = ("bn_stats", "bn_apply", "bn_grad_stats", "bn_dx", "pointwise")
"""Per-element operation counts a ``Flop`` names; their values are ``bnff.traffic.Assumptions``
fields (``bn_stats_flops`` ... ``pointwise_flops``; seed 002 eq. 1, 9, 12, 16-18)."""


@dataclass(frozen=True)
class Ref:
    """A tensor, by the fx node whose output shape it has and its role (``ROLES``).

    Attributes:
        node: fx node name (``layer1_0_bn1``): its output is (N, C, H, W); a vector role is (C,).
        role: one of ``ROLES``.
        charge: fx node name of the layer whose record the tensor's traffic and footprint are
            charged to (a group member: the BN for its input, the add for a shortcut, the group's
            last layer for its result and gradients).
    """

    node: str
    role: str
    charge: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown tensor role {self.role!r}; expected one of {sorted(ROLES)}")

    @property
    def vector(self) -> bool:
        """A per-channel (C,) vector rather than a feature map."""
        return self.role in VECTOR_ROLES

    def __str__(self) -> str:
        return f"{self.role}({self.node})"


@dataclass(frozen=True)
class Flop:
    """``FLOP_KINDS`` operations per element of ``over``'s tensor, charged to ``over.charge``.

    ``count``: the operations per element when the plan fixes them (an activation's and its
    derivative's, from ``bnff.activations``); None: the models' own figure for ``kind``.
    """

    kind: str
    over: Ref
    count: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FLOP_KINDS:
            raise ValueError(f"unknown FLOP kind {self.kind!r}; expected one of {FLOP_KINDS}")


PHASES = ("fp", "bp")

STEP_KINDS = {
    "stats": "per-channel mean and variance of a feature map in one sweep (MVF; seed 002 eq. 1, 18)",
    "apply": "a = act(sum_k BN_k(x_k) + sum_j r_j) (seed 002 eq. 9), alone or as a consumer's pre-processing",
    "consume": "a consumer (convolution, pool) runs on a; its own traffic is its layer's",
    "pointwise": "a 1x1 convolution applies a block of rows at a time in its GEMM's prologue, a never written: reads "
                 "the BN inputs and shortcuts beyond its own ifmap (the first BN input); its ifmap, weights and "
                 "ofmap are its layer's",
    "epilogue_stats": "a feature map's per-channel mean and variance, taken by the fused pointwise convolution "
                      "producing it from each block of its output in cache: no sweep",
    "pointwise_backward": "a lone group's stride-1 1x1 consumer's dgrad and wgrad in blocks of rows, S1 and S2 of its "
                          "BN from each block of g_a and x in cache (grad_stats_x), a recomputed per block for the "
                          "wgrad, never written; the consumer's ifmap (x in place of a), dy, weights and g_a are "
                          "its layer's",
    "recompute": "a recomputed in the backward from the BN inputs and shortcuts instead of stored",
    "consumer_backward": "a consumer's dgrad and wgrad on the recomputed a; its own traffic is its layer's",
    "reread": "a recomputed, for a convolution that reads the materialized a without keeping it (a rereader), in "
              "that convolution's backward",
    "grad_add": "one consumer's data gradient added to g_a",
    "grad_layout": "g_a, arriving as a channel slice of a concatenation's gradient, copied dense (the sweeps read dense maps)",
    "grad_stats": "dy = g_a * act'(a), written, with S1, S2 per BN (seed 002 eq. 16, 17, 19, 20)",
    "grad_stats_x": "S1, S2 of a lone BN, the mask recomputed from x, dy not written",
    "input_grad": "dx = F1*dy + B*(x-mu) - F1*S1 of one BN (seed 002 eq. 12), split onto its feature maps",
    "input_grad_x": "dx of a lone BN from g_a and the mask recomputed from x (dy formed on the fly)",
    "bn_stats": "unfused BN: the statistics pass over x",
    "bn_apply": "unfused BN: the normalization pass, x in, y out",
    "bn_grad_stats": "unfused BN backward: the pass reducing sum(dy), sum(dy*x)",
    "bn_input_grad": "unfused BN backward: the pass forming dx",
    "act": "unfused activation, forward",
    "act_backward": "unfused activation, backward (the mask from its output)",
    "add": "unfused add, forward (its backward hands dz on, at the fork)",
}
"""Step kinds, with what each does."""


@dataclass(frozen=True)
class Step:
    """One step of a group's forward or backward under one execution scheme.

    Attributes:
        phase: "fp" (forward) or "bp" (backward).
        kind: one of ``STEP_KINDS``.
        reads: tensors read from off-chip memory, in the order the step reads them.
        writes: tensors written to off-chip memory.
        keeps: tensors this step leaves in memory for the backward (the group's footprint).
        recomputes: tensors this step recomputes instead of reading them stored.
        flops: the step's arithmetic.
        term: the BN term (index into the group's terms) a per-term step works on, else None.
        consumer: the consumer (index into the group's consumers) a per-consumer step works on; for a
            ``reread`` step, the rereader (index into the group's ``rereaders``).
    """

    phase: str
    kind: str
    reads: tuple[Ref, ...] = ()
    writes: tuple[Ref, ...] = ()
    keeps: tuple[Ref, ...] = ()
    recomputes: tuple[Ref, ...] = ()
    flops: tuple[Flop, ...] = ()
    term: int | None = None
    consumer: int | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; expected one of {PHASES}")
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; expected one of {sorted(STEP_KINDS)}")


@dataclass(frozen=True)
class Schedule:
    """A group's steps under one scheme: the forward's, then the backward's, each in order."""

    forward: tuple[Step, ...]
    backward: tuple[Step, ...]

    @property
    def steps(self) -> tuple[Step, ...]:
        """Forward then backward steps."""
        return self.forward + self.backward

    @property
    def keeps(self) -> tuple[Ref, ...]:
        """Everything the forward keeps for the backward, in order, each once."""
        return tuple(dict.fromkeys(r for s in self.forward for r in s.keeps))

    def kinds(self, phase: str) -> tuple[str, ...]:
        """The kinds of the steps of ``phase``, in order."""
        return tuple(s.kind for s in (self.forward if phase == "fp" else self.backward))


__all__ = ["FLOP_KINDS", "Flop", "PHASES", "ROLES", "Ref", "STEP_KINDS", "Schedule", "Step", "VECTOR_ROLES"]
