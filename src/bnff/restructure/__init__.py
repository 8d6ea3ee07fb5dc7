"""``bnff.restructure``: rewrite a model's BatchNorm2d layers into BN fission-and-fusion form.

Pipeline (data flows one way): model -> ``bnff.graph.trace`` (torch.fx) -> ``bnff.plan`` (seed 002
patterns, each group's steps) -> ``report.build`` -> ``rewrite`` (fused operators from ``bnff.ops``
that execute the plan).
"""

from __future__ import annotations

import sys
import types

import torch.fx as fx
from torch import Tensor, nn

from bnff.graph.trace import LeafSpec, trace
from bnff.modules import SyncBatchNorm
from bnff.ops import backends
from bnff.plan import FusionPlan, plan_graph
from bnff.restructure.prefer import PREFER, GroupTiming, excluded, measure
from bnff.restructure.report import FusedGroup, FusionReport, UnfusedNode, build
from bnff.restructure.rewrite import PLANS_ATTR, rewrite

_REPORT_ATTR = "_bnff_report"
_PLAN_ATTR = "_bnff_plan"


def _adopt_module_tree(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` the original's own child modules and root parameters/buffers.

    fx rebuilds the containers on the path to each referenced module as plain ``nn.Module``s and
    drops unreferenced ones; adopting the original children (the very objects the graph's
    ``call_module``/``get_attr`` paths resolve to) keeps ``model.layer1[0]``-style access, unused
    submodules and the ``state_dict()`` keys and order exactly as in ``model``.
    """
    gm._modules.clear()  # fx created them in graph order; the original's order fixes parameters() and state_dict()
    for name, child in model.named_children():
        gm.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        gm.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        gm.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)


class Restructured(fx.GraphModule):
    """The module ``restructure`` returns: an ``fx.GraphModule`` running the rewritten graph.

    When the model's forward branches on ``self.training`` (Inception-v3 computes its auxiliary
    classifier only in training mode), the training and evaluation forwards trace to different
    graphs; both are rewritten and ``train(mode)`` switches between them, so the module follows
    ``train()``/``eval()`` exactly like the original.
    """

    def train(self, mode: bool = True) -> "Restructured":
        super().train(mode)
        graphs = self.__dict__.get("_bnff_graphs")
        if graphs is not None and self.graph is not graphs[bool(mode)]:
            self.graph = graphs[bool(mode)]  # the setter recompiles forward()
        return self


def _rewritten(model: nn.Module, training: bool, backend: str, leaf_modules: LeafSpec, exclude: dict[str, str]
               ) -> tuple[fx.GraphModule, FusionReport, FusionPlan]:
    """Trace ``model`` in the given mode, plan (leaving the ``exclude`` groups unfused), report and rewrite."""
    model.train(training)
    traced = trace(model, leaf_modules)
    gm = traced.gm
    plan, groups, unfused = plan_graph(gm, exclude)
    opaque = {name: traced.untraceable.get(name, "given in leaf_modules") for name in traced.leaves}
    report = build(groups, unfused, opaque, backend, dict(gm.named_modules()),
                   frozenset(g.name for g in plan.groups if g.pointwise))
    rewrite(gm, plan, groups, backend)
    return gm, report, plan


def restructure(model: nn.Module, backend: str | None = None, leaf_modules: LeafSpec = (), prefer: str = "memory",
                example_input: Tensor | None = None) -> Restructured:
    """Return ``model`` restructured for BN fission-and-fusion training, with identical semantics.

    Every BatchNorm2d fed by a convolution is split (seed 002 section 2.2; docs/design.md section 3):
    its statistics step (one-sweep mean and variance, running-statistics update) follows the
    producing convolution, and its apply step, fused with a residual add and ReLU/ReLU6, becomes
    the pre-processing of the consuming convolution or pool, whose input is then recomputed in the
    backward instead of stored. The backward is the fused backward of seed 002 eq. 12-20.

    The result is an ``fx.GraphModule`` (``Restructured``) that shares the original's Parameter and buffer objects
    (an optimizer built before the call keeps working), has the same ``state_dict()`` keys, and
    follows ``train()``/``eval()``, autocast and channels_last like the original. Parts that cannot
    be fused are left as they were and listed in ``bnff.fusion_report(result)``.

    ``nn.SyncBatchNorm`` layers (``nn.SyncBatchNorm.convert_sync_batchnorm``) become
    ``bnff.modules.SyncBatchNorm``, in ``model`` itself (same objects, parameters and buffers;
    PyTorch's refuses CPU modules under DistributedDataParallel): fused, their statistics and S1/S2
    are all-reduced over their process group; unfused, they run bnff's synchronized BN.

    Args:
        model: the network, e.g. ``bnff.models.resnet50()``; inputs (N, C, H, W).
        backend: sweep backend name (``bnff.ops.backends.available()``); None: "cpu" (fused C++
            kernels, built on first use) when it builds, else "reference" with one warning.
        leaf_modules: submodule names, classes or instances not to trace into (kept opaque and
            unfused); submodules fx cannot trace are kept opaque automatically.
        prefer: "memory" (default): fuse every group that can be fused, for the smallest
            footprint. "speed": first time each group fused and eager on this CPU
            (``bnff.restructure.prefer``, a few seconds to a minute) and leave unfused the groups
            whose fused form is slower; the fusion report gives every group's two times.
        example_input: with ``prefer="speed"``, a mini-batch (N, C, H, W) with the shape, dtype and
            memory format of training; call ``restructure`` under the autocast you train with.
    Returns:
        The restructured module.
    Raises:
        ValueError: unknown backend, leaf module name or ``prefer``; ``prefer="speed"`` without
            ``example_input``.
        bnff.graph.TraceError: the model's own forward cannot be traced by torch.fx.
    """
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(map(repr, PREFER))}, got {prefer!r}")
    if prefer == "speed" and example_input is None:
        raise ValueError("prefer='speed' times each group on this CPU and needs example_input=: a mini-batch "
                         "shaped, typed and laid out as in training (call restructure under your autocast)")
    backend = backends.resolve(backend)
    SyncBatchNorm.adopt(model)
    mode = model.training
    timings = measure(model, example_input, backend, leaf_modules) if prefer == "speed" else {}
    exclude = excluded(timings)
    try:
        train_gm, report, plan = _rewritten(model, True, backend, leaf_modules, exclude)
        eval_gm, _, _ = _rewritten(model, False, backend, leaf_modules, exclude)
    finally:
        model.train(mode)
    report.prefer, report.timings = prefer, timings
    gm = Restructured(train_gm, train_gm.graph, class_name=type(model).__name__)
    _adopt_module_tree(gm, model)
    # GraphModule's deepcopy keeps these attributes
    preserved = {_REPORT_ATTR: report, _PLAN_ATTR: plan, PLANS_ATTR: getattr(train_gm, PLANS_ATTR)}
    if eval_gm.code != train_gm.code:
        for node in eval_gm.graph.nodes:  # its own group plans: node names differ between the two traces
            if node.op == "get_attr" and node.target == PLANS_ATTR:
                node.target = PLANS_ATTR + "_eval"
        preserved[PLANS_ATTR + "_eval"] = getattr(eval_gm, PLANS_ATTR)
        preserved["_bnff_graphs"] = {True: train_gm.graph, False: eval_gm.graph}
        report.mode_dependent = True
    gm.meta["_user_preserved_attributes"] = preserved
    for name, value in preserved.items():
        setattr(gm, name, value)
    gm.train(mode)
    return gm


def _attached(model: nn.Module, attr: str, what: str):
    value = getattr(model, attr, None)
    if value is None:
        raise ValueError(f"{type(model).__name__} has no {what}: it was not returned by bnff.restructure()")
    return value


def fusion_plan(model: nn.Module) -> FusionPlan:
    """The ``FusionPlan`` (training mode) a module returned by ``restructure`` executes.

    Raises:
        ValueError: ``model`` was not produced by ``bnff.restructure``.
    """
    return _attached(model, _PLAN_ATTR, "fusion plan")


def fusion_report(model: nn.Module) -> FusionReport:
    """The ``FusionReport`` of a module returned by ``restructure``.

    Raises:
        ValueError: ``model`` was not produced by ``bnff.restructure``.
    """
    return _attached(model, _REPORT_ATTR, "fusion report")


class _CallablePackage(types.ModuleType):
    """``bnff.restructure`` names both this package and its main function: the package is loaded
    lazily (``bnff.__getattr__``), and whichever binding a caller gets, ``bnff.restructure(model)``
    calls ``restructure``."""

    def __call__(self, model: nn.Module, backend: str | None = None, leaf_modules: LeafSpec = (),
                 prefer: str = "memory", example_input: Tensor | None = None) -> Restructured:
        return restructure(model, backend=backend, leaf_modules=leaf_modules, prefer=prefer,
                           example_input=example_input)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["GroupTiming", "Restructured", "restructure", "fusion_plan", "fusion_report", "FusionReport", "FusedGroup", "UnfusedNode"]
