"""export stage of mpismoe-edge: torch model -> ONNX (portable ai.mpismoe functions, or ORT-fused).

``export_model(model, out_dir, target=..., opset=..., atol=...)`` writes a validated directory
(model.onnx, tokenizer.json, manifest.json) atomically; ``mpismoe-export`` is its CLI. Modules:
``functions`` (onnxscript bodies of the custom ops), ``lower`` (torch.onnx export),
``fuse`` (MatMulNBits rewrite), ``validate`` (parity vs PyTorch), ``output`` (atomic dirs).
Importing this package is cheap; torch is imported by the submodules that need it.
"""
from __future__ import annotations

__all__ = ["TARGETS", "ParityError", "export_model"]

TARGETS = ("portable", "ort-cpu", "ort-cuda", "ort-int8")  # = fuse.TARGETS (tested), without importing torch


def __getattr__(name):
    if name in ("export_model", "ParityError"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
