"""The fetched tasks of ``benchmarks/tasks.py``: where they are, which rows a run keeps, the backbones.

``scripts/fetch_tasks.py`` writes one folder per task under ``--data`` (fixed, seeded,
de-duplicated train / validation / test JSONL plus ``task.json``, the task kind and labels). A
run keeps all training rows or a seeded sample (``--train-rows``, the same rows for every
method), the first ``--val-rows`` validation rows, and the whole test split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("tweets", "rotten-tomatoes", "wnut16", "vader-movies")
BACKBONES = ("minilm", "mpnet")
MPNET_DIR = "backbones/all-mpnet-base-v2"
SPLITS = ("train", "validation", "test")


def backbone_path(name: str, data: str) -> str:
    """The local folder of backbone ``name``: the bundled MiniLM, or mpnet as fetched under ``data``."""
    from mpismoe_edge.model import default_backbone_path

    if name == "minilm":
        return default_backbone_path()
    path = Path(data) / MPNET_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not there; run scripts/fetch_tasks.py first")
    return str(path)


def kept_rows(n: int, seed: int, train_rows: int | None) -> list[int]:
    """The training rows a run keeps: all, or a seeded sample of ``train_rows`` (in file order)."""
    return sorted(random.Random(seed).sample(range(n), train_rows)) if train_rows and train_rows < n else list(range(n))


def load_task(data: str, name: str, seed: int, train_rows: int | None = None, val_rows: int | None = None):
    """(task.json, train, validation, test) of task ``name``; ``train_rows`` seeded-subsamples the
    training rows, ``val_rows`` keeps the first validation rows; the test split stays whole."""
    from mpismoe_edge.data import load_file

    folder = Path(data) / name
    if not (folder / "task.json").is_file():
        raise FileNotFoundError(f"{folder}/task.json: not there; run scripts/fetch_tasks.py first")
    info = json.loads((folder / "task.json").read_text())
    kw = {"task": info["task"], "labels": info["labels"] or None}
    train, val, test = (load_file(folder / f"{s}.jsonl", **kw) for s in SPLITS)
    train = train.subset(kept_rows(len(train), seed, train_rows))
    if val_rows:
        val = val.subset(list(range(min(val_rows, len(val)))))
    return info, train, val, test


def write_split_files(
    data: str, task: str, seed: int, train_rows: int | None, val_rows: int | None, out: Path
) -> list[Path]:
    """train / validation / test JSONL under ``out`` holding exactly the rows :func:`load_task`
    keeps (the lines copied), for a command that reads files (``mpismoe-train``)."""
    folder = Path(data) / task
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        lines = [
            line for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()
        ]  # not splitlines(): U+2028 may sit inside a string
        keep = (
            kept_rows(len(lines), seed, train_rows)
            if split == "train"
            else list(range(min(val_rows, len(lines))))
            if split == "validation" and val_rows
            else range(len(lines))
        )
        paths.append(out / f"{split}.jsonl")
        paths[-1].write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return paths
