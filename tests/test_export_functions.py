"""The ai.mpismoe ONNX functions and the MatMulNBits rewrite against the torch reference ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mpismoe_edge import ops
from mpismoe_edge.export import functions as F
from mpismoe_edge.export.fuse import fuse
from mpismoe_edge.export.lower import finalize
from mpismoe_edge.quant.pack import dequantize, pack_codes


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _quantized(n: int, k: int, bits: int, group: int, seed: int = 0):
    """Random codes over the full range, scales, and zero points (fractional below 8 bits)."""
    gen = torch.Generator().manual_seed(seed)
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.1 + 0.01
    zeros = torch.rand(n, k // group, generator=gen) * qmax
    if bits == 8:
        zeros = zeros.round()
    return pack_codes(codes, bits, group), scales, zeros


def _qmatmul_model(qw, scales, zeros, bits, group, x_shape, bias=None, opset=18) -> onnx.ModelProto:
    n = qw.shape[0]
    nodes = [
        helper.make_node(
            "QMatMul",
            ["x", "qw", "s", "z"],
            ["y0" if bias is not None else "y"],
            domain=F.DOMAIN,
            bits=bits,
            group_size=group,
        )
    ]
    inits = [
        numpy_helper.from_array(qw.numpy(), "qw"),
        numpy_helper.from_array(scales.numpy(), "s"),
        numpy_helper.from_array(zeros.numpy(), "z"),
    ]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
        inits.append(numpy_helper.from_array(bias.numpy(), "b"))
    dims = [f"d{i}" for i in range(len(x_shape) - 1)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, x_shape[-1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return finalize(model, opset)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "n,k,group,x_shape", [(7, 48, 16, (3, 48)), (24, 96, 32, (2, 5, 96)), (1, 64, 64, (1, 1, 1, 64))]
)
def test_qmatmul_function_matches_torch(bits, n, k, group, x_shape):
    qw, s, z = _quantized(n, k, bits, group, seed=bits)
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(n))
    ref = ops.qmatmul(x, qw, s, z, bits, group).numpy()
    got = _run(_qmatmul_model(qw, s, z, bits, group, x_shape), {"x": x.numpy()})
    assert got.shape == ref.shape
    # same dequantized weights (see the exact test below); only the matmul's summation order differs
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_qmatmul_function_unpacks_every_code_exactly():
    """Identity input: the output columns are the dequantized weight, bit for bit."""
    for bits in (2, 3, 4, 8):
        qw, s, z = _quantized(5, 64, bits, 32, seed=bits)
        w = dequantize(qw, s, z, bits, 32)
        got = _run(_qmatmul_model(qw, s, z, bits, 32, (64, 64)), {"x": np.eye(64, dtype=np.float32)})
        np.testing.assert_array_equal(got, w.numpy().T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("ids_shape", [(5,), (2, 7), (1, 1)])
def test_qgather_function_equals_torch_exactly(bits, ids_shape):
    qw, s, z = _quantized(40, 64, bits, 16, seed=bits)
    ids = torch.randint(0, 40, ids_shape, generator=torch.Generator().manual_seed(1))
    node = helper.make_node("QGather", ["ids", "qw", "s", "z"], ["y"], domain=F.DOMAIN, bits=bits, group_size=16)
    dims = [f"d{i}" for i in range(len(ids_shape))]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, 64])],
        initializer=[
            numpy_helper.from_array(qw.numpy(), "qw"),
            numpy_helper.from_array(s.numpy(), "s"),
            numpy_helper.from_array(z.numpy(), "z"),
        ],
    )
    model = finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 18)
    got = _run(model, {"ids": ids.numpy()})
    np.testing.assert_array_equal(got, ops.qgather(ids, qw, s, z, bits, 16).numpy())


@pytest.mark.parametrize("opset", [18, 21])
def test_function_opset_import_follows_model(opset):
    qw, s, z = _quantized(8, 32, 3, 16)
    model = _qmatmul_model(qw, s, z, 3, 16, (2, 32), opset=opset)
    assert {f.name: {i.domain: i.version for i in f.opset_import}[""] for f in model.functions} == {"QMatMul": opset}
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    ref = ops.qmatmul(x, qw, s, z, 3, 16).numpy()
    np.testing.assert_allclose(_run(model, {"x": x.numpy()}), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_topk_route_function_matches_torch(k):
    logits = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(k)) * 3
    node = helper.make_node("TopKRoute", ["l"], ["w"], domain=F.DOMAIN, k=k)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("l", TensorProto.FLOAT, ["b", "t", 8])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["b", "t", 8])],
    )
    model = finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 18)
    got = _run(model, {"l": logits.numpy()})
    ref = ops.topk_route(logits, k).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert ((got > 0).sum(-1) == k).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zeros,mode", [("fractional", "auto"), ("integer", "auto"), ("fractional", "float")])
def test_matmulnbits_rewrite_matches_torch(bits, zeros, mode):
    qw, s, z = _quantized(24, 64, bits, 16, seed=bits)
    if zeros == "integer":
        z = z.round()
    gen = torch.Generator().manual_seed(bits)
    bias = torch.randn(24, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    model, stats = fuse(_qmatmul_model(qw, s, z, bits, 16, tuple(x.shape), bias=bias), "ort-cpu", zero_points=mode)
    ops_used = {(n.domain, n.op_type) for n in model.graph.node}
    if bits == 3:  # no ORT kernel: stays the portable function
        assert stats == {"portable_3bit": 1}
        assert (F.DOMAIN, "QMatMul") in ops_used and [f.name for f in model.functions] == ["QMatMul"]
    else:
        plan = "uint8" if zeros == "integer" or bits == 8 else ("float" if mode == "float" else "shift")
        assert stats == {f"matmulnbits_{bits}bit": 1, "bias_folded": 1, f"zero_points_{plan}": 1}
        assert not model.functions and (F.DOMAIN, "QMatMul") not in ops_used
        mnb = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        assert len(mnb.input) == 6 and mnb.input[5] == "b"  # bias folded into the node
        inits = {t.name: t for t in model.graph.initializer}
        if plan == "uint8":
            assert inits[mnb.input[3]].data_type == TensorProto.UINT8
            assert list(inits[mnb.input[3]].dims) == [24, -(-4 * bits // 8)]
        elif plan == "float":
            assert inits[mnb.input[3]].data_type == TensorProto.FLOAT
        else:
            assert mnb.input[3] == ""  # kernel's default zero point, correction term beside it
            assert ops_used == {
                ("com.microsoft", "MatMulNBits"),
                ("", "MatMul"),
                ("", "Add"),
                ("", "Shape"),
                ("", "Concat"),
                ("", "Reshape"),
                ("", "ReduceSum"),
                ("", "Constant"),
            }
    ref = (ops.qmatmul(x, qw, s, z, bits, 16) + bias).numpy()
    np.testing.assert_allclose(_run(model, {"x": x.numpy()}), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_shift_group_sum_is_shared_by_projections_of_one_input():
    qws = [_quantized(16, 64, 4, 16, seed=i) for i in range(3)]
    nodes, inits = [], []
    for i, (qw, s, z) in enumerate(qws):
        nodes.append(
            helper.make_node(
                "QMatMul", ["x", f"qw{i}", f"s{i}", f"z{i}"], [f"y{i}"], domain=F.DOMAIN, bits=4, group_size=16
            )
        )
        inits += [
            numpy_helper.from_array(qw.numpy(), f"qw{i}"),
            numpy_helper.from_array(s.numpy(), f"s{i}"),
            numpy_helper.from_array(z.numpy(), f"z{i}"),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", 16]) for i in range(3)],
        initializer=inits,
    )
    model, stats = fuse(finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 18), "ort-cpu")
    assert stats == {"matmulnbits_4bit": 3, "zero_points_shift": 3}
    assert len([n for n in model.graph.node if n.op_type == "ReduceSum"]) == 1
    assert [n.op_type for n in model.graph.node if "x" in n.input] == ["MatMulNBits", "Shape", "Reshape"] + [
        "MatMulNBits"
    ] * 2
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    for (qw, s, z), y in zip(qws, got):
        np.testing.assert_allclose(y, ops.qmatmul(x, qw, s, z, 4, 16).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", [0, 4])
def test_accuracy_level_is_set_on_every_matmulnbits_node(level):
    qw, s, z = _quantized(32, 64, 4, 16, seed=3)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    model, _ = fuse(_qmatmul_model(qw, s, z, 4, 16, tuple(x.shape)), "ort-cpu", accuracy_level=level)
    levels = [
        {a.name: a.i for a in n.attribute}.get("accuracy_level", 0)
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    ]
    assert levels == [level]
    ref = ops.qmatmul(x, qw, s, z, 4, 16).numpy()
    # level 4 rounds the activations to int8 per block: close, not float-exact
    np.testing.assert_allclose(
        _run(model, {"x": x.numpy()}), ref, atol=(1e-6 if level == 0 else 2e-2) * np.abs(ref).max()
    )


def test_unknown_accuracy_level_rejected():
    qw, s, z = _quantized(8, 32, 4, 16)
    with pytest.raises(ValueError, match="accuracy level"):
        fuse(_qmatmul_model(qw, s, z, 4, 16, (2, 32)), "ort-cpu", accuracy_level=5)


def test_cuda_target_keeps_2bit_portable():
    qw, s, z = _quantized(8, 32, 2, 16)
    model, stats = fuse(_qmatmul_model(qw, s, z, 2, 16, (2, 32)), "ort-cuda")
    assert stats == {"portable_2bit": 1}
    assert [n.op_type for n in model.graph.node] == ["QMatMul"]


def test_unknown_target_rejected():
    qw, s, z = _quantized(8, 32, 4, 16)
    with pytest.raises(ValueError, match="unknown target"):
        fuse(_qmatmul_model(qw, s, z, 4, 16, (2, 32)), "tensorrt")


@pytest.mark.parametrize("zeros", ["integer", "fractional"])
def test_two_layers_sharing_one_packed_weight_both_lower_to_matmulnbits(zeros):
    qw, s, z = _quantized(16, 64, 4, 16, seed=7)
    z = z.round() if zeros == "integer" else z
    nodes = [
        helper.make_node("QMatMul", [x, "qw", "s", "z"], [f"y{i}"], domain=F.DOMAIN, bits=4, group_size=16)
        for i, x in enumerate(("a", "b"))
    ]
    inits = [numpy_helper.from_array(t.numpy(), n) for t, n in ((qw, "qw"), (s, "s"), (z, "z"))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 64]) for n in ("a", "b")],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", 16]) for i in range(2)],
        initializer=inits,
    )
    model, stats = fuse(finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 18), "ort-cpu")
    assert stats["matmulnbits_4bit"] == 2
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a.numpy(), "b": b.numpy()}
    )
    for x, y in zip((a, b), got):
        np.testing.assert_allclose(y, ops.qmatmul(x, qw, s, z, 4, 16).numpy(), rtol=1e-5, atol=1e-5)
