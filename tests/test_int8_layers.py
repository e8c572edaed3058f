"""Calibration of the ort-int8 export's float layers: ONNX Runtime's int8 rounding simulated in PyTorch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from conftest import tiny_model
from onnx import TensorProto, helper

from calibration.int8_layers import _fake_int8, choose_float_layers
from mpismoe_edge.export.lower import make_inputs


def test_simulated_activation_rounding_is_onnx_runtimes_dynamic_quantize_linear():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 33])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 33])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(_fake_int8(x).numpy(), got, atol=1e-6)


def test_float_layers_come_from_the_candidates_most_sensitive_first():
    torch.manual_seed(0)
    model = tiny_model().eval()
    batches = [make_inputs(model, batch=4, seq=9, lengths=[9, 6, 3, 9], seed=s) for s in range(2)]
    candidates = ["encoder.layer.0.output.dense", "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    plan = choose_float_layers(model, batches, candidates, atol=-1.0)  # a bar nothing reaches: every candidate
    assert sorted(plan.float_layers) == sorted(candidates) and set(plan.sensitivity) == set(candidates)
    order = [plan.sensitivity[n] for n in plan.float_layers]
    assert order == sorted(order, reverse=True)
    assert 0.0 <= plan.all_int8_agreement <= 1.0 and plan.all_int8_max_abs_diff > 0.0
