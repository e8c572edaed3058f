"""mpismoe-edge: MP-ISMoE transfer learning, low-bit quantization and ONNX edge deployment.

The main names are importable from here; each is loaded on first use, so ``import mpismoe_edge``
stays cheap and torch-free and ``mpismoe_edge.runtime`` works on devices without torch::

    from mpismoe_edge import ModelConfig, build_model, load_backbone, export_model, Predictor
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module (relative to this package) that defines it
_LAZY = {
    # configs (torch-free)
    "ModelConfig": "config",
    "QuantConfig": "config",
    "SideConfig": "config",
    # shared names (torch-free)
    "Task": "runtime.tasks",
    "TASKS": "runtime.tasks",
    "TARGETS": "runtime.spec",
    # data
    "Dataset": "data",
    "load_default": "data",
    "load_file": "data",
    # model (torch)
    "MPISMoEModel": "model",
    "build_model": "model",
    "load_backbone": "model",
    "load_checkpoint": "model",
    "save_checkpoint": "model",
    "quantize_model": "quant.api",
    # training (torch); the function ``train`` is imported from ``mpismoe_edge.train``, whose
    # module name it shares (a package attribute of that name is the submodule once imported)
    "TrainConfig": "train",
    # export (torch, onnx)
    "export_model": "export.pipeline",
    # the torch-free runtime
    "Predictor": "runtime.session",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
