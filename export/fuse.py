"""Lower ``ai.mpismoe.QMatMul`` nodes to ONNX Runtime's ``com.microsoft.MatMulNBits``.

A graph rewrite of the portable model. Our packed layout *is* MatMulNBits' for 2, 4 and 8
bits (``B``: uint8 ``[N, K/G, G*bits/8]``, little-endian codes), so the weight bytes are
reused as they are:

* scales ``[N, K/G]`` float: MatMulNBits' 2-D scales;
* zeros: float ``[N, K/G]`` ("same type as A" zero points, fractional allowed) at 2 and 4
  bits, where ORT's CPU kernel computes ``(q - zp) * scale`` with them; at 8 bits our zero
  points are integers and become uint8 ``[N, K/G]`` (ORT's kernel wants uint8 there);
* a following ``Add`` of a constant ``[N]`` bias is folded into the node's bias input.

3-bit nodes (no ORT kernel) and any node whose weights are not initializers keep the portable
function. ``TopKRoute`` stays the portable function on every target.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from . import functions as F

MS_DOMAIN = "com.microsoft"
TARGET_BITS = {
    "portable": frozenset(),
    "ort-cpu": frozenset({2, 4, 8}),
    # CUDA MatMulNBits kernels exist for 4 and 8 bits; 2-bit nodes keep the portable function.
    "ort-cuda": frozenset({4, 8}),
}
TARGETS = tuple(TARGET_BITS)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def fuse(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite ``model`` in place for ``target``; returns it and counts of what was done."""
    if target not in TARGET_BITS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    bits_ok = TARGET_BITS[target]
    stats = Counter()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    replaced_zeros: dict[str, str] = {}
    removed: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []

    for node in graph.node:
        if id(node) in removed:
            continue
        if node.domain != F.DOMAIN or node.op_type != "QMatMul":
            new_nodes.append(node)
            continue
        attrs = _attrs(node)
        bits, group = int(attrs["bits"]), int(attrs["group_size"])
        x, qw, sc, zp = node.input
        if bits not in bits_ok or not all(n in inits for n in (qw, sc, zp)):
            stats[f"portable_{bits}bit"] += 1
            new_nodes.append(node)
            continue
        n_out, k_blocks, _blob = inits[qw].dims
        zp_in = zp
        if bits == 8:  # integer zero points -> uint8 (ORT's 8-bit kernel reads uint8 only)
            if zp not in replaced_zeros:
                z = numpy_helper.to_array(inits[zp])
                if not np.array_equal(z, np.round(z)) or z.min() < 0 or z.max() > 255:
                    stats["portable_8bit"] += 1
                    new_nodes.append(node)
                    continue
                replaced_zeros[zp] = zp + "_u8"
                graph.initializer.append(numpy_helper.from_array(z.astype(np.uint8), replaced_zeros[zp]))
            zp_in = replaced_zeros[zp]
        inputs = [x, qw, sc, zp_in]
        output = node.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and output not in graph_outputs and users[0].op_type == "Add" and users[0].domain == "":
            add = users[0]
            other = add.input[1] if add.input[0] == output else add.input[0]
            bias = inits.get(other)
            if bias is not None and list(bias.dims) == [n_out] and bias.data_type == inits[sc].data_type:
                inputs += ["", other]
                output = add.output[0]
                removed.add(id(add))
                stats["bias_folded"] += 1
        new_nodes.append(onnx.helper.make_node(
            "MatMulNBits", inputs, [output], name=node.name, domain=MS_DOMAIN,
            K=k_blocks * group, N=n_out, bits=bits, block_size=group))
        stats[f"matmulnbits_{bits}bit"] += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    _fix_imports(model)
    return model, dict(sorted(stats.items()))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _fix_imports(model: onnx.ModelProto) -> None:
    """Model-level opset imports and functions for the domains/ops the graph now uses."""
    used_ops = {(n.domain, n.op_type) for n in model.graph.node}
    keep = [f for f in model.functions if (f.domain, f.name) in used_ops]
    del model.functions[:]
    model.functions.extend(keep)
    domains = {d for d, _ in used_ops}
    imports = {i.domain: i.version for i in model.opset_import if i.domain in domains or i.domain == ""}
    if MS_DOMAIN in domains:
        imports[MS_DOMAIN] = 1
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
