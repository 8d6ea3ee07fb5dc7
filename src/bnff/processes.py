"""Training in several processes: launching them (``torchrun``'s launcher), joining their process
group, and the few collectives ``bnff train`` needs beside DistributedDataParallel's own.

``bnff train --nproc-per-node N`` re-runs the same command line under ``torch.distributed.run``
(torchrun, standalone rendezvous on this machine); ``torchrun ... -m bnff train ...`` does the same
by hand, across machines too. Each process then finds ``RANK``/``WORLD_SIZE`` in its environment
and :func:`joined` initializes the gloo process group from it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for the other processes before failing (a rank that died or hangs
ends the run with an error instead of blocking the others forever)."""


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes: ``rank`` in ``0 .. world - 1``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Processes:
        """The default process group's rank and size, or a single process when none is initialized."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """True on rank 0, the process that logs and writes the run folder."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64 all-reduce; local values when alone)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum of ``values`` over all processes."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: Sequence[float], op) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        # NCCL reduces only tensors on the process's GPU
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def barrier(self) -> None:
        """Wait until every process gets here (no-op when alone)."""
        if self.world > 1:
            dist.barrier()


def launched() -> bool:
    """True in a process started by torchrun (or ``bnff train --nproc-per-node``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def joined(backend: str = "gloo") -> Iterator[Processes]:
    """Initialize the default process group from torchrun's environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) for the duration of the block, and destroy it after;
    outside torchrun, or with one process, nothing is initialized. ``backend``: "gloo" (CPU tensors) or
    "nccl" (training on GPUs: ``bnff train --device cuda``).

    Raises:
        RuntimeError: from ``init_process_group`` when the rendezvous fails within :data:`TIMEOUT`.
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        yield Processes.current()
        return
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield Processes.current()
    finally:
        dist.destroy_process_group()


def launch(nproc_per_node: int, argv: Sequence[str]) -> int:
    """Run ``python -m bnff <argv>`` in ``nproc_per_node`` processes on this machine through
    torchrun's launcher (``torch.distributed.run``, standalone rendezvous on a free local port).
    Returns 0 when every process succeeded, else the exit code of the first process that failed
    (2 for a usage error, as in one process; 1 when it died of a signal). torchrun has already
    printed the failing rank's error and stopped the others."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}",
                                         "--module", "bnff", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return codes[0] if codes and codes[0] > 0 else 1
    return 0


__all__ = ["Processes", "TIMEOUT", "joined", "launch", "launched"]
