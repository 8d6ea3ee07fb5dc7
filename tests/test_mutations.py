"""The numerics checks bite: deliberately broken backwards must fail them.

Each mutation breaks the reference backend's backward in a way a real bug could (a mask off by one
element; one ReLU decision that the backward takes differently from the forward, as a fused
multiply-add in one kernel and not in another would) and the suite's checks must raise.
"""

import copy

import pytest
import torch

import bnff
from bnff.ops.backends import reference
from helpers import (assert_aggregate_as_accurate_as_eager, assert_as_accurate_as_eager, compare_with_float64,
                     randomize_bn)
from test_patterns import C, Pattern

pytestmark = pytest.mark.exactness  # also run in make test's AVX2 rehearsal

_grad = reference.activation_grad


def _shifted(g, t, act):
    """The derivative taken at the neighbour's value: the right mask moved by one element (flat order)."""
    return _grad(g, None if t is None else torch.roll(t.flatten(), 1).view_as(t), act)


def _closest_call_flipped(g, t, act):
    """The mask with its closest call decided the other way: the smallest positive activation counts
    as inactive, as if the backward's recomputed value were a few ulps lower than the forward's."""
    if t is None or not bool((t > 0).any()):
        return _grad(g, t, act)
    return _grad(g, torch.where(t == t[t > 0].min(), torch.zeros_like(t), t), act)


def _pattern_steps(gen, shortcut=None):
    model = Pattern(shortcut=shortcut)
    randomize_bn(model, gen)
    batch = lambda: (torch.randn(6, C, 10, 10, generator=gen) * 2 + 0.5, torch.randint(0, 3, (6,), generator=gen))  # noqa: E731
    return compare_with_float64(model, batch, steps=1, backend="reference")


@pytest.mark.parametrize("mutation", [_shifted, _closest_call_flipped], ids=["shifted", "closest-call"])
@pytest.mark.parametrize("shortcut", [None, "projection"], ids=["lone BN", "with shortcut"])
def test_per_tensor_rule_catches_a_wrong_mask(mutation, shortcut, gen, monkeypatch):
    assert_as_accurate_as_eager(_pattern_steps(gen, shortcut))  # unmutated: passes
    monkeypatch.setattr(reference, "activation_grad", mutation)
    with pytest.raises(AssertionError, match="less accurate than eager"):
        assert_as_accurate_as_eager(_pattern_steps(gen, shortcut))


def test_whole_network_rule_catches_a_shifted_mask(gen, monkeypatch):
    from bnff.models import resnet18
    model = resnet18(num_classes=10, small_input=True)
    randomize_bn(model, gen)
    batch = lambda: (torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 10, (2,), generator=gen))  # noqa: E731
    monkeypatch.setattr(reference, "activation_grad", _shifted)
    fused = bnff.restructure(copy.deepcopy(model), backend="reference")
    with pytest.raises(AssertionError, match="median gradient error"):
        assert_aggregate_as_accurate_as_eager(compare_with_float64(model, batch, steps=2, fused=fused))
