"""The training loop of a peer that ``mpismoe-train`` does not train (full fine-tuning, LoRA).

It follows ``mpismoe-train``'s rules with its parts: batches in ``loop.batch_order``'s order
(seed ``seed * 1000 + epoch``), ``loop.train_epoch`` with the task kind's targets and loss,
``make_optimizer``'s AdamW and schedule, at least ``min_steps`` steps (``planned_epochs``), each
epoch judged on validation by ``selection.EpochLog`` (the metric, then -loss) and ``patience``
epochs without a better one stopping it once the minimum steps are done. What is kept of the best
epoch is the caller's ``keep``: a copy of the trained weights (:func:`trainable_state`) to
restore, or the test score taken at that epoch. With ``state`` the run writes its state after
each epoch (weights, optimizer, schedule, validation log, random state) and a later call with the
same settings continues from it, as ``mpismoe-train --resume`` does: a run of hours on a shared
machine survives the end of its session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.run_state import read_state, write_state
from mpismoe_edge.inference import feed, token_lengths, tokenize
from mpismoe_edge.loop import Batch, batch_order, train_epoch
from mpismoe_edge.memory import release_free_pages
from mpismoe_edge.runtime.tasks import kind
from mpismoe_edge.selection import EpochLog, planned_epochs, steps_per_epoch
from mpismoe_edge.train import TrainConfig, make_optimizer


def batch(tok, data, idx: list[int], task: str, names: list[str], device=None) -> Batch:
    """Rows ``idx`` of ``data`` as a training step takes them: the model's inputs and the loss's targets."""
    encs = tokenize(tok, [data.texts[j] for j in idx])
    return Batch(feed(tok, encs, names, device), kind(task).targets(encs, [data.targets[j] for j in idx], data.labels))


def trainable_state(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (``load_state_dict(..., strict=False)`` restores them);
    without ``copy`` the tensors themselves, for a write that happens before the next step."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() if copy else v for k, v in model.state_dict().items() if k in keys}


@dataclass
class Fit:
    log: EpochLog  # validation per epoch; ``best``: what ``keep`` returned at the chosen epoch
    epoch: int  # the chosen epoch (1-based)
    epoch_seconds: list[float]  # each trained epoch's steps
    resumed: int = 0  # epochs trained by an earlier call, read from ``state``

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)


def fit(model, tok, task: str, train, validate: Callable[[], dict[str, float]], keep: Callable[[], Any], *,
        lr: float, epochs: int, batch_size: int, seed: int, patience: int, min_steps: int,
        device: torch.device = torch.device("cpu"), precision: str = "fp32",
        after_step: Callable[[], Any] | None = release_free_pages, state: str | Path | None = None) -> Fit:  # fmt: skip
    """Train ``model``'s trainable parameters on ``train``; ``validate()`` scores an epoch (the
    task's metrics and ``loss``), ``keep()`` is held as ``log.best`` when an epoch is the best;
    ``state``: the file each epoch's state is written to and a run continues from."""
    params = [p for p in model.parameters() if p.requires_grad]
    planned = planned_epochs(epochs, len(train), batch_size, min_steps)
    per_epoch = steps_per_epoch(len(train), batch_size)
    opt, sched = make_optimizer(params, TrainConfig(lr=lr), planned * per_epoch)
    lengths = token_lengths(tok, train.texts)
    log, chosen, seconds, first = EpochLog(task), 0, [], 0
    settings = {"task": task, "rows": len(train), "lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                "patience": patience, "min_steps": min_steps, "precision": precision}  # fmt: skip
    saved = read_state(state, settings) if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.random.set_rng_state(saved["rng"])
        log, chosen, seconds, first = saved["log"], saved["chosen"], saved["seconds"], len(saved["seconds"])
        del saved
    for epoch in range(first, planned):
        if log.should_stop(patience, epoch * per_epoch, min_steps):
            break
        model.train()
        start = time.perf_counter()
        steps = (
            batch(tok, train, idx, task, model.input_names, device)
            for idx in batch_order(lengths, batch_size, seed * 1000 + epoch)
        )
        train_epoch(
            lambda inputs: model(**inputs), steps, opt, sched, params, task,
            grad_clip=1.0, device=device, precision=precision, after_step=after_step, progress=False,
        )  # fmt: skip
        seconds.append(time.perf_counter() - start)
        if log.judge(validate(), keep):
            chosen = epoch + 1
        if state is not None:
            write_state(
                state, settings, log, model=trainable_state(model, copy=False), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), rng=torch.random.get_rng_state(), chosen=chosen, seconds=seconds,
            )  # fmt: skip
    return Fit(log, chosen, seconds, first)
