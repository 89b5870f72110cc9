"""Process-group set-up for ``torchrun`` (DDP): gloo on CPU, nccl on CUDA.

``torchrun --nproc_per_node N -m kpfast.train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them. A
plain ``python -m kpfast.train`` is a world of one and touches nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    """Where this process sits: ``rank`` of ``size`` processes, its ``device``."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """True iff ``flag`` is True on every rank (a collective: call it on all ranks)."""
        if not self.distributed:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def average_gradients(self, params) -> None:
        """Replace each gradient of ``params`` (those that have one) by its mean over the processes
        (a collective: call it on all ranks with the same parameters), in one flat reduction."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (normalization statistics) of ``module`` on every rank, as DDP does."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> World:
    """Join the process group described by the ``torchrun`` environment, if any.

    ``device``: ``"auto"`` (CUDA ``LOCAL_RANK`` when available, else CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if use_cuda:
        dev = torch.device(device if ":" in device else f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    here = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=size)
        here = True
    return World(rank=rank, size=size, local_rank=local_rank, device=dev, initialized_here=here)
