"""benchmarks/side_share.py: each node of an export is the backbone's or a side block's."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from benchmarks.side_share import node_parts


def _init(name: str):
    return numpy_helper.from_array(np.ones((2, 2), np.float32), name)


def test_a_node_belongs_to_the_last_side_block_whose_weights_it_depends_on():
    nodes = [
        helper.make_node("MatMul", ["x", "backbone.w"], ["h"], name="backbone_mm"),
        helper.make_node("MatMul", ["h", "side.embed_down.weight"], ["s0"], name="down"),
        helper.make_node("MatMul", ["s0", "side.blocks.0.ffn.w"], ["s1"], name="b0_mm"),
        helper.make_node("Relu", ["s1"], ["s2"], name="b0_relu"),  # no weight of its own: its input's block
        helper.make_node("MatMul", ["s2", "side.blocks.1.attn.w"], ["s3"], name="b1_mm"),
        helper.make_node("Add", ["s3", "h"], ["s4"], name="b1_add"),  # reads the backbone too: still block 1
        helper.make_node("MatMul", ["s4", "side.head.weight"], ["y"], name="head"),
    ]
    names = ["backbone.w", "side.embed_down.weight", "side.blocks.0.ffn.w", "side.blocks.1.attn.w", "side.head.weight"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [_init(n) for n in names],
    )
    assert node_parts(helper.make_model(graph)) == {
        "backbone_mm": "backbone",
        "down": "side input",
        "b0_mm": "side block 0",
        "b0_relu": "side block 0",
        "b1_mm": "side block 1",
        "b1_add": "side block 1",
        "head": "side head",
    }


def test_a_multi_task_export_s_parts_carry_the_task():
    nodes = [
        helper.make_node("MatMul", ["x", "backbone.w"], ["h"], name="backbone_mm"),
        helper.make_node("MatMul", ["h", "a/side.embed_down.weight"], ["a/s0"], name="a/down"),
        helper.make_node("MatMul", ["a/s0", "a/side.blocks.2.ffn.w"], ["a/s1"], name="a/b2_mm"),
        helper.make_node("MatMul", ["h", "b_2/side.blocks.0.ffn.w"], ["b/s1"], name="b/b0_mm"),
        helper.make_node("MatMul", ["b/s1", "b_2/side.head.weight"], ["y"], name="b/head"),
    ]
    names = ["backbone.w", "a/side.embed_down.weight", "a/side.blocks.2.ffn.w", "b_2/side.blocks.0.ffn.w"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [_init(n) for n in [*names, "b_2/side.head.weight"]],
    )
    assert node_parts(helper.make_model(graph)) == {
        "backbone_mm": "backbone",
        "a/down": "a: side input",
        "a/b2_mm": "a: side block 2",
        "b/b0_mm": "b_2: side block 0",
        "b/head": "b_2: side head",
    }
