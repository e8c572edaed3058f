"""Low-bit weight quantization: GNP-IQ, RTN, the packed layout, QuantLinear and QuantEmbedding."""

from .api import bits_for, quantize_model, quantize_weight
from .embedding import QuantEmbedding
from .gnpiq import gnpiq_quantize
from .linear import QuantLinear
from .rtn import GroupQuant, rtn_quantize

__all__ = [
    "GroupQuant",
    "QuantEmbedding",
    "QuantLinear",
    "bits_for",
    "gnpiq_quantize",
    "quantize_model",
    "quantize_weight",
    "rtn_quantize",
]
