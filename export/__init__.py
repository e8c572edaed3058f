"""export stage of mpismoe-edge: torch model -> ONNX (portable ai.mpismoe functions, or ORT-fused).

``export_model(model, out_dir, target=..., opset=..., atol=...)`` writes a validated directory in
Hugging Face's ONNX layout (onnx/model.onnx, config.json, tokenizer files) plus manifest.json,
atomically; ``mpismoe-export`` is its CLI. Modules: ``functions`` (onnxscript bodies of the custom
ops), ``lower`` (torch.onnx export), ``fuse`` (MatMulNBits rewrite), ``validate`` (parity vs
PyTorch), ``output`` (atomic dirs), ``hf_layout`` (config.json, tokenizer_config.json),
``ort_format`` (model.ort for ONNX Runtime Mobile), ``runtimes`` (what each target runs on).
Importing this package is cheap; torch is imported by the submodules that need it.
"""

from __future__ import annotations

from mpismoe_edge.runtime.spec import TARGETS  # torch-free

__all__ = ["TARGETS", "ParityError", "export_model"]


def __getattr__(name):
    if name in ("export_model", "ParityError"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
