"""Calibration (the "MP" of MP-ISMoE): per-layer sensitivity -> bit map under a memory budget.

* :mod:`.sensitivity`: output error of each quantizable Linear at each width, on captured inputs.
* :mod:`.allocate`: exact multiple-choice knapsack over widths under a byte budget.
* :mod:`.report`: JSON numbers and a PNG picture. :mod:`.cli`: ``mpismoe-calibrate``.
"""

from .allocate import Allocation, allocate, layer_bytes, solve_mckp
from .sensitivity import LayerSensitivity, capture_inputs, measure_sensitivities, output_error

__all__ = [
    "Allocation",
    "LayerSensitivity",
    "allocate",
    "capture_inputs",
    "layer_bytes",
    "measure_sensitivities",
    "output_error",
    "solve_mckp",
]
