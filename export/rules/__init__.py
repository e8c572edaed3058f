"""Graph rewrites, one onnxscript rewriter rule per file (the style of ``onnxscript.rewriter.ort_fusions``).

* :mod:`.masked_attention`: ``ai.mpismoe.MaskedAttention`` -> ``com.microsoft.MultiHeadAttention``.
"""

from .masked_attention import masked_attention_rules

__all__ = ["masked_attention_rules"]
