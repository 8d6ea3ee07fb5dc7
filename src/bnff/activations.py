"""The activation table: every activation bnff fuses after BN, in one place (docs/design.md section 12).

Each ``Entry`` says, for one activation f:

* ``forward``: f(z), as PyTorch computes it (its own ``torch``/``F`` function);
* ``backward``: dy = g * f'(.), with PyTorch's own backward operator (``aten::threshold_backward``,
  ``aten::silu_backward``, ...), so eager and bnff share the formula;
* ``reads``: what that derivative is computed from: the activation's output a ("a": ReLU-like and
  invertible activations, whose backward PyTorch can take from the result), its input z ("z": SiLU,
  GELU, Mish, Hardswish, ...; bnff then recomputes z from the BN inputs, which the backward reads
  anyway), or nothing (identity);
* ``thresholds``: the points where f' jumps or its formula switches (mask rules, rounding ties;
  the bit-identity tests place inputs within a few ulps of them);
* ``flops`` / ``grad_flops``: operations per element of f and of dy = g * f' (for ``bnff.traffic``
  and ``bnff.accel``), counted as one per add, multiply, division, comparison or min/max, and one per
  elementary function (exp, log1p, erf, tanh);
* how it appears in a traced graph: modules, functions and tensor methods, its parameter and where
  in-place forms keep what (``eager_saves``: what eager autograd keeps for the backward).

An activation *kind* is the canonical string of an entry and its parameter: ``"relu"``,
``"leaky_relu(0.1)"``, ``"elu(1.0)"``, ``"gelu_tanh"``. The plan, the backends and the reports carry
kinds; ``spec(kind)`` turns one into a ``Spec`` (the entry with its parameter bound). Nothing else in
bnff names activations.

Entries: identity, ReLU, ReLU6, LeakyReLU (any slope), ELU, CELU, SELU, SiLU, Hardswish,
Hardsigmoid, Sigmoid, Tanh, GELU (erf and tanh forms), Mish. Anchors: timm ``layers/create_act.py``
(one table of activations); InPlace-ABN (Rota Bulo et al., CVPR 2018), which recomputes from the
output and so supports only invertible activations (leaky ReLU, ELU, identity).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten

# SELU's constants (Klambauer et al. 2017; PyTorch's ``nn.SELU``)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Entry:
    """One activation of the table (module docstring).

    Attributes:
        name: the kind's stem ("leaky_relu").
        display: how reports name it ("LeakyReLU").
        forward: ``f(z, param) -> a`` (same shape and dtype as z).
        backward: ``(g, t, param, from_output) -> dy``: g * f' with PyTorch's backward operator, where t
            is a or z as ``reads`` says (or unused); ``from_output`` picks PyTorch's ``is_result`` form.
        reads: ``param -> "a" | "z" | None``: what the derivative is computed from (None: neither).
        thresholds: the points where f' jumps or changes formula.
        flops, grad_flops: operations per element of f and of g * f' (module docstring's counting).
        eager_saves: what eager autograd keeps for its backward: "result", "input" or None (nothing).
        inplace_saves: what its in-place form keeps: "result" (its own output, the shared storage),
            "copy" (a copy of the input: autograd clones it before overwriting) or None.
        modules: module classes whose plain forward computes it.
        functions: ``call_function`` targets.
        methods: ``Tensor`` method names.
        param: the parameter's name ("negative_slope", "alpha", "approximate") or None.
        default: its default value.
    """

    name: str
    display: str
    forward: Callable
    backward: Callable
    reads: Callable[[object], str | None]
    thresholds: tuple[float, ...]
    flops: int
    grad_flops: int
    eager_saves: str | None
    inplace_saves: str | None
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    param: str | None = None
    default: object = None


def _on(what: str | None) -> Callable[[object], str | None]:
    return lambda p: what


def elu_args(name: str, p):
    """(alpha, scale, input_scale) of ``aten::elu`` for ELU(alpha), CELU(alpha), SELU (what each kernel of
    the family computes: the backends' formulas take these three)."""
    if name == "selu":
        return SELU_ALPHA, SELU_SCALE, 1.0
    if name == "celu":
        return p, 1.0, 1.0 / p
    return p, 1.0, 1.0


def _elu_family(name: str, display: str, fwd: Callable, modules, functions, param: str | None,
                default, flops: int) -> Entry:
    def backward(g, t, p, from_output, _name=name):
        alpha, scale, input_scale = elu_args(_name, p)
        return aten.elu_backward(g, alpha, scale, input_scale, from_output, t)
    return Entry(name, display, fwd, backward, functools.partial(_reads_elu, name), (0.0,), flops, flops, "input", "result",
                 modules, functions, (), param, default)


def _reads_elu(name: str, p) -> str:
    # from the output only where a <= 0 iff z <= 0 (PyTorch's is_result=True needs alpha >= 0)
    alpha, _, _ = elu_args(name, p)
    return "a" if alpha > 0 else "z"


TABLE: dict[str, Entry] = {e.name: e for e in (
    Entry("identity", "Identity", lambda z, p: z, lambda g, t, p, o: g, _on(None), (), 0, 0, None, None,
          (nn.Identity,)),
    Entry("relu", "ReLU", lambda z, p: torch.relu(z), lambda g, a, p, o: aten.threshold_backward(g, a, 0),
          _on("a"), (0.0,), 1, 1, "result", "result",
          (nn.ReLU,), (F.relu, torch.relu, torch.relu_, F.relu_), ("relu", "relu_")),
    Entry("relu6", "ReLU6", lambda z, p: torch.clamp(z, 0.0, 6.0),
          lambda g, a, p, o: aten.hardtanh_backward(g, a, 0.0, 6.0),
          _on("a"), (0.0, 6.0), 2, 2, "input", "copy", (nn.ReLU6,), (F.relu6,)),
    Entry("leaky_relu", "LeakyReLU", lambda z, p: F.leaky_relu(z, p),
          lambda g, t, p, o: aten.leaky_relu_backward(g, t, p, o),
          lambda p: "a" if p >= 0 else "z", (0.0,), 2, 2, "input", "result",
          (nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_), (), "negative_slope", 0.01),
    _elu_family("elu", "ELU", lambda z, p: F.elu(z, p), (nn.ELU,), (F.elu, F.elu_), "alpha", 1.0, 4),
    _elu_family("celu", "CELU", lambda z, p: F.celu(z, p), (nn.CELU,), (F.celu, F.celu_), "alpha", 1.0, 5),
    _elu_family("selu", "SELU", lambda z, p: torch.selu(z), (nn.SELU,), (F.selu, torch.selu, torch.selu_), None,
                None, 5),
    Entry("silu", "SiLU", lambda z, p: F.silu(z), lambda g, z, p, o: aten.silu_backward(g, z),
          _on("z"), (), 4, 8, "input", "copy", (nn.SiLU,), (F.silu,)),
    Entry("hardswish", "Hardswish", lambda z, p: F.hardswish(z), lambda g, z, p, o: aten.hardswish_backward(g, z),
          _on("z"), (-3.0, 3.0), 5, 5, "input", "copy", (nn.Hardswish,), (F.hardswish,)),
    Entry("hardsigmoid", "Hardsigmoid", lambda z, p: F.hardsigmoid(z),
          lambda g, z, p, o: aten.hardsigmoid_backward(g, z),
          _on("z"), (-3.0, 3.0), 4, 3, "input", "copy", (nn.Hardsigmoid,), (F.hardsigmoid,)),
    Entry("sigmoid", "Sigmoid", lambda z, p: torch.sigmoid(z), lambda g, a, p, o: aten.sigmoid_backward(g, a),
          _on("a"), (), 3, 3, "result", "result",
          (nn.Sigmoid,), (torch.sigmoid, torch.sigmoid_, F.sigmoid), ("sigmoid", "sigmoid_")),
    Entry("tanh", "Tanh", lambda z, p: torch.tanh(z), lambda g, a, p, o: aten.tanh_backward(g, a),
          _on("a"), (), 1, 3, "result", "result",
          (nn.Tanh,), (torch.tanh, torch.tanh_, F.tanh), ("tanh", "tanh_")),
    Entry("gelu", "GELU", lambda z, p: F.gelu(z), lambda g, z, p, o: aten.gelu_backward(g, z),
          _on("z"), (), 5, 11, "input", "copy", (nn.GELU,), (F.gelu,)),
    Entry("gelu_tanh", "GELU(tanh)", lambda z, p: F.gelu(z, approximate="tanh"),
          lambda g, z, p, o: aten.gelu_backward(g, z, approximate="tanh"),
          _on("z"), (), 9, 15, "input", "copy"),
    Entry("mish", "Mish", lambda z, p: F.mish(z), lambda g, z, p, o: aten.mish_backward(g, z),
          _on("z"), (20.0,), 5, 11, "input", "copy", (nn.Mish,), (F.mish,)),
)}
"""Every activation bnff fuses, by stem name."""


@dataclass(frozen=True)
class Spec:
    """An activation with its parameter bound: what the plan and the backends work with.

    Attributes:
        kind: the canonical kind string ("leaky_relu(0.1)").
        entry: the table's entry.
        param: the parameter (a float; GELU's form is in its entry name), or None.
    """

    kind: str
    entry: Entry
    param: float | None

    @property
    def reads(self) -> str | None:
        """What dy = g * f' is computed from: "a" (the output), "z" (the input) or None."""
        return self.entry.reads(self.param)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Where f' jumps or changes formula."""
        return self.entry.thresholds

    @property
    def display(self) -> str:
        """The name reports use ("LeakyReLU(0.1)")."""
        return self.entry.display if self.param is None else f"{self.entry.display}({self.param:g})"

    def forward(self, z: Tensor) -> Tensor:
        """a = f(z), same shape and dtype."""
        return self.entry.forward(z, self.param)

    def backward(self, g: Tensor, t: Tensor | None) -> Tensor:
        """dy = g * f'(.) with PyTorch's backward operator; ``t`` is a or z as ``reads`` says.
        From the output, leaky ReLU and the ELU family use PyTorch's ``is_result`` form."""
        return self.entry.backward(g, t, self.param, self.reads == "a")


def kind_of(name: str, param=None) -> str:
    """The canonical kind of entry ``name`` with ``param`` (its default when None).

    Raises:
        ValueError: an unknown name (the message lists the table's).
    """
    if name == "gelu" and param in ("tanh",):
        return "gelu_tanh"
    e = TABLE.get(name)
    if e is None:
        raise ValueError(f"unknown activation {name!r}; bnff's table has {', '.join(TABLE)}")
    if e.param is None:
        return name
    return f"{name}({float(e.default if param is None else param)!r})"


@functools.lru_cache(maxsize=None)
def spec(kind: str | None) -> Spec | None:
    """The ``Spec`` of a canonical kind (None for None).

    Raises:
        ValueError: not a kind of the table.
    """
    if kind is None:
        return None
    name, _, rest = kind.partition("(")
    e = TABLE.get(name)
    if e is None or (rest and e.param is None) or (not rest and e.param is not None):
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {', '.join(TABLE)} "
                         f"(with its parameter, e.g. 'leaky_relu(0.1)')")
    return Spec(kind, e, float(rest.rstrip(")")) if rest else None)


