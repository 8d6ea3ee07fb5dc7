"""Per-layer performance of one training step on seed 002's accelerator, unfused and fused.

For every layer and phase (FP; BP as dgrad, wgrad and VecU passes) of a network at a mini-batch,
under the fusion plan's ``unfused`` or ``fused`` scheme (``bnff.plan.schemes``):

* **Compute** on the PU array (seed 002 section 3.1, mapping of issue 15): a column computes one
  output channel, a PU row takes ifmap rows (of one or several samples), a PU's ``macs_per_pu``
  MACs run over that many input channels (of the channel group), one kernel tap and output pixel
  per cycle::

      cycles = ceil(C_out / pu_cols) * ceil(C_in_per_group / macs_per_pu) * ceil(N * H_out / pu_rows) * W_out * Kh * Kw

  FP, dgrad (columns over input channels, the reduction over output channels) and wgrad (the
  reduction over N * H_out rows) run the same loop nest, so utilisation = MACs / (cycles * array
  MACs) follows from how the layer's dimensions divide into the array. Linear layers are 1x1
  convolutions of a 1x1 map.
* **Off-chip transfers**: feature maps at ``dram.feature_bytes_per_s``, weights at
  ``dram.weight_bytes_per_s``, concurrently. A convolution reads its ifmap (FP, wgrad) or output
  gradient (dgrad) once when it fits in Fbuf_In (a fused layer: its ``fused_fbuf_in_share``) or
  when all weights fit in Wbuf; otherwise the cheaper of re-reading the input per column pass or
  the weights per row band.
* **Fused work**: each step of a group's ``fused`` schedule runs on the layer hosting it: the apply
  as PreU pre-processing of the consumer (FP; the recompute in its wgrad), the statistics as PostU
  post-processing of the producer (FP), S1/S2 as post-processing of the consumer's dgrad, dx
  (eq. 12) as pre-processing of the producer's dgrad; the step's off-chip reads and writes join
  the host's. A step with no convolution to host it is a VecU pass.
* **Unfused work**: every BN, ReLU and Add pass (``bnff.plan.eager_steps``), pool, concatenation
  and gradient sum is a VecU pass bound by its transfers at ``dram.feature_bytes_per_s`` (the seed gives no VecU throughput).

A convolution's time is ``compute + pre-processing stall + post-processing stall + memory stall``
(seed 002 Fig. 10's three causes): PreU pre-processes each input value once, on its first use
(results kept in Fbuf_In, section 3.2.1), so it stalls the array when it is slower than the first
column pass; PostU works on the other half of the ping-pong Ofreg (section 3.2.2), so it stalls
only when slower than the whole computation; transfers overlap (double buffering) and stall when
longer than everything else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from bnff.accel.config import AccelConfig
from bnff.graph.kinds import Kind
from bnff.graph.layers import Layer, LayerGraph
from bnff.plan import FusionPlan, eager_steps
from bnff.plan.steps import Step
from bnff.traffic.account import MEMORY_INTENSIVE, gradient_users

SCHEMES = ("unfused", "fused")
PHASES = ("fp", "dgrad", "wgrad", "bp")  # "bp": a backward VecU pass

OPS = {"bn_stats": 2, "bn_apply": 1, "bn_grad_stats": 2, "bn_dx": 2, "pointwise": 1}
"""MAC-unit operations per element in PreU/PostU: statistics x+acc and x*x+acc (seed 002 eq. 1,
18); apply F1*x+F2 (eq. 9); S1, S2 dy+acc and dy*x+acc (eq. 16, 17); dx F1*dy + B*x + C as two
MACs (eq. 12); an add: one operation; an activation and its derivative: the activation table's
counts (``bnff.activations``; ReLU and its mask one each)."""


@dataclass
class Work:
    """What one layer does in one phase: the inputs of its time.

    Attributes:
        layer, block, kind, phase: where (``PHASES``).
        macs: multiply-accumulates on the PU array.
        cycles: PU-array cycles (0: not on the array).
        col_passes: column passes of the loop nest (the first carries the pre-processing).
        feature_bytes, weight_bytes: off-chip transfers, bytes.
        pre_ops, post_ops: PreU / PostU operations (``OPS``).
        fused_steps: the fused-group steps this layer hosts ("apply", "stats", ...).
    """

    layer: str
    block: str
    kind: str
    phase: str
    macs: int = 0
    cycles: int = 0
    col_passes: int = 1
    feature_bytes: int = 0
    weight_bytes: int = 0
    pre_ops: int = 0
    post_ops: int = 0
    fused_steps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayerTime:
    """One layer's time in one phase under one scheme, seconds, with Fig. 10's decomposition.

    ``time_s = compute_s + pre_stall_s + post_stall_s + memory_stall_s``; a VecU pass has only
    ``memory_stall_s`` (its transfer time).
    """

    layer: str
    block: str
    kind: str
    phase: str
    scheme: str
    time_s: float
    compute_s: float
    pre_stall_s: float
    post_stall_s: float
    memory_stall_s: float
    utilisation: float
    feature_bytes: int
    weight_bytes: int
    fused_steps: str

    def as_dict(self) -> dict:
        return asdict(self)


def _conv_dims(m: nn.Module, layer: Layer) -> tuple[int, int, int, int, int]:
    """(C_in, C_out, groups, rows = N * H_out, W_out * taps) of a convolution or linear layer."""
    if isinstance(m, nn.Conv2d):
        n, _, h, w = layer.out_shape
        return m.in_channels, m.out_channels, m.groups, n * h, w * m.kernel_size[0] * m.kernel_size[1]
    return m.in_features, m.out_features, 1, math.prod(layer.out_shape[:-1]), 1


class _Machine:
    """Builds the ``Work`` of every layer and phase for one scheme."""

    def __init__(self, lg: LayerGraph, plan: FusionPlan, cfg: AccelConfig, scheme: str) -> None:
        self.lg, self.plan, self.cfg, self.scheme = lg, plan, cfg, scheme
        self.eb = cfg.data.element_bytes
        self.modules = dict(lg.gm.named_modules())
        self.work: dict[tuple[str, str], Work] = {}
        self.pre_fused: set[str] = set()  # layers whose inputs are pre-processed (half of Fbuf_In)
        self.groups = plan.groups if scheme == "fused" else []
        self._groups_by_name = {g.name: g for g in self.groups}

    def on_array(self, layer: Layer) -> bool:
        return layer.kind in (Kind.CONV, Kind.LINEAR)

    def get(self, layer: Layer, phase: str) -> Work:
        key = (layer.name, phase)
        if key not in self.work:
            self.work[key] = Work(layer.name, layer.block, layer.kind.value, phase)
        return self.work[key]

    def vecu(self, layer: Layer, phase: str, elements: int, what: str | None = None) -> None:
        w = self.get(layer, phase if phase == "fp" else "bp")
        w.feature_bytes += elements * self.eb
        if what:
            w.fused_steps.append(what)

    # -- the layers' own work --------------------------------------------------------------------
    def own(self, layer: Layer, member: bool) -> None:
        lg = self.lg
        if self.on_array(layer):
            self.array_layer(layer)
        elif member:  # a fused group's BN, add, activation or concatenation: its steps say what runs
            pass
        elif layer.kind in MEMORY_INTENSIVE:
            self.steps(eager_steps(layer.node.name, layer.kind.value, tuple(i.name for i in layer.inputs), layer.act).steps)
        elif not (layer.view or layer.kind == Kind.FLATTEN):  # pools, concatenations, other layers: VecU passes
            x = sum(lg.numel(i) for i in layer.inputs)
            self.vecu(layer, "fp", x + layer.out_numel)
            if layer.kind != Kind.CAT and lg.requires_grad(layer.node):
                self.vecu(layer, "bp", layer.out_numel + (lg.numel(layer.inputs[0]) if layer.inputs else 0))
        extra = gradient_users(lg, layer.node) - 1
        if extra <= 0 or (self.scheme == "fused" and self._summed_inside(layer)):
            return
        if self.scheme == "unfused":  # summed pairwise: read 2, write 1
            self.vecu(layer, "bp", 3 * extra * layer.out_numel)
            return
        host, phase, where = self._grad_sum_host(layer)
        if host is None:
            self.vecu(layer, "bp", extra * layer.out_numel)
            return
        w = self.get(host, phase)  # read once by the backward work that first takes this gradient
        w.feature_bytes += extra * layer.out_numel * self.eb
        setattr(w, f"{where}_ops", getattr(w, f"{where}_ops") + extra * layer.out_numel * OPS["pointwise"])
        w.fused_steps.append("grad_sum")

    def _grad_sum_host(self, layer: Layer) -> tuple[Layer | None, str, str]:
        """Where the fused scheme sums the extra gradients arriving at ``layer``'s output (the plan:
        the producer's backward pre-process reads each once): an array layer's own first backward
        phase; a fused group's result, the convolution hosting the group's S1/S2 post-processing."""
        if self.on_array(layer):
            return layer, self._bp_phase(layer), "pre"
        g = self._groups_by_name.get(layer.node.name)
        if g is None:
            return None, "bp", ""
        stats = next((s for s in g.schedules["fused"].backward if s.kind == "grad_stats"), None)
        return self._host(stats, g) if stats is not None else (None, "bp", "")

    def _bp_phase(self, layer: Layer) -> str:
        """The first backward phase of an array layer: dgrad, or wgrad when its input needs no gradient."""
        return "dgrad" if self.lg.requires_grad(layer.inputs[0]) else "wgrad"

    def _summed_inside(self, layer: Layer) -> bool:
        g = self._groups_by_name.get(layer.node.name)
        return g is not None and g.per_consumer

    def array_layer(self, layer: Layer) -> None:
        cfg, a, eb = self.cfg, self.cfg.array, self.eb
        c_in, c_out, groups, rows, per_row = _conv_dims(self.modules[str(layer.node.target)], layer)
        x, y = self.lg.numel(layer.inputs[0]) * eb, layer.out_numel * eb
        wbytes = layer.weight_numel * eb
        row_bands = math.ceil(rows / a.pu_rows)
        dgrad = self.lg.requires_grad(layer.inputs[0])
        # (phase, channels over the columns, channels each PU reduces, streamed input, other tensor)
        for phase, cols, reduce_ch, streamed, other in (("fp", c_out, c_in // groups, x, y),
                                                        ("dgrad", c_in, c_out // groups, y, x),
                                                        ("wgrad", c_out, c_in // groups, x, y)):
            if phase == "dgrad" and not dgrad:
                continue
            w = self.get(layer, phase)
            w.macs = layer.macs
            w.col_passes = math.ceil(cols / a.pu_cols)
            w.cycles = w.col_passes * math.ceil(reduce_ch / a.macs_per_pu) * row_bands * per_row
            share = cfg.assumptions.fused_fbuf_in_share if layer.name in self.pre_fused else 1.0
            if phase == "wgrad":  # ifmap and output gradient in, weight gradient out
                w.feature_bytes += x + y
                w.weight_bytes += wbytes
            elif streamed <= cfg.buffers.fbuf_in_bytes * share or wbytes <= cfg.buffers.wbuf_bytes:
                w.feature_bytes += streamed + other
                w.weight_bytes += wbytes
            else:  # neither fits: re-read the input per column pass or the weights per row band
                t_in = (streamed * w.col_passes + other) / cfg.dram.feature_bytes_per_s
                t_w = wbytes * row_bands / cfg.dram.weight_bytes_per_s
                if t_in <= t_w:
                    w.feature_bytes += streamed * w.col_passes + other
                    w.weight_bytes += wbytes
                else:
                    w.feature_bytes += streamed + other
                    w.weight_bytes += wbytes * row_bands

    # -- group steps -----------------------------------------------------------------------------
    def steps(self, steps, group=None) -> None:
        for step in steps:
            self.step(step, group)

    def _elements(self, refs) -> int:
        return sum(self.lg.numel(self.lg.node(r.node)) for r in refs if not r.vector)

    def _ops(self, step: Step) -> int:
        return sum((OPS[f.kind] if f.count is None else f.count) * self.lg.numel(self.lg.node(f.over.node)) for f in step.flops)

    def _host(self, step: Step, group) -> tuple[Layer | None, str, str]:
        """(hosting layer or None, phase, "pre" | "post") of a fused step (module docstring)."""
        lg = self.lg
        if group is None:
            return None, step.phase, ""
        consumers = [lg.layer(c) for c in group.consumers]
        if not consumers and group.host:
            consumers = [lg.by_node[u] for u in lg.node(group.name).users if u in lg.by_node][:1]
        if step.kind == "stats":
            producers = [lg.layer(f.over.node) for f in step.flops]
            return (producers[0] if producers and self.on_array(producers[0]) else None), "fp", "post"
        if step.kind == "apply":
            c = consumers[step.consumer or 0] if consumers else None
            return (c if c is not None and self.on_array(c) else None), "fp", "pre"
        if step.kind == "recompute":
            c = consumers[step.consumer or 0]
            return (c if self.on_array(c) else None), "wgrad", "pre"
        if step.kind in ("grad_add", "grad_stats"):
            c = consumers[step.consumer or 0] if consumers else None
            return (c if c is not None and self.on_array(c) else None), "dgrad", "post"
        if step.kind == "input_grad":
            p = lg.layer(group.terms[step.term].sources[0])
            return (p, self._bp_phase(p), "pre") if self.on_array(p) else (None, "bp", "")
        return None, step.phase, ""

    def step(self, step: Step, group) -> None:
        lg = self.lg
        moved = self._elements(step.reads) + self._elements(step.writes)
        host, phase, where = self._host(step, group)
        if host is None:  # a pass of its own; with nothing moved, it rides on a VecU pass already streaming the data
            if moved:
                self.vecu(lg.layer((step.reads or step.writes)[0].charge), step.phase, moved,
                          step.kind if group is not None else None)
            return
        w = self.get(host, phase)
        w.feature_bytes += moved * self.eb
        setattr(w, f"{where}_ops", getattr(w, f"{where}_ops") + self._ops(step))
        w.fused_steps.append(step.kind)

    def build(self) -> dict[tuple[str, str], Work]:
        groups = self.groups
        members = {m for g in groups for m in g.members}
        for g in groups:
            self.pre_fused.update(g.consumers)
        for layer in self.lg.layers:
            self.own(layer, layer.node.name in members)
        for g in groups:
            self.steps(g.schedules["fused"].steps, g)
        return self.work


def _time(w: Work, cfg: AccelConfig, scheme: str) -> LayerTime:
    a, f = cfg.array, cfg.fusion
    feature_s = w.feature_bytes / cfg.dram.feature_bytes_per_s
    weight_s = w.weight_bytes / cfg.dram.weight_bytes_per_s
    if not w.cycles:  # a VecU pass: its transfers
        t = feature_s + weight_s
        return LayerTime(w.layer, w.block, w.kind, w.phase, scheme, t, 0.0, 0.0, 0.0, t, 0.0, w.feature_bytes,
                         w.weight_bytes, " ".join(w.fused_steps))
    compute = w.cycles / a.freq_hz
    pre = w.pre_ops / (a.pu_rows * f.preu_macs_per_row * a.freq_hz)
    post = w.post_ops / (a.pu_rows * a.pu_cols // 2 * f.postu_macs_per_pu_pair * a.freq_hz)
    pre_stall = max(0.0, pre - compute / w.col_passes)
    post_stall = max(0.0, post - compute)
    memory_stall = max(0.0, max(feature_s, weight_s) - (compute + pre_stall + post_stall))
    t = compute + pre_stall + post_stall + memory_stall
    return LayerTime(w.layer, w.block, w.kind, w.phase, scheme, t, compute, pre_stall, post_stall, memory_stall,
                     w.macs / (w.cycles * a.macs), w.feature_bytes, w.weight_bytes, " ".join(w.fused_steps))


def layer_times(lg: LayerGraph, plan: FusionPlan, cfg: AccelConfig, scheme: str) -> list[LayerTime]:
    """Every layer's time per phase under ``scheme`` ("unfused" or "fused"), in graph order.

    Args:
        lg: the layer graph at the simulated mini-batch (``bnff.graph.layers.build``).
        plan: its fusion plan (``bnff.plan.plan_graph(lg.gm)``).
        cfg: the hardware description.
        scheme: "unfused" or "fused".
    Raises:
        ValueError: unknown scheme.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; the accelerator runs {', '.join(SCHEMES)}")
    work = _Machine(lg, plan, cfg, scheme).build()
    order = {layer.name: i for i, layer in enumerate(lg.layers)}
    return [_time(w, cfg, scheme) for w in sorted(work.values(), key=lambda w: (order[w.layer], PHASES.index(w.phase)))]


__all__ = ["LayerTime", "OPS", "PHASES", "SCHEMES", "Work", "layer_times"]
