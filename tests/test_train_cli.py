"""The main job end to end on a few batches, and the data loaders' errors."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bnff import cli
from bnff.data import DataError, load


def test_train_cli_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--compare", "--epochs", "1", "--batch-size", "16", "--limit-batches", "3", "--out", str(out),
                   "--workers", "1", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    runs = metrics["runs"]
    assert runs["bnff"]["saved_activation_bytes"] < runs["eager"]["saved_activation_bytes"]
    # 3 SGD steps from the same weights: the two fp32 trajectories agree to well under 1%
    assert abs(runs["bnff"]["loss"][0] - runs["eager"]["loss"][0]) < 1e-2 * runs["eager"]["loss"][0]
    assert (out / "loss.png").stat().st_size > 1000
    state = torch.load(out / "checkpoint.pt")["state_dict"]
    assert "layer4.1.bn2.running_var" in state


def _cifar_batch(path, n, rng):
    with open(path, "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, n))}, f)


def test_cifar10_loader_and_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 20, rng)
    _cifar_batch(tmp_path / "test_batch", 10, rng)
    ds = load(f"cifar10:{tmp_path}")
    assert ds.train.tensors[0].shape == (100, 3, 32, 32) and ds.test.tensors[1].shape == (10,)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load(f"cifar10:{tmp_path}")
    _cifar_batch(tmp_path / "data_batch_3", 20, rng)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load(f"cifar10:{tmp_path}")


def test_cli_reports_bad_data_clearly(capsys):
    assert cli.main(["train", "--data", "cifar10:/nonexistent"]) == 2
    assert "data_batch_1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["densenet121", "inception_v3", "mobilenet_v2"])
def test_train_cli_other_families(model, tmp_path):
    """The small-input variants train on the default digits data (Inception: with its auxiliary
    classifier's loss); eager and bnff start together (one step: the same weights on the same batch)
    and keep fewer activation bytes. One step and a small learning rate: at the default peak,
    Inception's second step of batch 8 jumps the loss from 3.3 to 5.4, and the two implementations'
    fp32 rounding differences grow to about 1% there."""
    out = tmp_path / model
    rc = cli.main(["train", "--compare", "--model", model, "--epochs", "1", "--batch-size", "8", "--limit-batches", "1",
                   "--lr", "0.01", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert runs["bnff"]["saved_activation_bytes"] < runs["eager"]["saved_activation_bytes"]
    assert abs(runs["bnff"]["loss"][0] - runs["eager"]["loss"][0]) < 1e-2 * runs["eager"]["loss"][0]
    assert 0.0 <= runs["bnff"]["test_accuracy"][0] <= 1.0


def test_bench_cli_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "resnet18", "--batch", "2", "--image-size", "32", "--steps", "2",
                   "--warmup", "1", "--dtype", "fp32", "--variants", "eager", "bnff", "conv_floor",
                   "--profile", "1", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "conv_floor" in out and "bnff, top operators: " in out
    res = json.loads(path.read_text())
    assert set(res["results"]) == {"eager", "bnff", "conv_floor"}
    for r in res["results"].values():  # timings vary by machine: only their units are checked
        assert 0 < r["step_s"] < 60 and r["images_per_s"] * r["step_s"] == pytest.approx(2)  # batch 2
    assert res["ratios"]["bnff_vs_eager"] > 0
    r = res["results"]
    want = (r["eager"]["step_s"] - r["bnff"]["step_s"]) / (r["eager"]["step_s"] - r["conv_floor"]["step_s"])
    assert res["overhead_removed"] == pytest.approx(want)
    cpuinfo = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert res["cpu"]["model"] and (not cpuinfo or res["cpu"]["model"] in cpuinfo)
    assert all(f" {flag}" in cpuinfo for flag in res["cpu"]["isa_flags"])
    assert res["cpu"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    # activations kept for backward, from an independent count: ResNet-18 on a 2x3x32x32 input keeps
    # at least its input and conv1's output in eager (2*3*32*32 + 2*64*16*16 floats of 4 bytes)
    assert 4 * (2 * 3 * 32 * 32 + 2 * 64 * 16 * 16) < res["saved_bytes"]["eager"]
    assert 0 < res["saved_bytes"]["bnff"] < res["saved_bytes"]["eager"]
    # the profile: bnff's BN runs in its sweeps, eager's in ATen's batch norm; the floor is convolutions
    prof = res["profiles"]
    assert set(prof) == {"eager", "bnff", "conv_floor"}
    assert any(op.startswith("bnff::") for op in prof["bnff"]["ops"]) and prof["bnff"]["categories"]["bnff sweeps"] > 0
    assert not any(op.startswith("bnff::") for op in prof["eager"]["ops"])
    assert any("batch_norm" in op for op in prof["eager"]["ops"]) and not any("batch_norm" in op for op in prof["bnff"]["ops"])
    assert prof["conv_floor"]["categories"]["convolutions"] > 0.5 * sum(prof["conv_floor"]["ops"].values())


def test_help_answers_without_importing_torch():
    code = ("import sys, bnff.cli\n"
            "try:\n    bnff.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "bench" in out and out.strip().endswith("False")


def test_sizes_below_one_are_refused(capsys):
    for argv in (["traffic", "--model", "resnet18", "--batch", "0"], ["train", "--batch-size", "-1"],
                 ["bench", "--image-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    # a mini-batch larger than the training set (1437 digits) is named with the way out
    assert cli.main(["train", "--batch-size", "2000"]) == 2
    assert "--batch-size 2000" in (err := capsys.readouterr().err) and "smaller --batch-size" in err


def test_a_bug_is_not_reported_as_a_usage_error(monkeypatch):
    """Only UsageError (bad options, unreadable data) exits 2 with a one-line message; a ValueError
    from inside bnff is a bug and keeps its traceback."""
    def broken(args):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(cli, "_traffic", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["traffic", "--patterns"])


def test_writing_a_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from bnff.models import resnet18
    from bnff.traffic import compare
    from bnff.traffic.report import write_plot

    before = matplotlib.get_backend()
    write_plot(tmp_path / "t.png", "resnet18", compare(resnet18(num_classes=10, small_input=True), (2, 3, 32, 32)))
    assert matplotlib.get_backend() == before and (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_of_a_few_steps_trains(tmp_path):
    """40 images in 2 classes, batch 8, 1 epoch: 4 steps, where OneCycleLR's warm-up of a quarter
    ends on step 0 (it divided by zero); the schedule warms up over two steps instead."""
    from PIL import Image

    from bnff.train import lr_schedule
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    assert cli.main(["train", "--data", f"folder:{tmp_path / 'img'}", "--batch-size", "8", "--epochs", "1",
                     "--image-size", "16", "--out", str(tmp_path / "run")]) == 0
    for total in range(1, 40):  # every short run steps through its whole schedule
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = lr_schedule(opt, 0.1, total)
        for _ in range(total):
            opt.step()
            sched.step()


@pytest.mark.parametrize("data", ["digits", "folder"])
def test_an_interrupted_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    """By default only the restructured model trains. A run killed between epochs (here inside the
    second epoch's evaluation, after the first epoch's checkpoint) and resumed ends with the same
    weights, bitwise, as the run that was not interrupted; also on an image folder decoded and
    augmented in two worker processes (each image's crop seeded by run seed, epoch and index)."""
    import bnff.train as train_mod

    args = ["train", "--epochs", "2", "--batch-size", "16", "--limit-batches", "2"]
    if data == "folder":
        from test_folder_data import _folder
        args += ["--data", f"folder:{_folder(tmp_path / 'images', per_class=16)}", "--workers", "2", "--image-size", "16"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    assert list(whole["runs"]) == ["bnff"] and whole["epoch"] == 2
    calls = {"n": 0}
    evaluate = train_mod._evaluate

    def dies_in_epoch_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(train_mod, "_evaluate", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(train_mod, "_evaluate", evaluate)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert cli.main([*args, "--resume", str(tmp_path / "cut" / "checkpoint.pt")]) == 0
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["runs"]["bnff"]
    m_cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())["runs"]["bnff"]
    assert m_whole["loss"] == m_cut["loss"] and m_whole["test_accuracy"] == m_cut["test_accuracy"]
    # different settings are refused with the setting named
    assert cli.main([*args[:4], "8", *args[5:], "--resume", str(tmp_path / "cut" / "checkpoint.pt")]) == 2


def test_two_processes_with_sync_bn_train_like_one_on_the_whole_batch(tmp_path):
    """``bnff train --nproc-per-node 2 --sync-bn`` (torchrun's launcher, two real processes, DDP,
    DistributedSampler) with 8 images per process ends with the weights of one process trained on
    16 images per step: the sampler splits each 16-image batch between the ranks, the synchronized
    BN normalizes over both halves and DDP averages the gradients. Without --sync-bn (the control)
    each process normalizes its own half and the weights drift apart by orders of magnitude more.
    No augmentation, so no random draw differs between the runs."""
    common = ["train", "--epochs", "1", "--limit-batches", "3", "--image-size", "12", "--augment", "none"]
    assert cli.main([*common, "--batch-size", "16", "--out", str(tmp_path / "one")]) == 0
    for name, extra in (("sync", ["--sync-bn", "--compare"]), ("plain", [])):
        assert cli.main([*common, "--batch-size", "8", "--nproc-per-node", "2", *extra,
                         "--out", str(tmp_path / name)]) == 0
    one, sync, plain = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("one", "sync", "plain"))
    assert sync["processes"] == 2 and sync["config"]["sync_bn"] and list(sync["runs"]) == ["eager", "bnff"]
    metrics = json.loads((tmp_path / "sync" / "metrics.json").read_text())
    assert metrics["global_batch_size"] == 16 and metrics["fusion"].startswith("20 of 20 BatchNorm layers fused")

    def drift(ckpt):
        sd = ckpt["state_dict"]
        return max(((sd[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)).item()
                   for k, v in one["state_dict"].items() if v.is_floating_point())

    assert drift(sync) < 1e-3 * drift(plain), (drift(sync), drift(plain))
    # bnff's fused synchronized BN and its unfused one (the --compare eager copy) agree as closely
    eager, fused = sync["runs"]["eager"]["model"], sync["runs"]["bnff"]["model"]
    assert max((eager[k].double() - fused[k].double()).abs().max().item() for k in eager
               if eager[k].is_floating_point()) < 1e-3 * drift(plain)
    # a usage error in the processes ends the launcher with the same exit code as in one process
    assert cli.main([*common, "--nproc-per-node", "2", "--data", f"folder:{tmp_path / 'missing'}"]) == 2


def test_conv_floor_takes_libxsmm_where_it_is_faster(gen, monkeypatch):
    """The conv floor runs each convolution's forward and backward on the faster of ATen and libxsmm: with
    libxsmm timed faster, a 1x1 convolution of stride 1 runs both there (the kernel counters prove it), a 3x3
    stays on ATen; with ATen faster, nothing runs on libxsmm."""
    import functools

    from bnff import bench
    from bnff.ops import pointwise
    from bnff.ops.backends import cpu
    if cpu.pointwise_why(torch.float32) is not None:
        pytest.skip(cpu.pointwise_why(torch.float32))
    calls = [bench._ConvCall((2, 8, 6, 6), (16, 8, 1, 1), torch.float32, (1, 1), (0, 0), (1, 1), 1, False, True, True),
             bench._ConvCall((2, 16, 6, 6), (8, 16, 3, 3), torch.float32, (1, 1), (1, 1), (1, 1), 1, False, True)]
    for xsmm_faster in (True, False):
        monkeypatch.setattr(pointwise, "fastest",
                            lambda run: (0.0 if xsmm_faster else 2.0) if isinstance(run, functools.partial) else 1.0)
        step, on = bench._floor_step(calls, torch.channels_last, gen)
        before = cpu.kernel_calls()
        step()
        ran = cpu.kernel_calls() - before
        n = int(xsmm_faster)
        assert on == {"convolutions": 2, "forward": n, "backward": n}
        assert ran["pointwise/nhwc/float32"] == ran["pointwise_backward/nhwc/float32"] == n


def test_bench_bnff_libxsmm_variant(monkeypatch):
    from bnff import bench
    from bnff.ops.backends import cpu
    if cpu.pointwise_why(torch.float32) is not None:
        with pytest.raises(ValueError, match="the bnff_libxsmm variant needs libxsmm"):
            bench.run(bench.BenchConfig(variants=("bnff_libxsmm",)), progress=False)
        return
    from bnff.ops import pointwise
    cfg = bench.BenchConfig(model="mobilenet_v2", batch=2, image_size=32, dtype="fp32", steps=1, warmup=1,
                            variants=("bnff_libxsmm",))
    mode, before = pointwise.MODE, cpu.kernel_calls()
    bench.run(cfg, progress=False)
    assert (cpu.kernel_calls() - before)["pointwise/nhwc/float32"] > 0  # its 1x1 convolutions ran on libxsmm
    assert pointwise.MODE == mode  # and only in its own steps
    res = bench.run(bench.BenchConfig(**{**cfg.__dict__, "variants": ("bnff", "bnff_libxsmm")}), progress=False)
    assert res["ratios"]["bnff_vs_bnff_libxsmm"] == pytest.approx(
        res["results"]["bnff_libxsmm"]["step_s"] / res["results"]["bnff"]["step_s"])
    monkeypatch.setattr(cpu, "pointwise_why", lambda dtype=None: "libxsmm was not found")
    with pytest.raises(ValueError, match="needs libxsmm: libxsmm was not found"):
        bench.run(bench.BenchConfig(variants=("bnff_libxsmm",)), progress=False)


def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    """--device cuda where torch sees no CUDA device, and bench's CPU-only variants on a GPU, are refused
    with what to run instead (exit 2), before any training."""
    assert cli.main(["train", "--device", "cuda", "--limit-batches", "1", "--epochs", "1"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cuda", "--model", "resnet18", "--variants", "eager", "conv_floor"]) == 2
    assert "conv_floor time CPU kernels" in capsys.readouterr().err
    assert cli.main(["train", "--device", "tpu", "--limit-batches", "1"]) == 2


def test_fp16_trains_with_a_gradient_scaler(tmp_path):
    """--dtype fp16: autocast to float16 with PyTorch's GradScaler, whose state the checkpoint keeps (a
    resumed run continues with its loss scale); eager and bnff take the same first step."""
    out = tmp_path / "fp16"
    rc = cli.main(["train", "--compare", "--dtype", "fp16", "--epochs", "1", "--batch-size", "4", "--image-size", "16",
                   "--limit-batches", "1", "--lr", "0.01", "--backend", "reference", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert abs(runs["bnff"]["loss"][0] - runs["eager"]["loss"][0]) < 1e-2 * runs["eager"]["loss"][0]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["runs"]["bnff"]["scaler"]["scale"] > 0 and state["config"]["device"] == "cpu"
