"""The MaskedAttention function and its rewrite to com.microsoft.MultiHeadAttention (export/rules/)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mpismoe_edge import ops
from mpismoe_edge.export import functions as F
from mpismoe_edge.export.fuse import fuse
from mpismoe_edge.export.lower import finalize


def _model(heads: int, width: int) -> onnx.ModelProto:
    node = helper.make_node("MaskedAttention", ["q", "k", "v", "m"], ["y"], domain=F.DOMAIN, num_heads=heads)
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", width]) for n in "qkv"]
    graph = helper.make_graph(
        [node],
        "g",
        [*x, helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", width])],
    )
    return finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 18)


def _inputs(width: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(width)
    qkv = {n: torch.randn(3, 7, width, generator=gen) for n in "qkv"}
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return {**qkv, "m": mask}


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]


@pytest.mark.parametrize("heads,width", [(1, 8), (4, 48), (2, 12)])
def test_masked_attention_function_matches_torch(heads, width):
    feed = _inputs(width)
    ref = ops.masked_attention(feed["q"], feed["k"], feed["v"], feed["m"], heads).numpy()
    np.testing.assert_allclose(_run(_model(heads, width), feed), ref, atol=1e-6)


@pytest.mark.parametrize("heads,width", [(4, 48), (2, 12)])
def test_ort_targets_run_masked_attention_as_one_multi_head_attention_node(heads, width):
    feed = _inputs(width)
    ref = ops.masked_attention(feed["q"], feed["k"], feed["v"], feed["m"], heads).numpy()
    fused, stats = fuse(_model(heads, width), "ort-cpu")
    ops_used = [(n.domain, n.op_type) for n in fused.graph.node]
    assert ("com.microsoft", "MultiHeadAttention") in ops_used and (F.DOMAIN, "MaskedAttention") not in ops_used
    assert stats["masked_attention"] == 1 and not fused.functions
    np.testing.assert_allclose(_run(fused, feed), ref, atol=1e-5)


def test_portable_keeps_the_masked_attention_function():
    fused, stats = fuse(_model(2, 12), "portable")
    assert [n.op_type for n in fused.graph.node] == ["MaskedAttention"] and "masked_attention" not in stats


def test_side_attention_exports_the_math_it_trains_with():
    from conftest import tiny_model

    torch.manual_seed(0)
    attn = tiny_model().side.blocks[0].attn.eval()
    x = torch.randn(2, 5, attn.qkv.in_features)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    torch.testing.assert_close(attn.out(ops.masked_attention(q, k, v, mask, attn.heads)), attn(x, mask))
