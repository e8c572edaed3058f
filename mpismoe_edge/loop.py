"""The one training loop: the order of batches and an epoch of optimizer steps.

``train()`` (the side network on a live backbone), the full fine-tuning and LoRA peers of the
benchmarks (``benchmarks/peer_training.py``) and ``benchmarks/side_probe.py`` (the side network
on cached backbone states) all run their epochs through :func:`train_epoch`; they differ only in what ``forward``
does with a batch's inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .device import autocast
from .distributed import World, all_sum
from .runtime.tasks import kind


@dataclass
class Batch:
    """A batch as ``forward`` takes it, the loss's targets, and this rank's weight (0 for a rank
    that has no rows of this global batch and only keeps the gradient reduction in step)."""

    inputs: Any
    target: torch.Tensor
    weight: float = 1.0


def batch_order(lengths: list[int], size: int, seed: int, window: int = 32) -> list[list[int]]:
    """Shuffled batches of similar-length rows (less padding): shuffle, sort windows of
    ``window`` batches by length, cut into batches, shuffle the batches. Deterministic."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), size * window):
        chunk = sorted(order[w : w + size * window], key=lambda i: lengths[i])
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


def train_epoch(
    forward: Callable[[Any], torch.Tensor],
    batches: Iterable[Batch],
    opt: torch.optim.Optimizer,
    sched,
    params: list[torch.nn.Parameter],
    task: str,
    *,
    aux_loss: Callable[[], torch.Tensor] | None = None,
    grad_clip: float | None = 1.0,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    world: World = World(),
    after_step: Callable[[], Any] | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> float:
    """One pass of optimizer steps over ``batches``; returns the mean task loss of the steps
    (this rank's rows).

    Each step's loss is the global batch's mean: this rank's summed loss over the scored count
    of all ranks, times the number of ranks (DistributedDataParallel averages the gradients),
    plus ``aux_loss()`` (the MoE's balance losses of this forward) averaged over the ranks with
    rows. With one process that is the batch's mean loss plus the auxiliary loss."""
    losses = []
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    for b in bar:
        with autocast(device, precision):
            logits = forward(b.inputs)
        total, count = kind(task).loss_sum(logits, b.target.to(logits.device))
        weight = torch.tensor([b.weight * float(count), b.weight], dtype=torch.float64)
        if world.size > 1:
            weight = all_sum(weight)
        loss = total / max(weight[0].item(), 1.0) * (b.weight * world.size)  # one process: total / count, the mean
        if aux_loss is not None:
            loss = loss + aux_loss().to(loss.device) * (b.weight * world.size / max(weight[1].item(), 1.0))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(total.item() / max(float(count), 1.0))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return sum(losses) / max(len(losses), 1)
