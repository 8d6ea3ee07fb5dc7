"""Synchronized BN in the fused form (issue 18, first part): two real processes (gloo) training a
restructured ``nn.SyncBatchNorm`` model match one process of eager PyTorch on the concatenated
mini-batch, in float64, exactly; plain BatchNorm2d under the same setup does not (the control).

The ranks get data of clearly different distributions. Gradients are averaged over the ranks by
DistributedDataParallel itself, or by an all-reduce as DDP does."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnff
import bnff.modules
from helpers import FLOAT64_BOUND, rel_err

STEPS = 2


class _Net(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> add -> ReLU -> conv -> BN -> ReLU -> pool -> fc: a lone BN,
    a residual sum and a head, every one fused."""

    def __init__(self, scaled_b3_input: bool = False) -> None:
        super().__init__()
        self.scaled = scaled_b3_input  # b3 then normalizes conv * 0.5, which bnff does not fuse
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        a = torch.relu(self.b2(self.c2(a)) + a)
        a = torch.relu(self.b3(self.c3(a) * 0.5 if self.scaled else self.c3(a)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1))


def _batches(sizes: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """Per step, per rank: inputs of a different mean and scale on each rank."""
    g = torch.Generator().manual_seed(7)
    return [[torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * (1 + 2 * r) + 3 * r for r, n in enumerate(sizes)]
            for _ in range(STEPS)]


def _train(model: nn.Module, xs: list[torch.Tensor], reduce=None) -> list[dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x in xs:
        opt.zero_grad()
        y = model(x)
        (y * y).mean().backward()
        if reduce is not None:
            reduce(model)
        out.append({"y": y.detach().clone(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "buffers": {n: b.clone() for n, b in model.named_buffers()}})
        opt.step()
    return out


def _unwrapped(steps: list[dict]) -> list[dict]:
    """The steps' gradients and buffers named without DDP's "module." prefix."""
    for st in steps:
        for key in ("grads", "buffers"):
            st[key] = {k.removeprefix("module."): v for k, v in st[key].items()}
    return steps


def _worker(rank: int, world: int, store: str, outdir: str, sizes: tuple[int, ...], sync: bool, ddp: bool | str = False,
            unfused: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        net = _Net(unfused).double()
        if sync:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = bnff.restructure(net, backend="reference")

        def average(m: nn.Module) -> None:  # what DDP does to gradients
            for p in m.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world

        xs = [step[rank] for step in _batches(sizes)]
        report = bnff.fusion_report(model)
        wrapped = None
        if ddp == "no_sync":  # two micro-batches per step: the first accumulates without all-reducing
            wrapped = nn.parallel.DistributedDataParallel(model)
            with wrapped.no_sync():
                y0 = wrapped(xs[0])
                (y0 * y0).mean().backward()
            y1 = wrapped(xs[1])
            (y1 * y1).mean().backward()
            steps = _unwrapped([{"y": torch.cat([y0, y1]).detach(),
                                 "grads": {n: p.grad.clone() for n, p in wrapped.named_parameters()},
                                 "buffers": {n: b.clone() for n, b in wrapped.named_buffers()}}])
        elif ddp:
            wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=ddp == "find_unused")
            steps = _unwrapped(_train(wrapped, xs))
        else:
            steps = _train(model, xs, average)
        result = {"steps": steps, "fused": report.fused_bns, "unfused": [u.name for u in report.unfused_bns]}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        del wrapped, model, net
        dist.barrier()  # every rank done with its collectives (and DDP's reducer gone) before teardown
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sizes: tuple[int, ...], sync: bool, ddp: bool | str = False, unfused: bool = False) -> list[dict]:
    """Spawn one process per entry of ``sizes``; each run gets a folder and rendezvous file of its
    own (a file store left by an earlier group must not be joined again)."""
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    run.mkdir()
    mp.spawn(_worker, args=(len(sizes), str(run / "store"), str(run), sizes, sync, ddp, unfused),
             nprocs=len(sizes), join=True)
    return [torch.load(run / f"rank{r}.pt", weights_only=False) for r in range(len(sizes))]


def _eager(sizes: tuple[int, ...], scaled_b3_input: bool = False) -> list[dict]:
    torch.manual_seed(0)
    model = _Net(scaled_b3_input).double()
    return _train(model, [torch.cat(step) for step in _batches(sizes)])


def _errors(ranks: list[dict], ref: list[dict], sizes: tuple[int, ...]) -> dict[str, float]:
    worst = {"y": 0.0, "grads": 0.0, "buffers": 0.0}
    for s, want in enumerate(ref):
        start = 0
        for r, n in enumerate(sizes):
            got = ranks[r]["steps"][s]
            worst["y"] = max(worst["y"], rel_err(got["y"], want["y"][start:start + n]))
            start += n
            scale = max(g.abs().max().item() for g in want["grads"].values())
            worst["grads"] = max(worst["grads"], *(rel_err(got["grads"][k], g, floor=1e-2 * scale)
                                                 for k, g in want["grads"].items()))
            worst["buffers"] = max(worst["buffers"], *(rel_err(got["buffers"][k].double(), b.double(), floor=1.0)
                                                     for k, b in want["buffers"].items()))
    return worst


@pytest.mark.timeout(300)
def test_two_processes_of_synced_bn_match_one_process_on_the_whole_batch(tmp_path):
    sizes = (4, 4)
    ranks = _run(tmp_path, sizes, sync=True)
    assert ranks[0]["fused"] == ["b1", "b2", "b3"]  # every SyncBatchNorm fused
    errors = _errors(ranks, _eager(sizes), sizes)
    assert max(errors.values()) <= FLOAT64_BOUND, errors


@pytest.mark.timeout(300)
def test_plain_batchnorm_under_the_same_setup_does_not_match(tmp_path):
    """The control: per-process statistics differ from the whole batch's (the ranks' data differ)."""
    sizes = (4, 4)
    errors = _errors(_run(tmp_path, sizes, sync=False), _eager(sizes), sizes)
    assert errors["y"] > 1e-3 and errors["buffers"] > 1e-3, errors


@pytest.mark.timeout(300)
def test_uneven_batches_use_the_global_count(tmp_path):
    """3 and 5 samples: the first step's outputs and running statistics (unbiased over the global
    count of 8 samples) match the whole batch. (Gradients follow DDP's average of per-rank means,
    not the whole batch's mean, so later steps differ by design.)"""
    sizes = (3, 5)
    ranks, ref = _run(tmp_path, sizes, sync=True), _eager(sizes)
    first = [ranks[r]["steps"][0] for r in range(2)]
    assert rel_err(torch.cat([f["y"] for f in first]), ref[0]["y"]) <= FLOAT64_BOUND
    for f in first:
        for k, b in ref[0]["buffers"].items():
            assert rel_err(f["buffers"][k].double(), b.double(), floor=1.0) <= FLOAT64_BOUND, k


@pytest.mark.timeout(300)
def test_distributed_data_parallel_takes_the_restructured_model(tmp_path):
    """DistributedDataParallel (gloo, CPU) wraps the restructured SyncBatchNorm model, which PyTorch
    refuses for its own SyncBatchNorm on CPU, and averages the gradients itself."""
    sizes = (4, 4)
    errors = _errors(_run(tmp_path, sizes, sync=True, ddp=True), _eager(sizes), sizes)
    assert max(errors.values()) <= FLOAT64_BOUND, errors


@pytest.mark.timeout(300)
def test_an_unfused_sync_bn_runs_bnffs_synchronized_bn(tmp_path):
    """b3 normalizing a scaled convolution output is not fused: it is listed in the report and
    still normalizes over both processes' mini-batches (bnff.modules.SyncBatchNorm's own forward)."""
    sizes = (4, 4)
    ranks = _run(tmp_path, sizes, sync=True, unfused=True)
    assert ranks[0]["fused"] == ["b1", "b2"] and "b3" in ranks[0]["unfused"]
    errors = _errors(ranks, _eager(sizes, scaled_b3_input=True), sizes)
    assert max(errors.values()) <= FLOAT64_BOUND, errors


def test_without_a_process_group_it_is_batchnorm_and_keeps_its_state_dict():
    torch.manual_seed(0)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(_Net().double())
    keys = list(net.state_dict())
    plain = _Net().double()
    plain.load_state_dict(net.state_dict())
    model = bnff.restructure(net, backend="reference")
    assert type(net.b1) is bnff.modules.SyncBatchNorm and list(model.state_dict()) == keys
    assert bnff.fusion_report(model).fused_bns == ["b1", "b2", "b3"]
    x = _batches((4,))[0][0]
    assert rel_err(model(x), plain(x)) <= FLOAT64_BOUND
    assert rel_err(net.b1.running_var, plain.b1.running_var) <= FLOAT64_BOUND


@pytest.mark.timeout(300)
def test_ddp_no_sync_accumulation_and_find_unused_parameters(tmp_path):
    """``no_sync``: two micro-batches per rank, the first without all-reducing gradients, equal eager
    accumulating both whole micro-batches (each normalized over both ranks). ``find_unused_parameters``
    trains as without it."""
    sizes = (4, 4)
    ranks = _run(tmp_path, sizes, sync=True, ddp="no_sync")
    torch.manual_seed(0)
    eager = _Net().double()
    steps = _batches(sizes)
    ys = []
    for step in steps:  # both micro-steps' gradients accumulate; DDP averages over the 2 ranks
        y = eager(torch.cat(step))
        (y * y).mean().backward()
        ys.append(y.detach())
    for r in range(2):
        got = ranks[r]["steps"][0]
        want_y = torch.cat([ys[0][4 * r:4 * r + 4], ys[1][4 * r:4 * r + 4]])
        assert rel_err(got["y"], want_y) <= FLOAT64_BOUND
        scale = max(p.grad.abs().max().item() for p in eager.parameters())
        for n, p in eager.named_parameters():
            assert rel_err(got["grads"][n], p.grad, floor=1e-2 * scale) <= FLOAT64_BOUND, n
    errors = _errors(_run(tmp_path, sizes, sync=True, ddp="find_unused"), _eager(sizes), sizes)
    assert max(errors.values()) <= FLOAT64_BOUND, errors
