"""What ``last.pt`` holds and when a later run may continue from it (``mpismoe-train --resume``).

``last.pt`` records the settings its run was made with: the model's config and the training
config's fields that shape its epochs (everything but where it runs, how fast, and for how long:
a resumed run may train for more epochs, its schedule stretched to the new end). A run resumes
only with the same settings, and otherwise stops naming the first setting that differs: a run
whose epochs were trained under different settings would be neither one nor the other. The file
is read before the backbone is loaded or quantized, so a wrong or corrupt file costs no work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, TrainConfig
from .files import save_torch

# TrainConfig fields that may change between the parts of one run: where, how fast, for how long
FREE_SETTINGS = ("threads", "return_freed_memory", "device", "eval_batch_size", "epochs", "min_steps", "patience")
_KEYS = ("settings", "side", "optimizer", "scheduler", "progress")


def run_settings(config: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote ``last.pt``."""
    model = config.to_dict()
    model.pop("backbone_config")  # read from the backbone folder, which ``backbone`` names
    return {"model": model, "train": {k: v for k, v in cfg.to_dict().items() if k not in FREE_SETTINGS}}


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def read_last(path: str | Path, settings: dict[str, Any], map_location: str | torch.device = "cpu") -> dict | None:
    """The training state in ``path`` (None if there is none); ValueError if it is not one, or
    was made with other settings than ``settings`` (:func:`run_settings`)."""
    path = Path(path)
    if not path.is_file():
        return None
    advice = "delete it to start over, or train into another -o"
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a zip, not torch's format, a pickle of code
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__  # its first sentence
        raise ValueError(f"{path} is not a readable training state ({reason}); {advice}") from None
    if not isinstance(saved, dict) or not set(_KEYS) <= set(saved):
        raise ValueError(f"{path} is not a training state written by this version of mpismoe-train; {advice}")
    found = _first_difference(saved["settings"], settings)
    if found:
        key, old, new = found
        raise ValueError(
            f"{path} was made with {key}={old!r}, this run has {key}={new!r}: "
            f"resume with the settings it was made with, or {advice}"
        )
    return saved


def write_last(
    path: str | Path,
    settings: dict[str, Any],
    side: dict,
    optimizer: dict,
    scheduler: dict,
    progress: dict,
    scaler: dict | None = None,
) -> None:
    """Write the state of the last finished epoch, whole or not at all (files.py)."""
    saved = {"settings": settings, "side": side, "optimizer": optimizer, "scheduler": scheduler, "progress": progress}
    if scaler is not None:
        saved["scaler"] = scaler
    save_torch(path, saved)
