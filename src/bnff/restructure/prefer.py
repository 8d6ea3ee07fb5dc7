"""``prefer="speed"``: each fused group timed against eager on the running CPU (issue 14).

By default (``prefer="memory"``) ``bnff.restructure`` fuses every group it can, for the smaller
footprint. A fused group still pays a fixed cost per call (its autograd Function's Python and
per-channel work), so on some CPUs a small group runs slower than eager's BN/ReLU/Add kernels.
With ``prefer="speed"`` the model is first traced, planned and rewritten on a copy; every group
is then cut out of both graphs (the original's BN/Add/ReLU nodes with its consumers and a
squeeze-and-excitation in front of one, and the
rewritten graph's ``bn_apply`` with the statistics steps the group carries) and each part is
timed, forward and backward, on random tensors shaped, typed and laid out as the example
mini-batch gives them, under the caller's autocast. A group whose fused form is slower than eager
by more than ``MARGIN`` is then left as eager runs it; the plan and the fusion report list its
nodes as unfused with both times.

What an isolated timing cannot see: caches warmed by the neighbouring layers and the allocator's
page faults on fresh intermediates (``bnff.bench`` measures those on the whole step).
"""

from __future__ import annotations

import copy
import operator
import statistics
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from bnff.graph.trace import LeafSpec, trace
from bnff.ops import backends, fused
from bnff.plan import plan_graph
from bnff.restructure.rewrite import rewrite

PREFER = ("memory", "speed")
MARGIN = 0.03  # fused must be slower than eager by more than this to be left unfused (timing noise)
WARMUP = 2
REPS = 5


@dataclass(frozen=True)
class GroupTiming:
    """One group's forward plus backward time in seconds (median of ``REPS``), consumers included.

    Attributes:
        fused_s: bnff's fused operators (its ``bn_apply`` and the statistics steps it carries).
        eager_s: the original BN, Add and ReLU layers and the same consumers.
    """

    fused_s: float
    eager_s: float

    @property
    def runs_eager(self) -> bool:
        """Whether ``prefer="speed"`` leaves the group unfused: fused slower by more than ``MARGIN``."""
        return self.fused_s > self.eager_s * (1 + MARGIN)

    def describe(self) -> str:
        return f"fused {self.fused_s * 1e3:.2f} ms vs eager {self.eager_s * 1e3:.2f} ms per forward+backward"


@dataclass
class _Part:
    """A group cut out of a graph: a module whose placeholders are the group's inputs."""

    module: fx.GraphModule
    inputs: list[fx.Node]  # the outer graph's nodes feeding it, in placeholder order

    @classmethod
    def cut(cls, gm: fx.GraphModule, nodes: set[fx.Node]) -> "_Part":
        nodes = nodes | {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}
        order = [n for n in gm.graph.nodes if n in nodes]
        graph, env, inputs = fx.Graph(), {}, []
        for n in order:
            for a in n.all_input_nodes:
                if a not in nodes and a not in env:
                    env[a] = graph.placeholder(f"in_{len(inputs)}")
                    inputs.append(a)
        for n in order:
            env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(tuple(env[n] for n in order if any(u not in nodes for u in n.users)))
        return cls(fx.GraphModule(gm, graph), inputs)


def _fused_nodes(gm: fx.GraphModule, name: str, consumers: bool) -> set[fx.Node]:
    """The rewritten graph's nodes of group ``name``: its ``bn_apply``, the getitems of its consumers'
    outputs, its ``bn_statistics`` and the ``feature_statistics`` steps it owns."""
    apply = next(n for n in gm.graph.nodes if n.target is fused.bn_apply and n.args[0].args[1] == name)
    nodes = {apply} | ({u for u in apply.users if u.target is operator.getitem} if consumers else set())
    stack = [apply]
    while stack:
        for a in stack.pop().all_input_nodes:
            ours = (a.op == "get_attr" or a.target is fused.bn_statistics
                    or (a.target is operator.getitem and a.args[0].op == "get_attr")
                    or (a.target is fused.feature_statistics and a.args[3] == name))
            if ours and a not in nodes:
                nodes.add(a)
                stack.append(a)
    return nodes


def _random(meta: TensorMetadata, gen: torch.Generator) -> Tensor:
    t = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype)
    t.copy_(torch.randn(meta.shape, generator=gen))
    return t.requires_grad_(t.is_floating_point())


def _inputs(part: _Part, backend: str, gen: torch.Generator) -> list:
    """Values for ``part``'s inputs: a random tensor per feature map and, for statistics carried by
    another group, those statistics of the map's random tensor."""
    values: dict[fx.Node, object] = {}
    for a in part.inputs:
        if a.target is not fused.feature_statistics:
            meta = a.meta.get("tensor_meta")
            if not isinstance(meta, TensorMetadata):
                raise RuntimeError(f"prefer='speed': no shape recorded for {a.name!r}, an input of a fused group")
            values[a] = _random(meta, gen)
    with torch.no_grad():
        for a in part.inputs:
            if a.target is fused.feature_statistics:
                values[a] = backends.get(backend).channel_stats(values[a.args[0]])
    return [values[a] for a in part.inputs]


def _runner(part: _Part, args: list):
    grads: list[Tensor] = []

    def run() -> float:
        for a in args:
            if isinstance(a, Tensor):
                a.grad = None
        t0 = time.perf_counter()
        outs = [o for o in part.module(*args) if isinstance(o, Tensor) and o.requires_grad]
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)
        return time.perf_counter() - t0

    return run


def measure(model: nn.Module, example_input: Tensor, backend: str, leaf_modules: LeafSpec = (),
            reps: int = REPS) -> dict[str, GroupTiming]:
    """Time every fused group of ``model`` (training mode) fused and eager; see the module docstring.

    ``model`` is deep-copied (its parameters and running statistics are not touched). Call it under
    the autocast you train with.

    Args:
        model: the network.
        example_input: a mini-batch (N, C, H, W) as in training: its shape, dtype and memory format
            set those of every tensor timed.
        backend: a resolved sweep backend name.
        leaf_modules: as for ``bnff.restructure``.
        reps: timed repetitions per group and form (interleaved, after ``WARMUP``).
    Returns:
        group name (its output node) -> ``GroupTiming``, in graph order.
    """
    net = copy.deepcopy(model).train()
    gm = trace(net, leaf_modules).gm
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    plan, groups, _ = plan_graph(gm)
    eager = {g.output.name: _Part.cut(gm, set(g.replaced())) for g in groups}
    rewrite(gm, plan, groups, backend)
    gen = torch.Generator().manual_seed(0)
    timings = {}
    for name, eager_part in eager.items():
        fused_part = _Part.cut(gm, _fused_nodes(gm, name, bool(plan.group(name).consumers)))
        fused_args, eager_args = _inputs(fused_part, backend, gen), _inputs(eager_part, backend, gen)
        runs = {"fused": _runner(fused_part, fused_args), "eager": _runner(eager_part, eager_args)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(WARMUP + reps):
            for k, run in runs.items():
                t = run()
                if i >= WARMUP:
                    times[k].append(t)
        timings[name] = GroupTiming(statistics.median(times["fused"]), statistics.median(times["eager"]))
    return timings


def excluded(timings: dict[str, GroupTiming]) -> dict[str, str]:
    """The groups ``prefer="speed"`` leaves unfused, name -> the reason the plan and report give."""
    return {name: f"prefer='speed': {t.describe()} on this CPU" for name, t in timings.items() if t.runs_eager}


__all__ = ["PREFER", "MARGIN", "GroupTiming", "measure", "excluded"]
