"""An interrupted benchmark run's state: written after each epoch, read back by a later run.

A benchmark run of hours on a shared machine outlives its session only if it can stop between
epochs and go on, as ``mpismoe-train --resume`` does. The training loops of the peers
(``peer_training``) and of side networks on cached states (``side_probe``) write their parts
here after each epoch, with the settings that shaped those epochs; a later run continues from it
only with the same settings. Tensors are stored as they are (not copied) and streamed to disk
(``files.save_torch(buffered=False)``), and read back memory-mapped, so a full fine-tuning's
optimizer state does not sit in memory twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mpismoe_edge.files import remove_leftover_temps, save_torch
from mpismoe_edge.selection import EpochLog

STATE_FILE = "state.pt"  # its name in the run's folder


def read_state(path: str | Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The parts a run with ``settings`` left in ``path`` (None if there is none); ValueError
    naming both settings if it was made with others. ``parts["log"]`` is the :class:`EpochLog`.
    A run's start: the temp files of a write killed mid-way (up to a full fine-tuning's size) go."""
    path = Path(path)
    remove_leftover_temps(path)
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if saved.get("settings") != settings:
        raise ValueError(f"{path} was made with {saved.get('settings')}, not {settings}; delete it to start over")
    return {**{k: v for k, v in saved.items() if k != "settings"}, "log": EpochLog(**saved["log"])}


def write_state(path: str | Path, settings: dict[str, Any], log: EpochLog, **parts: Any) -> None:
    """Write ``log`` and ``parts`` (state dicts, counters, ``torch.random.get_rng_state()``) for
    :func:`read_state`, whole or not at all."""
    # not dataclasses.asdict(log): it deep-copies the best epoch's weights
    fields = {"task": log.task, "history": log.history, "best_key": log.best_key, "best": log.best,
              "bad_epochs": log.bad_epochs}  # fmt: skip
    save_torch(path, {"settings": settings, "log": fields, **parts}, buffered=False)
