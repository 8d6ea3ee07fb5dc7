"""A restructured training step is device-agnostic and works under a user's dispatch mode (issue 32, item 1).

A step (forward, loss, backward) of a restructured network must not synchronise with the host (no
``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``) outside what ``SyncBatchNorm``
needs, so that it can run on a GPU without stalls and be captured in a CUDA graph, and must create no
tensor on the default device: the step runs with the default device set to ``meta``, where any tensor
made without an explicit device lands and then fails against the real ones. The same Python dispatch
mode shows that bnff's operators, the cpu backend's group executor included, run under a user's mode
(torch's ``FlopCounterMode`` and debugging modes are such), which once failed to convert the executor's
gradients back from Python.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnff
from bnff import models
from helpers import every_backend  # noqa: F401  (each test runs on every backend)

# the triton backend's kernels too (in Triton's interpreter: what a GPU step would launch), on ResNet-18
TRITON = lambda params: params.get("name") == "resnet18"  # noqa: E731


class _HostSyncs(TorchDispatchMode):
    """Records the operators dispatched inside it by name, and each host synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_training_step_makes_no_host_sync_and_no_default_device_tensor(name, every_backend, gen):
    net = models.MODELS[name](num_classes=10).train()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    y = torch.randint(0, 10, (2,), generator=gen)
    net = bnff.restructure(net, example_input=x)
    mode = _HostSyncs()
    with torch.device("meta"), mode:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
    assert mode.syncs == 0, "a host synchronisation in the step"
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in net.parameters())
    if every_backend == "cpu":  # the group executor ran under the mode, both directions
        assert {"bnff::group_forward", "bnff::group_backward"} <= mode.ops, sorted(o for o in mode.ops if "bnff" in o)
    # a sanity check of the guard itself: a sync is seen, and a default-device tensor fails
    with mode:
        float(loss.detach())
    assert mode.syncs == 1
    with torch.device("meta"), pytest.raises(RuntimeError):
        x + torch.ones(x.shape[1:])