def forward(kind: str | None, z: Tensor) -> Tensor:
    """a = f(z) for ``kind`` (z itself for None)."""
    s = spec(kind)
    return z if s is None else s.forward(z)


def reads(kind: str | None) -> str | None:
    """What the derivative of ``kind`` reads: "a", "z" or None (no activation, or identity)."""
    s = spec(kind)
    return None if s is None else s.reads


# -- recognition in a traced graph ------------------------------------------------------------------

_BY_MODULE = {m: e for e in TABLE.values() for m in e.modules}
_BY_FUNCTION = {f: e for e in TABLE.values() for f in e.functions}
_BY_METHOD = {m: e for e in TABLE.values() for m in e.methods}


def _arg(node: fx.Node, i: int, key: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def module_kind(m: nn.Module) -> str | None:
    """The activation kind module ``m`` computes (``nn.SiLU()`` -> "silu", ``nn.LeakyReLU(0.1)`` ->
    "leaky_relu(0.1)", ``nn.Hardtanh(0, 6)`` -> "relu6"), or None: not in the table, or a subclass with
    a forward of its own."""
    if isinstance(m, nn.Hardtanh) and type(m).forward is nn.Hardtanh.forward:  # nn.ReLU6 and Hardtanh(0, 6)
        return "relu6" if (m.min_val, m.max_val) == (0.0, 6.0) else None
    e = _BY_MODULE.get(type(m))
    if e is None:
        return None
    if e.name == "gelu":
        return kind_of("gelu", m.approximate)
    return kind_of(e.name, getattr(m, e.param) if e.param else None)


def recognize(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation kind ``node`` computes on its first argument, or None.

    Recognized: the table's modules with their plain forward (``nn.ReLU``, ``nn.Hardtanh(0, 6)``,
    ``nn.GELU(approximate=...)``, ...), its functions (``F.silu``, ``torch.sigmoid``,
    ``F.hardtanh(x, 0, 6)``, in-place spellings) and tensor methods (``x.relu_()``). Parameters must be
    constants of the graph.
    """
    if node.op == "call_module":
        m = modules.get(node.target)
        return None if m is None else module_kind(m)
    if node.op == "call_function":
        fn = node.target
        if fn in (F.hardtanh, F.hardtanh_):
            return "relu6" if (_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)) == (0.0, 6.0) else None
        e = _BY_FUNCTION.get(fn)
        if e is None:
            return None
        if e.name == "gelu":
            form = _arg(node, 1, "approximate", "none")
            return kind_of("gelu", form) if isinstance(form, str) else None
        if e.param is None:
            return e.name
        p = _arg(node, 1, e.param, e.default)
        return kind_of(e.name, p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None
    if node.op == "call_method" and isinstance(node.target, str):
        e = _BY_METHOD.get(node.target)
        return None if e is None else e.name
    return None


def is_inplace_call(node: fx.Node) -> bool:
    """Whether an activation call writes into its input: a ``*_`` function or method, ``inplace=True``
    as keyword or as the last positional argument (``F.relu(x, True)``, ``F.leaky_relu(x, 0.1, True)``).
    Modules: their ``inplace`` attribute (``bnff.graph.kinds.is_inplace``)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        act_fn = node.target in _BY_FUNCTION or node.target in (F.hardtanh, F.hardtanh_)
        return (name.endswith("_") or bool(node.kwargs.get("inplace", False))
                or (act_fn and len(node.args) > 1 and node.args[-1] is True))
    return node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_")


__all__ = ["Entry", "SELU_ALPHA", "SELU_SCALE", "Spec", "TABLE", "forward", "is_inplace_call", "kind_of", "module_kind", "reads",
           "recognize", "spec"]
