"""benchmarks/gpu.py (issue 32, item 6): the one-call GPU benchmark runs end to end on the CPU (--dry-run),
writes its JSON row by row, stops at its time budget, and imports none of the CPU-only dependencies the
GPU machine lacks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
ABSENT_ON_THE_GPU_MACHINE = ("kornia", "energydram", "tensorly")


@pytest.fixture
def gpu_script(monkeypatch):
    """benchmarks/gpu.py imported with kornia, energydram and tensorly made unimportable."""
    for name in ABSENT_ON_THE_GPU_MACHINE:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    spec = importlib.util.spec_from_file_location("bnff_gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_checks_then_measures_and_writes_each_row(gpu_script, tmp_path):
    from bnff.ops.backends import triton

    path = tmp_path / "gpu.json"
    calls = triton.kernel_calls()
    result = gpu_script.main(["--dry-run", "--models", "resnet18", "--variants", "eager", "bnff", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    if triton.available("cpu"):  # the GPU's kernels, in Triton's interpreter
        assert result["backend"] == "triton" and sum((triton.kernel_calls() - calls).values()) > 0
    (check,) = result["checks"]
    assert check["model"] == "resnet18" and check["ok"]
    assert check["output_error"]["bnff"] <= gpu_script.K * check["output_error"]["eager"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "bnff"} and not result["stopped_by_budget"]
    for r in rows.values():  # units: images/s is the batch over the median step
        assert r["images_per_s"] * r["step_s"] == pytest.approx(2) and r["peak_memory_bytes"] is None
    assert 0 < rows["bnff"]["saved_activation_bytes"] < rows["eager"]["saved_activation_bytes"]
    assert not any(sys.modules.get(name) for name in ABSENT_ON_THE_GPU_MACHINE)


def test_budget_stops_before_anything_new_starts(gpu_script, tmp_path):
    path = tmp_path / "gpu.json"
    result = gpu_script.main(["--dry-run", "--models", "resnet18", "--budget-s", "0", "--json", str(path)])
    assert result["stopped_by_budget"] and result["rows"] == [] and result["checks"] == []
    assert json.loads(path.read_text())["stopped_by_budget"]


def test_without_a_gpu_it_says_so(gpu_script):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_script.main(["--models", "resnet18"])
