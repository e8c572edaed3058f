"""mpismoe_edge.runtime: run an exported model with numpy + onnxruntime + tokenizers only.

Never imports torch, transformers or onnx. ``Predictor`` (and onnxruntime with it) is imported
lazily, so ``mpismoe_edge.runtime.parity`` works with numpy alone.

    from mpismoe_edge.runtime import Predictor
    p = Predictor.from_dir("out/", provider="auto")
    p.predict(["some text"])
"""

from __future__ import annotations

_LAZY = {
    "Predictor": "session",
    "create_session": "session",
    "TruncationWarning": "session",
    "ProviderFallbackWarning": "session",
    "Manifest": "manifest",
    "load_manifest": "manifest",
    "compare_logits": "parity",
    "ParityReport": "parity",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
