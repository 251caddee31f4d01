"""Just enough of ``torch.distributed`` for data-parallel training launched by ``torchrun``.

``torchrun --nproc-per-node=W ...`` (on one machine, or on each of ``--nnodes`` machines) sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
[`setup`][settransformer.training.distributed.setup] reads them, joins the process group (NCCL on CUDA, Gloo
on CPU) and picks this process's device (``cuda:LOCAL_RANK``). Without them (or with ``WORLD_SIZE=1``)
everything is a no-op.

How the training loop uses it ([`settransformer.training.loop`][settransformer.training.loop]): every rank
draws the same global batch from the same seeded generator and keeps its contiguous share
([`shard`][settransformer.tasks.base.Batch.shard]), DistributedDataParallel averages the gradients, and
rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Distributed", "is_main_process", "launched_world_size", "resolve_device", "setup"]


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a plain process (usable before
    [`setup`][settransformer.training.distributed.setup])."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_world_size() -> int:
    """The processes of a ``torchrun`` job (``WORLD_SIZE``), 1 for a plain process (usable before
    [`setup`][settransformer.training.distributed.setup])."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for but CUDA is not available (use cpu or auto)")
    return device


@dataclass
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar tensor over all processes (every rank must call it)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def any_rank(self, value: int) -> int:
        """The largest of every rank's ``value`` (every rank must call it): a flag any rank may
        raise, e.g. a signal to stop. Exchanged on the CPU (a Gloo group beside NCCL's), so asking
        every step never waits for the GPU."""
        if not self.enabled:
            return value
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL)
        return int(flag.item())

    def gather(self, obj: Any) -> list[Any]:
        """One picklable object from every rank, in rank order (every rank must call it)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self, wait: bool = True) -> None:
        """End this process's part in one training run: a barrier, unless it leaves because of an
        error. The process group stays for the next run in this process (a script or ``reproduce``
        may train several: ranks reach the next ``setup`` at different times, and a group made again
        for each run could pair a late rank with an earlier run's rendezvous); it is destroyed when
        the process exits."""
        if self.enabled and dist.is_initialized() and wait:
            dist.barrier()


def setup(device: str) -> Distributed:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    Example (a plain process: a one-process "job", nothing to join):
        >>> ctx = setup("cpu")
        >>> ctx.rank, ctx.world_size, ctx.is_main, ctx.gather("mine")
        (0, 1, True, ['mine'])
        >>> ctx.close()
    """
    world_size = launched_world_size()
    resolved = resolve_device(device)
    if world_size <= 1:
        return Distributed(0, 1, resolved)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: launch with torchrun "
            "(torchrun --nproc-per-node N -m settransformer ...)"
        )
    rank = int(os.environ["RANK"])
    if resolved.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "start at most that many processes per node (--nproc-per-node)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    global _CONTROL
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        atexit.register(_leave)
    if _CONTROL is None and dist.get_backend() != "gloo":
        _CONTROL = dist.new_group(backend="gloo")
    return Distributed(rank, world_size, resolved)


_CONTROL: Any = None
"""A Gloo group for [`Distributed.any_rank`][settransformer.training.distributed.Distributed.any_rank]
when the default group is not Gloo (NCCL reduces only GPU tensors); ``None``: the default group."""


def _leave() -> None:
    """Destroy the process group at exit (registered by the ``setup`` that made it)."""
    global _CONTROL
    if dist.is_initialized():
        _CONTROL = None
        dist.destroy_process_group()
