import os
import sys
import tempfile
import zlib
from pathlib import Path

# torch.compile's on-disk cache is not keyed by ATen's ISA level: code cached under
# ATEN_CPU_CAPABILITY=avx2 and loaded at the AVX-512 level (or the other way round) gave NaNs and a
# segmentation fault here (torch 2.13). One cache per level, set before torch._inductor is imported.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_bnff_{os.environ.get('ATEN_CPU_CAPABILITY', 'native').lower()}"))

# The triton backend's kernels run in Triton's interpreter on CPU tensors (read when Triton is first
# imported: bnff imports it on the first triton sweep, after this).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def gen(request):
    """A per-test generator: every test draws its own random inputs (never zeros), reproducibly."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))
    torch.manual_seed(g.initial_seed())
    return g


def pytest_collection_modifyitems(config, items):
    """``every_backend``'s "triton" runs (Triton's interpreter: slow) only in modules that ask for them
    (``TRITON = True``, or a predicate of the test's parameters: the pattern tests, the no-host-sync
    guard); the others are deselected (pytest reports the count), as are all of them when Triton is not
    installed."""
    from bnff.ops.backends import triton

    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        wanted = getattr(item.module, "TRITON", False)
        if callable(wanted):
            wanted = wanted(params)
        wanted = params.get("every_backend") != "triton" or (wanted and triton.available("cpu"))
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
