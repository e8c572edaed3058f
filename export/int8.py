"""Int8 compute for the fused backbone: ONNX Runtime's int8 kernels with int8 weights in the file,
no float copy of any packed weight at load.

``quantize_dynamic`` (ONNX Runtime's, QInt8 weights per output channel) turns the fused
backbone's ``Attention`` into ``QAttention`` and its ``MatMul`` into ``MatMulInteger`` (fused to
``DynamicQuantizeMatMul`` at session load: activations quantized to int8 per call, ORT's int8
GEMMs). Its int8 weights are the packed layers' dequantized weights requantized per output
channel, stored as they are: a session holds them as the int8 anchor does. (Making them at load
from the low-bit codes keeps the file smaller, but ONNX Runtime's constant folding holds every
float intermediate of the unpacking until it is done: 5-6x the int8 anchor's resident memory.)

Two kinds of layer keep their low-bit codes instead:

* the embedding tables: ``EmbedLayerNormalization`` wants float tables, so it becomes the rows
  of the batch gathered from the packed word, position and token-type tables per call
  (``ai.mpismoe.QGather``: only those rows are unpacked) and a ``LayerNormalization``; the
  attention mask goes to the attention nodes as it is (``[B, S]``);
* ``float_layers``: MatMul layers whose activations are too sensitive to int8 rounding (chosen
  by calibration, :mod:`calibration.int8_plan`) compute in float from their packed codes
  (``ai.mpismoe.QMatMul``, which :func:`.fuse.fuse` lowers to ``MatMulNBits``).

Int8 activations make this an approximation of the PyTorch model, so the target validates at a
looser tolerance (``spec.INT8_ATOL``) and is judged by its label agreement.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from . import functions as F
from .backbone_graph import hidden_name

INT8_OPS = ("Attention", "MatMul")  # what quantize_dynamic quantizes here (not the embeddings)
WORD_EMBEDDINGS = "embeddings.word_embeddings"  # the table gathered from its packed codes


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    from mpismoe_edge.quant.embedding import QuantEmbedding
    from mpismoe_edge.quant.linear import QuantLinear

    return {name: m for name, m in model.backbone.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def _weight_sources(proto: onnx.ModelProto, layers: dict[str, nn.Module]) -> dict[str, tuple[list[str], bool]]:
    """Float initializer -> (packed layers whose dequantized weights it is, concatenated along
    its columns; transposed?): MatMul/Attention weights are ``W.T`` ``[K, N]`` (q, k, v side by
    side for Attention), embedding tables ``W`` itself."""
    inits = {t.name: t for t in proto.graph.initializer}
    wanted: dict[str, bool] = {}
    for node in proto.graph.node:
        if node.op_type in INT8_OPS and len(node.input) > 1 and node.input[1] in inits:
            wanted[node.input[1]] = True
        elif node.op_type == "EmbedLayerNormalization":
            for name in node.input[2:5]:
                if name in inits:
                    wanted[name] = False
    weights = {name: m.dequantized_weight().numpy() for name, m in layers.items()}
    sources: dict[str, tuple[list[str], bool]] = {}
    for init_name, transposed in wanted.items():
        arr = numpy_helper.to_array(inits[init_name])
        if arr.ndim != 2:
            continue
        mat = arr.T if transposed else arr  # rows = output channels (or table rows)
        found, row = [], 0
        while row < mat.shape[0]:
            hit = next(
                (
                    n
                    for n, w in weights.items()
                    if w.shape[1] == mat.shape[1]
                    and row + w.shape[0] <= mat.shape[0]
                    and np.array_equal(w, mat[row : row + w.shape[0]])
                ),
                None,
            )
            if hit is None:
                break
            found.append(hit)
            row += weights[hit].shape[0]
        if found and row == mat.shape[0]:
            sources[init_name] = (found, transposed)
    return sources


def float_layer_candidates(proto: onnx.ModelProto, model: nn.Module) -> list[str]:
    """Backbone layers (names in ``model.backbone``) that may keep float compute: those of the
    fused graph's ``MatMul`` nodes (an ``Attention`` node's q, k and v share one int8 weight)."""
    inits = {t.name for t in proto.graph.initializer}
    sources = _weight_sources(proto, packed_layers(model))
    return [
        names[0]
        for node in proto.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits
        for names, transposed in [sources.get(node.input[1], ([], False))]
        if transposed and len(names) == 1
    ]


def quantize_backbone(
    proto: onnx.ModelProto, model: nn.Module, float_layers: Collection[str] = ()
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Int8 compute for ``proto`` (:func:`.backbone_graph.fused_backbone` of ``model``) but for
    ``float_layers`` (of :func:`float_layer_candidates`); returns it and what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layers = packed_layers(model)
    sources = _weight_sources(proto, layers)
    allowed = set(float_layer_candidates(proto, model))
    unknown = sorted(set(float_layers) - allowed)
    if unknown:
        raise ValueError(f"cannot keep {unknown} in float: not one of the backbone's MatMul layers")
    kept = {
        init: names[0] for init, (names, t) in sources.items() if t and len(names) == 1 and names[0] in float_layers
    }
    int8_nodes = [
        n.name
        for n in proto.graph.node
        if n.op_type in INT8_OPS
        and len(n.input) > 1
        and sources.get(n.input[1], (None, False))[1]
        and n.input[1] not in kept
    ]
    if not int8_nodes:  # quantize_dynamic reads an empty list as "every node"
        raise ValueError("every int8 layer was kept in float; export with --target ort-cpu instead")
    with tempfile.TemporaryDirectory(prefix="mpismoe-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(proto.SerializeToString())
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        root.setLevel(logging.ERROR)  # "Please consider to run pre-processing ..." on every call
        try:
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=list(INT8_OPS),
                nodes_to_quantize=int8_nodes,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:  # it also installs a root handler (logging.basicConfig) that makes other libraries chatty
            for h in root.handlers[:]:
                if h not in handlers:
                    root.removeHandler(h)
            root.setLevel(level)
        quant = onnx.load(str(dst))
    graph = quant.graph
    packed: dict[str, onnx.TensorProto] = {}

    def codes(layer_name: str) -> list[str]:
        layer = layers[layer_name]
        names = []
        for part in ("qweight", "scales", "zeros"):
            name = f"backbone.{layer_name}.{part}"
            packed.setdefault(name, numpy_helper.from_array(getattr(layer, part).numpy(), name))
            names.append(name)
        return names

    def attrs(layer_name: str) -> dict[str, int]:
        return {"bits": int(layers[layer_name].bits), "group_size": int(layers[layer_name].group_size)}

    nodes: list[onnx.NodeProto] = []
    embedded = ""
    stats = {"int8_layers": len(int8_nodes), "float_layers": len(kept), "gathered_tables": 0}
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain == "" and node.input[1] in kept:
            name = kept[node.input[1]]
            nodes.append(
                helper.make_node(
                    "QMatMul",
                    [node.input[0], *codes(name)],
                    list(node.output),
                    name=node.name,
                    domain=F.DOMAIN,
                    **attrs(name),
                )
            )
        elif node.op_type == "EmbedLayerNormalization":
            nodes += _gathered_embeddings(node, graph, layers, sources, codes, attrs)
            stats["gathered_tables"] += 1
            embedded = node.output[0]
        else:
            nodes.append(node)
    # the embeddings' output is also a graph output (the ladder reads it), which the optimizer left
    # to an unfused copy reading the float table: take it from the gathered rows instead
    first = hidden_name(0)
    if stats["gathered_tables"]:
        nodes = [n for n in nodes if first not in n.output]
        nodes.append(helper.make_node("Identity", [embedded], [first], name=first))
    del graph.node[:]
    graph.node.extend(_pruned(nodes, {o.name for o in graph.output}))
    graph.initializer.extend(packed.values())
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if any(n.domain == F.DOMAIN for n in graph.node):
        quant.opset_import.append(helper.make_opsetid(F.DOMAIN, F.DOMAIN_VERSION))
    return quant, stats


BLOCK_GATHER_BITS = (4, 8)  # widths com.microsoft.GatherBlockQuantized reads from uint8 (MatMulNBits' layout)


def _gathered_embeddings(node, graph, layers, sources, codes, attrs) -> list[onnx.NodeProto]:
    """``EmbedLayerNormalization`` as rows gathered per call from the packed word, position
    (``0..S-1``) and token-type tables, summed, then ``LayerNormalization``; its mask output
    becomes the int32 mask itself (the attention nodes take ``[B, S]`` masks)."""
    ids32, types32, word, pos, types, gamma, beta = node.input[:7]
    mask32 = node.input[7] if len(node.input) > 7 else ""
    out = node.output[0]
    tables = [sources.get(name, ([None], False))[0][0] for name in (word, pos, types)]
    if tables[0] != WORD_EMBEDDINGS or None in tables:
        raise ValueError(f"the fused embeddings read {word!r}, {pos!r}, {types!r}: not all packed tables")
    eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-12)
    p = f"{out}_gathered"
    for name, value in ((f"{p}_zero", 0), (f"{p}_one", 1)):
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    int64 = onnx.TensorProto.INT64
    made = [
        helper.make_node("Cast", [ids32], [f"{p}_ids"], name=f"{p}_ids", to=int64),
        helper.make_node("Cast", [types32], [f"{p}_types"], name=f"{p}_types", to=int64),
        helper.make_node("Shape", [ids32], [f"{p}_len"], name=f"{p}_len", start=1, end=2),
        helper.make_node("Squeeze", [f"{p}_len"], [f"{p}_len_scalar"], name=f"{p}_len_scalar"),
        helper.make_node(
            "Range", [f"{p}_zero", f"{p}_len_scalar", f"{p}_one"], [f"{p}_positions"], name=f"{p}_positions"
        ),
    ]
    rows = []
    for table, ids, tag in zip(tables, (f"{p}_ids", f"{p}_positions", f"{p}_types"), ("word", "pos", "type")):
        rows.append(f"{p}_{tag}")
        layer = layers[table]
        if int(layer.bits) in BLOCK_GATHER_BITS:
            made += _block_gather(graph, f"backbone.{table}", layer, ids, 1 if tag == "pos" else 2, rows[-1])
        else:
            made.append(
                helper.make_node(
                    "QGather", [ids, *codes(table)], [rows[-1]], name=rows[-1], domain=F.DOMAIN, **attrs(table)
                )
            )
    made += [
        helper.make_node("Add", [rows[0], rows[2]], [f"{p}_word_type"], name=f"{p}_word_type"),
        helper.make_node("Add", [f"{p}_word_type", rows[1]], [f"{p}_sum"], name=f"{p}_sum"),
        helper.make_node("LayerNormalization", [f"{p}_sum", gamma, beta], [out], name=out, axis=-1, epsilon=eps),
    ]
    if len(node.output) > 1 and node.output[1]:
        if not mask32:
            raise ValueError("the fused embeddings take no attention mask")
        made.append(helper.make_node("Identity", [mask32], [node.output[1]], name=node.output[1]))
    return made


def _block_gather(graph, prefix: str, layer: nn.Module, ids: str, rank: int, out: str) -> list[onnx.NodeProto]:
    """Rows ``ids`` (``rank`` axes) of a packed 4- or 8-bit table: ``com.microsoft.GatherBlockQuantized`` with its
    default zero point ``m = 2^(bits-1)`` (our codes are its uint8 layout), plus the per-group
    term ``(m - z) * s`` gathered alongside (``(q - z) s = (q - m) s + (m - z) s``: GNP-IQ's zero
    points are fractional, the op's are integers)."""
    bits, group = int(layer.bits), int(layer.group_size)
    rows, blocks, _ = layer.qweight.shape
    m = float(1 << (bits - 1))
    scales = layer.scales.numpy().astype(np.float32)
    shift = ((m - layer.zeros.numpy().astype(np.float32)) * scales)[..., None]  # [V, K/G, 1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(layer.qweight.numpy().reshape(rows, -1), f"{prefix}.qweight"),
            numpy_helper.from_array(scales, f"{prefix}.scales"),
            numpy_helper.from_array(shift, f"{prefix}.zero_shift"),
            numpy_helper.from_array(np.array([0] * rank + [blocks, group], dtype=np.int64), f"{out}_grouped"),
            numpy_helper.from_array(np.array([0] * rank + [blocks * group], dtype=np.int64), f"{out}_flat"),
        ]
    )
    return [
        helper.make_node(
            "GatherBlockQuantized",
            [f"{prefix}.qweight", ids, f"{prefix}.scales"],
            [f"{out}_centered"],
            name=f"{out}_centered",
            domain="com.microsoft",
            bits=bits,
            block_size=group,
            gather_axis=0,
            quantize_axis=1,
        ),
        helper.make_node("Reshape", [f"{out}_centered", f"{out}_grouped"], [f"{out}_groups"], name=f"{out}_groups"),
        helper.make_node("Gather", [f"{prefix}.zero_shift", ids], [f"{out}_shift"], name=f"{out}_shift"),
        helper.make_node("Add", [f"{out}_groups", f"{out}_shift"], [f"{out}_shifted"], name=f"{out}_shifted"),
        helper.make_node("Reshape", [f"{out}_shifted", f"{out}_flat"], [out], name=out),
    ]


def _pruned(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (in order)."""
    live = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(node.input)
    return keep[::-1]
