"""torch -> ONNX: a model with the ``mpismoe::*`` custom ops to a portable ONNX ModelProto.

The model contract (what :func:`to_onnx` needs from an ``nn.Module``):

* ``forward(**inputs)`` takes the tensors named by ``model.input_names`` (default: the text
  inputs ``input_ids``/``attention_mask``/``token_type_ids`` its ``forward`` accepts) as
  keyword arguments and returns the logits tensor: ``[batch, num_outputs]``, or
  ``[batch, seq, num_labels]`` for token classification (one row per token, padding included);
* quantized Linear layers call ``torch.ops.mpismoe.qmatmul``, quantized embeddings
  ``torch.ops.mpismoe.qgather``, and routers call
  ``torch.ops.mpismoe.topk_route`` (both become ``ai.mpismoe`` nodes);
* optionally ``model.config`` (a :class:`~mpismoe_edge.config.ModelConfig`) and
  ``model.tokenizer_json`` for the manifest and tokenizer file;
* optionally submodules with a ``prepare_export()`` method (called right before tracing),
  e.g. ISMoE layers stacking their experts into one wide FFN.

Export goes through ``torch.onnx.export(dynamo=True)`` with a custom translation table that
emits plain ``ai.mpismoe`` nodes (the exporter's version converter would inline a function
handed to it directly); the model-local functions from :mod:`.functions` are attached
afterwards, so each op stays one node a runtime may replace, with a standard-ONNX body any
runtime can inline. Batch and sequence axes stay dynamic (the inputs' and, for per-token
logits, the output's).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import onnx
import torch
from torch import nn

from mpismoe_edge.runtime.spec import IMAGE_INPUTS, OUTPUT_NAME, TEXT_INPUTS

from . import functions as F

MAX_IR_VERSION = 13  # the newest IR onnxruntime 1.31 reads (onnx 1.23 writes 14 by default)
MIN_IR_VERSION = 10


def input_names(model: nn.Module) -> list[str]:
    """The inputs the exported graph takes, in order."""
    names = getattr(model, "input_names", None)
    if names:
        return list(names)
    params = inspect.signature(model.forward).parameters
    found = [n for n in (*TEXT_INPUTS, *IMAGE_INPUTS) if n in params]
    if not found:
        raise ValueError(
            f"{type(model).__name__}.forward takes none of {TEXT_INPUTS + IMAGE_INPUTS}; set model.input_names"
        )
    return found


def _backbone_config(model: nn.Module) -> Any:
    backbone = getattr(model, "backbone", None)
    return getattr(backbone, "config", None) or getattr(model, "config", None)


def vocab_size(model: nn.Module) -> int:
    cfg = _backbone_config(model)
    size = getattr(cfg, "vocab_size", None)
    if size is None and hasattr(getattr(model, "config", None), "backbone_config"):
        size = model.config.backbone_config.get("vocab_size")
    return int(size) if size else 100


def make_inputs(
    model: nn.Module, batch: int, seq: int, lengths: list[int] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for ``model``: token ids in its vocabulary, rows padded to ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    names = input_names(model)
    lengths = lengths or [seq] * batch
    feed: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "input_ids":
            ids = torch.randint(1, vocab_size(model), (batch, seq), generator=gen)
            for row, n in enumerate(lengths):
                ids[row, n:] = 0
            feed[name] = ids
        elif name == "attention_mask":
            mask = torch.zeros(batch, seq, dtype=torch.long)
            for row, n in enumerate(lengths):
                mask[row, :n] = 1
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = torch.zeros(batch, seq, dtype=torch.long)
        elif name == "pixel_values":
            cfg = _backbone_config(model)
            size, ch = int(getattr(cfg, "image_size", 16)), int(getattr(cfg, "num_channels", 3))
            feed[name] = torch.randn(batch, ch, size, size, generator=gen)
        else:
            raise ValueError(f"don't know how to make example input {name!r}")
    return feed


def _dynamic_shapes(names: list[str]) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence")
    return {n: ({0: batch} if n in IMAGE_INPUTS else {0: batch, 1: seq}) for n in names}


def _translation_table() -> dict:
    """torch custom op -> a function emitting the matching plain ``ai.mpismoe`` node."""
    from onnxscript.values import Opset

    F.register_schemas()
    ms = Opset(F.DOMAIN, F.DOMAIN_VERSION)

    def qmatmul(x, qweight, scales, zeros, bits: int, group_size: int):
        return ms.QMatMul(x, qweight, scales, zeros, bits=bits, group_size=group_size)

    def qgather(ids, qweight, scales, zeros, bits: int, group_size: int):
        return ms.QGather(ids, qweight, scales, zeros, bits=bits, group_size=group_size)

    def topk_route(logits, k: int):
        return ms.TopKRoute(logits, k=k)

    def masked_attention(q, k, v, mask, heads: int):
        return ms.MaskedAttention(q, k, v, mask, num_heads=heads)

    return {
        torch.ops.mpismoe.qmatmul.default: qmatmul,
        torch.ops.mpismoe.qgather.default: qgather,
        torch.ops.mpismoe.topk_route.default: topk_route,
        torch.ops.mpismoe.masked_attention.default: masked_attention,
    }


def ir_version_for(opset: int) -> int:
    """The IR version to stamp: at least 10, what ``opset`` needs, and no newer than ORT reads."""
    need = MIN_IR_VERSION
    for row in onnx.helper.VERSION_TABLE:  # (release, ir, default opset, ...), oldest first
        if row[2] >= opset:
            need = max(MIN_IR_VERSION, row[1])
            break
    return min(need, MAX_IR_VERSION)


def finalize(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Attach the ai.mpismoe functions (those used), strip exporter metadata, set IR version."""
    used = {n.op_type for n in proto.graph.node if n.domain == F.DOMAIN}
    del proto.functions[:]
    proto.functions.extend(f for f in F.function_protos(opset) if f.name in used)
    imports = {i.domain: i.version for i in proto.opset_import}
    if used:
        imports[F.DOMAIN] = F.DOMAIN_VERSION
    else:
        imports.pop(F.DOMAIN, None)
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    _strip_metadata(proto.graph)
    proto.doc_string = ""
    proto.ir_version = ir_version_for(opset)
    return proto


