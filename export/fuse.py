"""A target's graph rewrites of the portable model: each one an onnxscript rewriter rule.

* ``ai.mpismoe.QMatMul`` -> ``com.microsoft.MatMulNBits`` at the widths the target's record
  lists (``TargetSpec.packed_bits``; :mod:`.rules.qmatmul_nbits`; 3-bit nodes and weights that
  are not initializers keep the portable function);
* then the rule sets the record names (``TargetSpec.rules``: ``gelu``, ``masked_attention``).

A target with neither (``portable``) gets its graph back untouched.

``TopKRoute`` stays the portable function on every target.
"""

from __future__ import annotations

from collections import Counter

import onnx

from mpismoe_edge.runtime.spec import TARGET_SPECS

from . import functions as F
from .functions import MS_DOMAIN
from .validate import DEFAULT_ATOL

# the one int8 target (runtime/spec.py): its backbone has its own path (int8_target.py), fuse()
# lowers its side network and its float layers
INT8_TARGET = next(name for name, t in TARGET_SPECS.items() if t.int8)


def default_atol(target: str) -> float:
    """The parity tolerance export validation uses for ``target`` unless told otherwise."""
    return TARGET_SPECS[target].atol if target in TARGET_SPECS else DEFAULT_ATOL


def fuse(
    model: onnx.ModelProto, target: str, zero_points: str = "auto", accuracy_level: int = 0
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` rewritten for ``target``, and counts of what each rule did.

    ``zero_points="auto"`` (integers as packed uint8, fractional ones by the shift identity)
    runs ORT's fast kernels; ``"float"`` hands fractional zero points to the kernel as floats
    (2/4 bits; exact, but ORT's CPU kernel is 2-3x slower on that path). Integer zero points go
    as packed uint8 in both modes.
    ``accuracy_level`` is MatMulNBits' attribute: 0 computes in the input's float type (matches
    PyTorch to float rounding); 4 lets ORT's CPU kernel quantize activations to int8 per block
    (faster where int8 dot products are, at an activation-rounding error).
    """
    if target not in TARGET_SPECS:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGET_SPECS)}")
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
    from onnxscript import ir

    from . import rules

    spec = TARGET_SPECS[target]
    stats: Counter = Counter()
    lowering = rules.qmatmul_nbits_rules(tuple(spec.packed_bits), stats, zero_points, accuracy_level)
    if not spec.packed_bits and not spec.rules:
        return model, {}
    graph = ir.serde.deserialize_model(model)
    for rule_set in lowering:
        rule_set.apply_to_model(graph)
    if stats["zero_points_shift"]:  # q/k/v of one input: one group sum
        CommonSubexpressionEliminationPass()(graph)
    for node in graph.graph:
        if node.domain == F.DOMAIN and node.op_type == "QMatMul":
            stats[f"portable_{node.attributes.get_int('bits')}bit"] += 1
    for name in spec.rules:
        stats[name] += getattr(rules, f"{name}_rules").apply_to_model(graph)
    RemoveUnusedNodesPass()(graph)
    model = ir.serde.serialize_model(graph)
    _fix_imports(model)
    return model, {k: v for k, v in sorted(stats.items()) if v}


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
