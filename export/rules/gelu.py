"""Exact GELU -> ``com.microsoft.Gelu``: onnxscript's own rules (``ort_fusions.erfgelu``).

torch.onnx writes ``nn.GELU()`` as ``x * (0.5 * (1 + Erf(x / sqrt 2)))``, which ONNX Runtime's
session optimizer leaves unfused in these graphs: seven nodes per GELU, ~2x the time of the
one contrib node. onnxscript already has the rule; this file names it for the target records.
"""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions.erfgelu import rules as gelu_rules

__all__ = ["gelu_rules"]