def _strip_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node stack traces etc.: smaller, path-free, reproducible files."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_metadata(attr.g)
            for g in attr.graphs:
                _strip_metadata(g)
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            del v.metadata_props[:]
            v.doc_string = ""
    for t in graph.initializer:
        del t.metadata_props[:]
    del graph.metadata_props[:]
    graph.doc_string = ""


def to_onnx(
    model: nn.Module, opset: int = F.MIN_OPSET, optimize: bool = True, output_names: list[str] | None = None
) -> onnx.ModelProto:
    """Export ``model`` (put in eval mode) to an in-memory portable ONNX model.

    Weights are embedded in the returned proto (callers decide on external data when saving).
    ``output_names``: for a model returning several tensors (default: the one ``logits``).
    """
    if opset < F.MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exported ops need opset >= {F.MIN_OPSET}")
    model.eval()
    for module in model.modules():
        prepare = getattr(module, "prepare_export", None)
        if callable(prepare):
            prepare()
    names = input_names(model)
    example = make_inputs(model, batch=2, seq=8, lengths=[8, 5])
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." and the like
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter about axis names / deprecations
            program = _export(model, example, names, opset, optimize, output_names or [OUTPUT_NAME])
    finally:
        quiet.setLevel(level)
    return finalize(program.model_proto, opset)


def _export(model, example, names, opset, optimize, output_names):
    return torch.onnx.export(
        model,
        (),
        kwargs=example,
        dynamo=True,
        opset_version=opset,
        input_names=names,
        output_names=output_names,
        dynamic_shapes=_dynamic_shapes(names),
        custom_translation_table=_translation_table(),
        optimize=optimize,
        verbose=False,
        report=False,
    )
