import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def gen(request):
    """A per-test generator: every test draws its own random inputs (never zeros), reproducibly."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))
    torch.manual_seed(g.initial_seed())
    return g
