"""Which epoch is best, and how long to train: the rules every training run here follows.

An epoch is judged on validation by its task kind's metric (``runtime.tasks``: entity F1 for
BIO-tagged token classification, accuracy for classification, -MSE for regression, micro-F1 for
multi-label) with ties broken by the validation loss. On small data the accuracy can sit at
the majority class for epochs while the loss is still falling; counted as a tie, that stopped
runs before they had learned anything. The loss breaks the tie, so such an epoch counts as
progress.

A run also takes at least ``min_steps`` optimizer steps: ``epochs`` is raised for data too
small to reach them (500 rows at batch 32 give 16 steps an epoch), and early stopping waits
until they are done. Large data is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .runtime.tasks import kind


def selection_key(metrics: dict[str, float], task: str) -> tuple[float, float]:
    """``(metric, -loss)`` of one validation pass of a ``task`` model: larger is better, compared as a tuple."""
    return kind(task).score(metrics), -metrics["loss"]


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)


def planned_epochs(epochs: int, rows: int, batch_size: int, min_steps: int) -> int:
    """``epochs``, or more when that many epochs of ``rows`` take fewer than ``min_steps`` steps."""
    return max(epochs, math.ceil(min_steps / steps_per_epoch(rows, batch_size)))


def should_stop(bad_epochs: int, patience: int, steps_done: int, min_steps: int) -> bool:
    """Early stopping: ``patience`` epochs without a better selection key, after ``min_steps``."""
    return bad_epochs >= patience and steps_done >= min_steps


@dataclass
class EpochLog:
    """A run's validation history and its best epoch so far, by :func:`selection_key`.

    ``keep`` is called only when an epoch is the best so far; what it returns (e.g. a copy of
    the trained weights) is held as ``best``, so a caller restores the chosen epoch from it."""

    task: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_key: tuple[float, float] | None = None
    best: Any = None
    bad_epochs: int = 0  # epochs since the best one

    def judge(self, metrics: dict[str, float], keep: Callable[[], Any]) -> bool:
        """Record one validation pass; True (and ``best = keep()``) when it is the best so far."""
        self.history.append(metrics)
        key = selection_key(metrics, self.task)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best, self.bad_epochs = key, keep(), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def best_metrics(self) -> dict[str, float] | None:
        return max(self.history, key=lambda m: selection_key(m, self.task)) if self.history else None

    def should_stop(self, patience: int, steps_done: int, min_steps: int) -> bool:
        return should_stop(self.bad_epochs, patience, steps_done, min_steps)
