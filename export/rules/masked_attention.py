"""``ai.mpismoe.MaskedAttention(q, k, v, mask)`` -> ``com.microsoft.MultiHeadAttention``.

The side network's attention exports as one ``MaskedAttention`` node whose portable body is ~15
standard ops; ONNX Runtime runs the same math as one contrib node (queries, keys and values
``[B, T, D]``, the ``[B, T]`` key padding mask as int32, scale ``1/sqrt(D/heads)``). Masked keys
get ``mask_filter_value`` (-10000) instead of the float minimum: the same softmax to float
rounding whenever a row keeps a key (padded rows attend uniformly either way).
"""

from __future__ import annotations

import onnx
from onnxscript.rewriter import pattern

from ..functions import DOMAIN, MS_DOMAIN


class MaskedAttentionToMHA(pattern.RewriteRuleClassBase):
    def pattern(self, op, q, k, v, mask):
        return op.MaskedAttention(q, k, v, mask, _domain=DOMAIN, _outputs=["out"])

    def rewrite(self, op, q, k, v, mask, out, **_):
        heads = out.producer().attributes.get_int("num_heads")
        key_mask = op.Cast(mask, to=onnx.TensorProto.INT32)
        return op.MultiHeadAttention(q, k, v, None, key_mask, num_heads=heads, _domain=MS_DOMAIN)


masked_attention_rules = pattern.RewriteRuleSet([MaskedAttentionToMHA.rule()])
