"""Portable means portable: each ai.mpismoe function body gives the same result in ONNX Runtime,
the ONNX reference evaluator and OpenVINO (the body inlined, as OpenVINO does not read
functions), on codes over the full range; and the op corners the bodies avoid, for the record."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from clients import require, run_onnxruntime, run_openvino, run_reference
from onnx import TensorProto, helper, numpy_helper
from test_export_functions import _qmatmul_model, _quantized

from mpismoe_edge.export import functions as F
from mpismoe_edge.export.lower import finalize
from mpismoe_edge.export.pipeline import inline_functions


def _outputs(model: onnx.ModelProto, feed: dict, tmp_path) -> dict[str, np.ndarray]:
    path, inlined = tmp_path / "f.onnx", tmp_path / "inlined.onnx"
    onnx.save(model, path)
    onnx.save(inline_functions(model), inlined)
    return {
        "onnxruntime": run_onnxruntime(path, feed, "y"),
        "onnx-reference": run_reference(path, feed, "y"),
        "openvino": run_openvino(inlined, feed, "y"),
    }


def _single(op: str, inputs: list, initializers: list, attrs: dict) -> onnx.ModelProto:
    node = helper.make_node(
        op, [i.name for i in inputs] + [t.name for t in initializers], ["y"], domain=F.DOMAIN, **attrs
    )
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=initializers
    )
    return finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.MIN_OPSET)]), F.MIN_OPSET)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qmatmul_body_unpacks_identically_in_every_runtime(bits, tmp_path):
    """Identity input: the output is the dequantized weight itself, so any unpacking slip shows
    (a wrong code is off by a whole scale step; OpenVINO's own dequantization order differs by ~1e-6)."""
    require("openvino")
    qw, s, z = _quantized(6, 64, bits, 32, seed=bits)
    model = _qmatmul_model(qw, s, z, bits, 32, (64, 64))
    out = _outputs(model, {"x": np.eye(64, dtype=np.float32)}, tmp_path)
    np.testing.assert_array_equal(out["onnx-reference"], out["onnxruntime"])
    np.testing.assert_allclose(out["openvino"], out["onnxruntime"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qgather_body_is_identical_in_every_runtime(bits, tmp_path):
    require("openvino")
    qw, s, z = _quantized(40, 64, bits, 16, seed=bits)
    inits = [
        numpy_helper.from_array(qw.numpy(), "qw"),
        numpy_helper.from_array(s.numpy(), "s"),
        numpy_helper.from_array(z.numpy(), "z"),
    ]
    model = _single(
        "QGather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["a", "b"])],
        inits,
        {"bits": bits, "group_size": 16},
    )
    ids = np.random.default_rng(bits).integers(0, 40, (3, 7)).astype(np.int64)
    out = _outputs(model, {"ids": ids}, tmp_path)
    np.testing.assert_array_equal(out["onnx-reference"], out["onnxruntime"])
    np.testing.assert_array_equal(out["openvino"], out["onnxruntime"])


def test_topk_route_body_agrees_in_every_runtime(tmp_path):
    require("openvino")
    model = _single("TopKRoute", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", 8])], [], {"k": 2})
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    out = _outputs(model, {"x": x}, tmp_path)
    assert ((out["onnxruntime"] > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(out["onnx-reference"], out["onnxruntime"], atol=1e-7)
    np.testing.assert_allclose(out["openvino"], out["onnxruntime"], atol=1e-7)


def _bitshift(dtype, direction: str) -> onnx.ModelProto:
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("BitShift", ["x", "s"], ["y"], direction=direction)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, t, [256]) for n in ("x", "s")],
        [helper.make_tensor_value_info("y", t, [256])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.MIN_OPSET)])
    model.ir_version = 10
    return model


def _bitshift_outputs(dtype, direction, shift, tmp_path):
    path = tmp_path / "shift.onnx"
    onnx.save(_bitshift(dtype, direction), path)
    feed = {"x": np.arange(256).astype(dtype), "s": np.full(256, shift, dtype)}
    return {"onnxruntime": run_onnxruntime(path, feed, "y"), "openvino": run_openvino(path, feed, "y")}


def test_uint8_left_shift_overflow_is_where_runtimes_disagree(tmp_path):
    """The corner the QMatMul body no longer uses: ONNX (and ORT) wrap 200 << 3 to 64, OpenVINO gives 255."""
    require("openvino")
    out = _bitshift_outputs(np.uint8, "LEFT", 3, tmp_path)
    assert out["onnxruntime"][200] == 64
    assert out["openvino"][200] == 255


@pytest.mark.parametrize("dtype,direction", [(np.uint8, "RIGHT"), (np.uint32, "LEFT"), (np.uint32, "RIGHT")])
def test_shifts_the_bodies_use_agree(dtype, direction, tmp_path):
    """uint32 shifts (all the bodies use) and uint8 right shifts of a non-constant input agree."""
    require("openvino")
    out = _bitshift_outputs(dtype, direction, 3, tmp_path)
    np.testing.assert_array_equal(out["openvino"], out["onnxruntime"])
