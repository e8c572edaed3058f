"""Lower ``ai.mpismoe.QMatMul`` nodes to ONNX Runtime's ``com.microsoft.MatMulNBits``.

A graph rewrite of the portable model. Our packed layout *is* MatMulNBits' for 2, 4 and 8
bits (``B``: uint8 ``[N, K/G, G*bits/8]``, little-endian codes), so the weight bytes are
reused as they are:

* scales ``[N, K/G]`` float: MatMulNBits' 2-D scales;
* zero points: integer-valued ones (RTN, and always at 8 bits) become MatMulNBits' packed
  uint8 ``[N, ceil(K/G * bits / 8)]`` form. Fractional ones (GNP-IQ below 8 bits) could go in
  as floats ("same type as A"; ORT's CPU kernel computes ``(q - zp) * scale`` with them) but
  that path is 2-3x slower than the uint8 one, so by default they use the identity
  ``(q - z) s = (q - m) s + (m - z) s`` with the kernel's default zero point ``m = 2^(bits-1)``:
  ``y = MatMulNBits(x) + g(x) @ C`` where ``g(x)`` ``[..., K/G]`` sums each group of ``x``
  (Reshape + ReduceSum, shared per input by q/k/v) and ``C = ((m - z) * s).T`` ``[K/G, N]``;
* a following ``Add`` of a constant ``[N]`` bias is folded into the node's bias input.

3-bit nodes (no ORT kernel) and any node whose weights are not initializers keep the portable
function. ``TopKRoute`` stays the portable function on every target.

Exact GELUs, which torch.onnx writes as ``x * 0.5 * (1 + Erf(x / sqrt 2))`` and ONNX Runtime's
session optimizer leaves unfused, become one ``com.microsoft.Gelu`` node each (ONNX Runtime's
own ``FusionGelu`` pattern matcher).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from mpismoe_edge.quant.pack import pack_bits
from mpismoe_edge.runtime.spec import TARGET_ATOL, TARGET_SPECS

from . import functions as F
from .validate import DEFAULT_ATOL

MS_DOMAIN = "com.microsoft"
# views of the target records (runtime/spec.py); ort-int8's backbone has its own path (int8_target.py),
# fuse() lowers its side network and its float layers
TARGET_BITS = {name: t.packed_bits for name, t in TARGET_SPECS.items()}
TARGET_RULES = {name: t.rules for name, t in TARGET_SPECS.items()}
INT8_TARGET = next(name for name, t in TARGET_SPECS.items() if t.int8)


def default_atol(target: str) -> float:
    """The parity tolerance export validation uses for ``target`` unless told otherwise."""
    return TARGET_ATOL.get(target, DEFAULT_ATOL)


ZERO_POINT_MODES = ("auto", "float")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (input type), 1 fp32, 2 fp16, 3 bf16, 4 int8


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _zero_point_plan(z: np.ndarray, bits: int, mode: str) -> str:
    if mode not in ZERO_POINT_MODES:
        raise ValueError(f"unknown zero point mode {mode!r}; expected one of {ZERO_POINT_MODES}")
    if np.array_equal(z, np.round(z)) and z.min() >= 0 and z.max() <= (1 << bits) - 1:
        return "uint8"  # exact in every mode, and ORT's fast path
    return "float" if mode == "float" and bits != 8 else "shift"


def fuse(
    model: onnx.ModelProto, target: str, zero_points: str = "auto", accuracy_level: int = 0
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite ``model`` in place for ``target``; returns it and counts of what was done.

    ``zero_points="auto"`` (integers as packed uint8, fractional ones by the shift identity)
    runs ORT's fast kernels; ``"float"`` hands fractional zero points to the kernel as floats
    (2/4 bits; exact, but ORT's CPU kernel is 2-3x slower on that path). Integer zero points go
    as packed uint8 in both modes.
    ``accuracy_level`` is MatMulNBits' attribute: 0 computes in the input's float type (matches
    PyTorch to float rounding); 4 lets ORT's CPU kernel quantize activations to int8 per block
    (faster where int8 dot products are, at an activation-rounding error).
    """
    if target not in TARGET_BITS:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGET_BITS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"unknown accuracy level {accuracy_level!r}; expected one of {ACCURACY_LEVELS}")
    bits_ok = TARGET_BITS[target]
    stats = Counter()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    done_inits: set[str] = set()
    group_sums: dict[tuple[str, int, int], str] = {}
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
        k_in = k_blocks * group
        z = numpy_helper.to_array(inits[zp]).astype(np.float32)
        plan = _zero_point_plan(z, bits, zero_points)
        shift = None
        if plan == "uint8":  # integer zero points: ORT's packed uint8 form, its fast kernels
            zp_in = zp + "_u8"
            if zp_in not in done_inits:
                packed = pack_bits(torch.from_numpy(np.round(z).astype(np.uint8)), bits).numpy()
                graph.initializer.append(numpy_helper.from_array(packed, zp_in))
                done_inits.add(zp_in)
        elif plan == "float":
            zp_in = zp
        else:  # "shift": default zero point m = 2^(bits-1) in the kernel, (m - z) * s term on the side
            zp_in = ""
            shift = zp + "_shift"
            if shift not in done_inits:
                m = float(1 << (bits - 1))
                corr = ((m - z) * numpy_helper.to_array(inits[sc]).astype(np.float32)).T.copy()  # [K/G, N]
                graph.initializer.append(numpy_helper.from_array(corr, shift))
                done_inits.add(shift)
        stats[f"zero_points_{plan}"] += 1
        inputs = [x, qw, sc] + ([zp_in] if zp_in else [])
        output = node.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and output not in graph_outputs and users[0].op_type == "Add" and users[0].domain == "":
            add = users[0]
            other = add.input[1] if add.input[0] == output else add.input[0]
            bias = inits.get(other)
            if bias is not None and list(bias.dims) == [n_out] and bias.data_type == inits[sc].data_type:
                inputs += [""] * (4 - len(inputs)) + ["", other]
                output = add.output[0]
                removed.add(id(add))
                stats["bias_folded"] += 1
        mnb_out = output if shift is None else output + "_nbits"
        base = node.name or output
        new_nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                inputs,
                [mnb_out],
                name=base,
                domain=MS_DOMAIN,
                K=k_in,
                N=n_out,
                bits=bits,
                block_size=group,
                **({"accuracy_level": accuracy_level} if accuracy_level else {}),
            )
        )
        if shift is not None:
            key = (x, k_blocks, group)
            if key not in group_sums:  # one per (input, K, G): q/k/v projections share it
                group_sums[key] = f"{x}_group_sum_{group}"
                new_nodes += _group_sum_nodes(
                    x, k_blocks, group, group_sums[key], f"{base}_group_sum", graph, done_inits
                )
            new_nodes.append(
                onnx.helper.make_node("MatMul", [group_sums[key], shift], [output + "_zp_term"], name=f"{base}_zp_term")
            )
            new_nodes.append(
                onnx.helper.make_node("Add", [mnb_out, output + "_zp_term"], [output], name=f"{base}_zp_add")
            )
        stats[f"matmulnbits_{bits}bit"] += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    gelus = _fuse_gelu(model)
    if gelus:
        stats["gelu"] = gelus
    model = _apply_rules(model, TARGET_RULES[target], stats)
    _fix_imports(model)
    return model, dict(sorted(stats.items()))


