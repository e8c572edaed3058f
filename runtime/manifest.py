"""Read and check ``manifest.json`` of an exported model directory.

Directory layout written by ``mpismoe-export`` (Hugging Face's ONNX layout plus our manifest)::

    out/onnx/model.onnx     (optionally with external data, onnx/model.onnx.data; with
                             --ort-format also onnx/model.ort + onnx/required_operators.config)
    out/tokenizer.json      (Hugging Face ``tokenizers`` format)
    out/config.json, out/tokenizer_config.json, out/special_tokens_map.json  (for HF loaders)
    out/manifest.json       {"format": "mpismoe-edge-onnx/1", "task": ..., "labels": [...], ...}

Exports made before the Hugging Face layout hold ``out/model.onnx``; :func:`find_model` reads both.

Only the fields the runtime needs are read; the rest (bits per layer, sizes, parity...) is kept
in :attr:`Manifest.raw` for callers that want it.

A file of the export that cannot be used (not valid JSON, a truncated graph, a symlink that
leads out of the export folder) is an :class:`ExportFileError` naming it: a ``ValueError``, so
the command lines report it as one ``error: ...`` line with exit status 2, apart from a parity
check that ran and failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .spec import (
    BACKBONE_MODEL_FILE,
    DEFAULT_TARGET,
    FORMAT_MAJOR,
    FORMAT_PREFIX,
    LAYOUTS,
    MANIFEST_FILE,
    MODEL_FILE,
    MODEL_PATHS,
    MULTI_TASK,
    OUTPUT_NAME,
    TEXT_INPUTS,
    TOKENIZER_FILE,
    task_output,
)
from .tasks import TASKS

__all__ = [
    "ExportFileError",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "MANIFEST_FILE",
    "Manifest",
    "TaskHead",
    "find_model",
    "load_manifest",
    "parse_manifest",
    "check_inside",
    "require_file",
]


class ExportFileError(ValueError):
    """A file of an export folder is broken, foreign or leads outside the folder; the message names it."""


@dataclass(frozen=True)
class TaskHead:
    """One task of a multi-task export: its name, kind, labels, graph output and (split layout)
    its side graph, relative to the export folder."""

    name: str
    task: str
    labels: tuple[str, ...] | None
    output: str
    model: str | None = None


@dataclass(frozen=True)
class Manifest:
    task: str  # a kind of tasks.py, or MULTI_TASK (then ``tasks`` lists them)
    labels: tuple[str, ...] | None
    max_length: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    target: str
    opset: int | None
    raw: dict = field(repr=False, compare=False)
    tasks: tuple[TaskHead, ...] = ()  # a multi-task export's tasks; empty for one task
    layout: str = "merged"  # split: the backbone's graph (``backbone_model``) and one per task
    backbone_model: str | None = None


def require_file(path: Path, root: str | Path | None = None) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it; with ``root``
    (the export folder) also :func:`check_inside`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent} (expected file {path})")
    if root is not None:
        check_inside(path, root)
    return path


def check_inside(path: str | Path, root: str | Path) -> Path:
    """Return ``path`` unless it resolves (through symlinks) to a place outside the folder ``root``;
    then raise :class:`ExportFileError`. An export is a self-contained folder: a link out of it
    (``tokenizer.json -> /etc/passwd``) would make the runtime read whatever it points at."""
    path = Path(path)
    real, base = path.resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise ExportFileError(f"{path} leads outside the export folder {root} (to {real}); refusing to read it")
    return path


def find_model(model_dir: str | Path) -> Path:
    """The ONNX graph of an export directory: ``onnx/model.onnx``, or ``model.onnx`` of the old layout.

    The graph and every entry beside it (where ONNX Runtime looks for external data) must stay
    inside ``model_dir`` (:func:`check_inside`)."""
    model_dir = Path(model_dir)
    for rel in MODEL_PATHS:
        path = model_dir / rel
        if path.is_file():
            for entry in sorted(path.parent.iterdir()):
                check_inside(entry, model_dir)
            return path
    raise FileNotFoundError(f"{MODEL_FILE} not found in {model_dir} (expected file {model_dir / MODEL_PATHS[0]})")


def load_manifest(model_dir: str | Path) -> Manifest:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    path = require_file(model_dir / MANIFEST_FILE, model_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFileError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ExportFileError(f"{path} must hold a JSON object")
    return parse_manifest(raw, source=str(path))


def parse_manifest(raw: dict, source: str = "manifest") -> Manifest:
    fmt = raw.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise ValueError(f"{source}: 'format' must be '{FORMAT_PREFIX}{FORMAT_MAJOR}', got {fmt!r}")
    major = fmt[len(FORMAT_PREFIX) :].split(".")[0]
    if major != str(FORMAT_MAJOR):
        raise ValueError(f"{source}: unsupported format {fmt!r}; this runtime reads {FORMAT_PREFIX}{FORMAT_MAJOR}")

    task = raw.get("task", "classification")
    if task not in TASKS and task != MULTI_TASK:
        raise ValueError(f"{source}: 'task' must be one of {TASKS + (MULTI_TASK,)}, got {task!r}")

    labels = raw.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels:
            raise ValueError(f"{source}: 'labels' must be a non-empty list")
        labels = tuple(str(x) for x in labels)

    max_length = raw.get("max_length", 512)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"{source}: 'max_length' must be an integer >= 2, got {max_length!r}")

    inputs = raw.get("inputs", list(TEXT_INPUTS))
    outputs = raw.get("outputs", [OUTPUT_NAME])
    for key, val in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(val, list) or not val or not all(isinstance(x, str) for x in val):
            raise ValueError(f"{source}: '{key}' must be a non-empty list of names")

    opset = raw.get("opset")
    tasks: tuple[TaskHead, ...] = ()
    layout, backbone_model = "merged", None
    if task == MULTI_TASK:
        layout = raw.get("layout", "merged")
        if layout not in LAYOUTS:
            raise ValueError(f"{source}: 'layout' must be one of {LAYOUTS}, got {layout!r}")
        tasks = _task_heads(raw.get("tasks"), layout, outputs, source)
        if layout == "split":
            backbone_model = (raw.get("backbone") or {}).get("model") or f"onnx/{BACKBONE_MODEL_FILE}"
            if not isinstance(backbone_model, str):
                raise ValueError(f"{source}: 'backbone.model' must be a path")
    return Manifest(
        task=task,
        labels=labels,
        max_length=max_length,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        target=str(raw.get("target", DEFAULT_TARGET)),
        opset=opset if isinstance(opset, int) else None,
        raw=raw,
        tasks=tasks,
        layout=layout,
        backbone_model=backbone_model,
    )


def _task_heads(entries, layout: str, outputs: list, source: str) -> tuple[TaskHead, ...]:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{source}: a multi-task manifest needs 'tasks', a non-empty list of objects")
    heads = []
    for i, e in enumerate(entries):
        name, task = e.get("name"), e.get("task")
        where = f"{source}: tasks[{i}]"
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        if task not in TASKS:
            raise ValueError(f"{where} ({name}): 'task' must be one of {TASKS}, got {task!r}")
        output = e.get("output", task_output(name))
        if output not in outputs:
            raise ValueError(f"{where} ({name}): output {output!r} is not among 'outputs' {outputs}")
        labels = e.get("labels")
        if labels is not None and (not isinstance(labels, list) or not labels):
            raise ValueError(f"{where} ({name}): 'labels' must be a non-empty list")
        model = e.get("model")
        if layout == "split" and not isinstance(model, str):
            raise ValueError(f"{where} ({name}): the split layout needs 'model', the path of its side graph")
        heads.append(TaskHead(name, task, tuple(map(str, labels)) if labels else None, output, model))
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: task names repeat: {names}")
    return tuple(heads)
