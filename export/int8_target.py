"""The ``ort-int8`` target: ONNX Runtime's fused BERT backbone with int8 compute and int8 weights,
the embedding tables and the side network kept packed: no float copy of a packed weight.

Built from two graphs joined at the backbone's hidden states:

* the backbone (:mod:`.backbone_graph`: TorchScript export + ORT's BERT optimizer;
  :mod:`.int8`: ``QAttention`` / ``DynamicQuantizeMatMul`` with int8 weights, the embedding rows
  gathered from their packed codes, any chosen float layers as ``MatMulNBits``), outputs
  ``backbone_hidden_0..L``;
* the side network (ladder, ISMoE with every expert, head), exported with torch.onnx (dynamo)
  from those hidden states and the attention mask, then lowered by :func:`.fuse.fuse` for this
  target's record (packed experts as ``MatMulNBits``, side attention as ``MultiHeadAttention``,
  exact GELUs as ``Gelu``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection

import onnx
import torch
from torch import nn

from . import functions as F
from .backbone_graph import BACKBONE_INPUTS, fused_backbone, hidden_name, supports
from .fuse import INT8_TARGET, fuse
from .int8 import WORD_EMBEDDINGS, packed_layers, quantize_backbone
from .lower import OUTPUT_NAME, _translation_table, finalize


def unsupported(model: nn.Module) -> str | None:
    """None if ``model`` can take the ``ort-int8`` path, else why not (one line): a BERT backbone
    with packed layers and a packed word embedding table."""
    why = supports(model)
    if why:
        return why
    layers = packed_layers(model)
    if not layers:
        return "the int8 path needs a quantized backbone (this one is float)"
    if WORD_EMBEDDINGS not in layers:
        return "the int8 path gathers the packed word embeddings (this backbone's table is float)"
    return None


def int8_backbone(
    model: nn.Module, opset: int, float_layers: Collection[str] = (), zero_points: str = "auto"
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The ``ort-int8`` backbone of ``model`` (outputs its hidden states) and what each step did;
    ``float_layers`` compute in float from their packed codes (``MatMulNBits``)."""
    why = unsupported(model)
    if why:
        raise ValueError(f"{why}; export with --target portable or ort-cpu")
    proto, stats = fused_backbone(model, opset)
    proto, qstats = quantize_backbone(proto, model, float_layers)
    proto, fstats = fuse(proto, INT8_TARGET, zero_points=zero_points)  # the float layers' QMatMul -> MatMulNBits
    proto = finalize(proto, opset)  # the functions its QGather (and any 3-bit QMatMul) need
    return proto, {
        **{f"backbone_{k}": v for k, v in stats.items()},
        **qstats,
        **{f"float_{k}": v for k, v in fstats.items()},
    }


class _SideOnly(nn.Module):
    """The side network of an MP-ISMoE model as a function of the backbone's hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.side = model.side

    def forward(self, attention_mask, *states):
        return self.side(tuple(states), attention_mask)


def side_graph(model: nn.Module, opset: int) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of the side network; inputs ``attention_mask`` and the hidden states."""
    for module in model.modules():
        prepare = getattr(module, "prepare_export", None)
        if callable(prepare):
            prepare()
    cfg = model.backbone.config
    layers, width = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    states = tuple(torch.randn(2, 8, width, generator=gen) for _ in range(layers + 1))
    names = ["attention_mask"] + [hidden_name(i) for i in range(layers + 1)]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {0: batch, 1: seq}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _SideOnly(model).eval(),
                (mask, *states),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(dims, tuple([dims] * (layers + 1))),
                custom_translation_table=_translation_table(),
                optimize=True,
                verbose=False,
                report=False,
            )
    finally:
        quiet.setLevel(level)
    return finalize(program.model_proto, opset)


def join(backbone: onnx.ModelProto, side: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: the backbone's nodes, then the side's, wired by tensor name (the side's inputs
    are the backbone's inputs and outputs); the output is the side's ``logits``."""
    bg, sg = backbone.graph, side.graph
    produced = {o for n in bg.node for o in n.output} | {i.name for i in bg.input} | {t.name for t in bg.initializer}
    side_inputs = {i.name for i in sg.input}
    missing = side_inputs - produced
    if missing:
        raise ValueError(f"the backbone graph produces none of the side network's inputs {sorted(missing)}")
    side_names = {o for n in sg.node for o in n.output} | {t.name for t in sg.initializer}
    clash = side_names & produced
    if clash:
        raise ValueError(f"backbone and side graphs share tensor names: {sorted(clash)[:5]}")
    graph = onnx.helper.make_graph(
        list(bg.node) + list(sg.node),
        "mpismoe",
        inputs=[i for i in bg.input if i.name in BACKBONE_INPUTS],
        outputs=list(sg.output),
        initializer=list(bg.initializer) + list(sg.initializer),
    )
    imports: dict[str, int] = {}
    for proto in (backbone, side):
        for imp in proto.opset_import:
            imports[imp.domain] = max(imports.get(imp.domain, 0), imp.version)
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items())],
        functions=list(side.functions),
    )
    model.ir_version = side.ir_version
    return model


def int8_side(side: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The side network as ``ort-int8`` writes it: packed layers as ``MatMulNBits``, one node per
    layer and the codes resident as they are; integer zero points (experts packed on their
    training grid) as packed uint8, ORT's fast path, fractional ones (older checkpoints) as floats.
    Folding them to float at load ran ~1.5 ms faster per 1x128 run on the quickstart's model but
    held ~25 MB more after load: the memory target won."""
    return fuse(side, INT8_TARGET, zero_points="float")


def int8_model(
    model: nn.Module, opset: int = F.MIN_OPSET, zero_points: str = "auto", float_layers: Collection[str] = ()
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The ``ort-int8`` graph of ``model`` and counts of what each step fused (``zero_points``
    is :func:`.fuse.fuse`'s, for the layers it lowers). ValueError if :func:`unsupported`."""
    backbone, stats = int8_backbone(model, opset, float_layers, zero_points)
    side, sstats = int8_side(side_graph(model, opset))
    joined = finalize(join(backbone, side), opset)
    return joined, {**stats, **{f"side_{k}": v for k, v in sstats.items()}}