def _apply_rules(model: onnx.ModelProto, names: tuple[str, ...], stats: Counter) -> onnx.ModelProto:
    """``model`` rewritten by the named rule sets of :mod:`.rules` (rewrites counted in ``stats``)."""
    if not names:
        return model
    from onnxscript import ir

    from . import rules

    graph = ir.serde.deserialize_model(model)
    for name in names:
        done = getattr(rules, f"{name}_rules").apply_to_model(graph)
        if done:
            stats[name] += done
    return ir.serde.serialize_model(graph)


def _fuse_gelu(model: onnx.ModelProto) -> int:
    """Erf-based GELU subgraphs -> ``com.microsoft.Gelu`` in place; returns how many."""
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    before = sum(n.op_type == "Erf" for n in model.graph.node)
    FusionGelu(wrapped).apply()
    fused = before - sum(n.op_type == "Erf" for n in model.graph.node)
    if fused:
        wrapped.prune_graph(allow_remove_graph_inputs=False)
        wrapped.topological_sort()
    return fused


def _group_sum_nodes(
    x: str, k_blocks: int, group: int, out: str, name: str, graph: onnx.GraphProto, done_inits: set[str]
) -> list[onnx.NodeProto]:
    """``out[..., j] = sum(x[..., j*G:(j+1)*G])``: reshape the last axis to ``[K/G, G]``, ReduceSum."""
    dims, axis = f"mpismoe_groups_{k_blocks}x{group}", "mpismoe_last_axis"
    for init, value in ((dims, [k_blocks, group]), (axis, [-1])):
        if init not in done_inits:
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), init))
            done_inits.add(init)
    return [
        onnx.helper.make_node("Shape", [x], [f"{out}_lead"], name=f"{name}_lead", end=-1),
        onnx.helper.make_node("Concat", [f"{out}_lead", dims], [f"{out}_shape"], name=f"{name}_shape", axis=0),
        onnx.helper.make_node("Reshape", [x, f"{out}_shape"], [f"{out}_groups"], name=f"{name}_reshape"),
        onnx.helper.make_node("ReduceSum", [f"{out}_groups", axis], [out], name=name, keepdims=0),
    ]


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
