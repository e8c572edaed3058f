"""mpismoe-edge: MP-ISMoE transfer learning, low-bit quantization and ONNX edge deployment.

Importing the package is cheap and torch-free, so ``mpismoe_edge.runtime`` works on devices
without torch. Import torch-backed pieces from their modules (``mpismoe_edge.quant``, ...).
"""
__version__ = "0.1.0"
