"""The plan describes the execution: bytes recorded while bnff trains equal the plan's ``bnff`` scheme.

``bnff.ops.record.Recorder`` logs, independently of the plan, every operator the fused operators
dispatch with its real tensors (the ``cpu`` backend's kernels, any ATen op), and what autograd keeps.
For a training step of four architectures, group by group, the recorded feature-map bytes of the
forward and of the backward equal the plan's ``bnff`` schedule priced by ``bnff.traffic``, and the
kept bytes equal its keeps, exactly. The ``reference`` backend runs several PyTorch ops per sweep
and is exempt.
"""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnff import models
from bnff.ops.backends import cpu
from helpers import assert_moves_what_the_plan_says, randomize_bn
from test_fuzz import EXAMPLES, INPUT, FuzzNet, blocks

CASES = {"resnet50": 32, "densenet121": 16, "inception_v3": 32, "mobilenet_v2": 16}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_bytes_equal_the_plan(name):
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    gen = torch.Generator().manual_seed(7)
    model = models.MODELS[name](num_classes=10, small_input=True).to(memory_format=torch.channels_last)
    randomize_bn(model, gen)
    hw = CASES[name]
    x = torch.randn(2, 3, hw, hw, generator=gen).to(memory_format=torch.channels_last)
    assert assert_moves_what_the_plan_says(model, x) > 10


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=blocks(), seed=st.integers(0, 2 ** 16), channels_last=st.booleans())
def test_fuzzed_network_moves_what_its_plan_says(spec, seed, channels_last):
    """Random architectures (tests/test_fuzz.py; 1-D, 2-D or 3-D), dense or channels-last: the same, exactly."""
    if not cpu.available():
        pytest.skip("the cpu backend's kernels did not build")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dims = spec[0].dims
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(dims) if channels_last else None
    fmt = fmt or torch.contiguous_format
    model = FuzzNet(spec).to(memory_format=fmt)
    randomize_bn(model, gen)
    x = (torch.randn(*INPUT[dims], generator=gen) * 2 + 0.5).to(memory_format=fmt)
    assert_moves_what_the_plan_says(model, x)
