"""Int8 compute for the fused backbone, with the packed low-bit codes as the only weights in the file.

``quantize_dynamic`` (ONNX Runtime's, QInt8 weights per output channel) turns the fused
backbone's ``Attention`` into ``QAttention`` and its ``MatMul`` into ``MatMulInteger`` (fused to
``DynamicQuantizeMatMul`` at session load: int8 activations, quantized per call, and ORT's
int8 GEMMs, VNNI/AMX where the CPU has them). It stores int8 weights: 1 byte per weight. Here
each int8 weight becomes a small subgraph of the layer's packed codes instead,

    int8 W = QuantizeLinear(dequant(qweight, scales, zeros).T, channel scale, 0)

whose inputs are all initializers, so ONNX Runtime constant-folds it at session load: the file
keeps ``bits/8`` bytes per weight, the session runs the int8 kernels. The embedding tables that
``EmbedLayerNormalization`` reads are folded the same way (to float). The channel scales are
``quantize_dynamic``'s own, and the folded int8 weights are checked to equal its int8 weights.

Int8 activations make this an approximation of the PyTorch model (the weights are requantized
from their low-bit grid to a per-channel int8 grid, the activations are rounded to int8 per
tensor), so the target that uses it validates at a looser tolerance.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

INT8_OPS = ("Attention", "MatMul")  # what quantize_dynamic quantizes here (not the embeddings)
FOLDABLE_BITS = (2, 4, 8)  # codes that whole bytes hold (a shift-and-mask unpack)


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


class _Emitter:
    """Appends the dequantization nodes and their initializers to a graph, sharing constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.consts: set[str] = set()

    def const(self, name: str, arr: np.ndarray) -> str:
        if name not in self.consts:
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self.consts.add(name)
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def dequant(self, prefix: str, layer: nn.Module) -> str:
        """Float ``[N, K]`` weight of a packed layer: unpack codes with shifts and a mask, then
        ``(code - zero) * scale`` per group (the layout of :mod:`mpismoe_edge.quant.pack`)."""
        bits, group = int(layer.bits), int(layer.group_size)
        if bits not in FOLDABLE_BITS:
            raise ValueError(f"{prefix}: the int8 path unpacks {FOLDABLE_BITS}-bit layers, not {bits}-bit")
        n, k_blocks, _ = layer.qweight.shape
        qw = self.const(f"{prefix}.qweight", layer.qweight.numpy())
        sc = self.const(f"{prefix}.scales", layer.scales.numpy()[..., None])
        zp = self.const(f"{prefix}.zeros", layer.zeros.numpy()[..., None])
        shifts = self.const(f"int8_unpack_shifts_{bits}", np.arange(0, 8, bits, dtype=np.uint8))
        mask = self.const(f"int8_unpack_mask_{bits}", np.array((1 << bits) - 1, dtype=np.uint8))
        last = self.const("int8_unpack_last_axis", np.array([-1], dtype=np.int64))
        grouped = self.const(f"int8_unpack_shape_{k_blocks}_{group}", np.array([0, k_blocks, group], dtype=np.int64))
        flat = self.const(f"int8_unpack_shape_{k_blocks * group}", np.array([0, k_blocks * group], dtype=np.int64))
        byte = self.node("Unsqueeze", [qw, last], f"{prefix}.qweight_bytes")
        codes = self.node(
            "BitwiseAnd",
            [self.node("BitShift", [byte, shifts], f"{prefix}.codes_shifted", direction="RIGHT"), mask],
            f"{prefix}.codes",
        )
        codes = self.node("Reshape", [codes, grouped], f"{prefix}.codes_grouped")
        w = self.node(
            "Mul",
            [
                self.node(
                    "Sub",
                    [self.node("Cast", [codes], f"{prefix}.codes_float", to=onnx.TensorProto.FLOAT), zp],
                    f"{prefix}.centered",
                ),
                sc,
            ],
            f"{prefix}.dequantized_grouped",
        )
        return self.node("Reshape", [w, flat], f"{prefix}.dequantized")


def quantize_backbone(proto: onnx.ModelProto, model: nn.Module) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Int8 compute for ``proto`` (:func:`.backbone_graph.fused_backbone` of ``model``) with the
    packed codes of ``model``'s backbone as its weights; returns it and what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layers = packed_layers(model)
    sources = _weight_sources(proto, layers)
    int8_nodes = [
        n.name
        for n in proto.graph.node
        if n.op_type in INT8_OPS and len(n.input) > 1 and sources.get(n.input[1], (None, False))[1]
    ]
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
    inits = {t.name: t for t in graph.initializer}
    emit = _Emitter(graph)
    replaced: dict[str, str] = {}
    stats = {"int8_weights": 0, "folded_tables": 0}
    for init_name, (names, transposed) in sources.items():
        parts = [emit.dequant(f"backbone.{n}", layers[n]) for n in names]
        w = parts[0] if len(parts) == 1 else emit.node("Concat", parts, f"{init_name}.dequantized", axis=0)
        if not transposed:  # an embedding table, read in float by EmbedLayerNormalization
            replaced[init_name] = w
            stats["folded_tables"] += 1
            continue
        qname = f"{init_name}_quantized"
        if qname not in inits:
            raise ValueError(f"quantize_dynamic left {init_name} in float")
        scale, zero = f"{init_name}_scale", f"{init_name}_zero_point"
        expect = numpy_helper.to_array(inits[qname])
        mine = _quantize(
            np.concatenate([layers[n].dequantized_weight().numpy() for n in names]).T,
            numpy_helper.to_array(inits[scale]),
            numpy_helper.to_array(inits[zero]),
        )
        if not np.array_equal(mine, expect):
            raise ValueError(
                f"{init_name}: the folded int8 weight differs from quantize_dynamic's in "
                f"{int((mine != expect).sum())} of {expect.size} values"
            )
        wt = emit.node("Transpose", [w], f"{init_name}.dequantized_t", perm=[1, 0])
        replaced[qname] = emit.node("QuantizeLinear", [wt, scale, zero], f"{qname}.folded", axis=1)
        stats["int8_weights"] += 1
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replaced:
                node.input[i] = replaced[name]
    keep = [t for t in graph.initializer if t.name not in replaced and t.name not in {n for n, _ in sources.items()}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(emit.nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return quant, stats


def unpacked_roles(proto: onnx.ModelProto) -> dict[str, str]:
    """Initializer -> ``packed_codes`` / ``quant_params`` for the layers :class:`_Emitter` unpacks."""
    roles: dict[str, str] = {}
    for node in proto.graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type == "Unsqueeze" and out.endswith(".qweight_bytes"):
            roles[node.input[0]] = "packed_codes"
        elif (node.op_type, out.rpartition(".")[2]) in (("Sub", "centered"), ("Mul", "dequantized_grouped")):
            roles[node.input[1]] = "quant_params"
    return roles


def _quantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """ONNX ``QuantizeLinear`` along axis 1 (round half to even, saturate to int8)."""
    q = np.rint(w / scale[None, :]) + zero[None, :].astype(np.float32)
    return np.clip(q, -128, 127).astype(np.int8)
