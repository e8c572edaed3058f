"""Data-parallel training on torch.distributed: the process group, batch sharding, sums across ranks.

A run launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins its process group
here: gloo on the CPU, NCCL on CUDA. Every rank builds the same model from the same seed and
draws the same global batch order; :func:`shard` gives each rank its own rows of every global
batch and a loss scale that makes the ranks' averaged gradient the gradient of the whole batch's
mean loss (what one process would compute on that batch). Only the side network is wrapped in
``DistributedDataParallel``: the backbone has no gradients to reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and progress."""
        return self.rank == 0


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE`` from torchrun; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def join(device: torch.device) -> World:
    """This process's :class:`World`; joins the launcher's process group first when there is one
    (NCCL for CUDA devices, gloo otherwise) and is not yet joined."""
    if not dist.is_available() or (not dist.is_initialized() and launched_world_size() == 1):
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(rows: list[int], world: World) -> tuple[list[int], float]:
    """This rank's rows of a global batch (``rows[rank::size]``) and its weight: 1, or 0 for a
    rank left without rows (it runs the first row so that every rank takes part in the
    gradient reduction, and adds nothing)."""
    mine = rows[world.rank :: world.size]
    return (mine, 1.0) if mine else (rows[:1], 0.0)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the process group (a copy; ``t`` itself if there is no group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out)
    return out.to(t.device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` when there are several ranks (parameters
    broadcast from rank 0), else itself. Every trainable parameter gets a gradient in every
    step, so DDP does not search the graph for unused ones: the experts of a layer run as one
    stacked computation (``side/moe.py``), and an expert no token picked gets a zero gradient."""
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
