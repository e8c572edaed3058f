"""Low-bit weight quantization: GNP-IQ, RTN, the packed layout and QuantLinear."""
from .api import bits_for, quantize_model, quantize_weight
from .gnpiq import gnpiq_quantize
from .linear import QuantLinear
from .rtn import GroupQuant, rtn_quantize

__all__ = ["GroupQuant", "QuantLinear", "bits_for", "gnpiq_quantize", "quantize_model", "quantize_weight", "rtn_quantize"]
