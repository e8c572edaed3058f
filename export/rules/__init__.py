"""Graph rewrites, one onnxscript rewriter rule per file (the style of ``onnxscript.rewriter.ort_fusions``).

* :mod:`.gelu`: exact GELU -> ``com.microsoft.Gelu`` (onnxscript's own rules);
* :mod:`.masked_attention`: ``ai.mpismoe.MaskedAttention`` -> ``com.microsoft.MultiHeadAttention``;
* :mod:`.qmatmul_nbits`: ``ai.mpismoe.QMatMul`` (+ its bias ``Add``) -> ``com.microsoft.MatMulNBits``.
"""

from .gelu import gelu_rules
from .masked_attention import masked_attention_rules
from .qmatmul_nbits import qmatmul_nbits_rules

__all__ = ["gelu_rules", "masked_attention_rules", "qmatmul_nbits_rules"]
