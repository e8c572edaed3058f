"""The ``ort-int8`` target: ONNX Runtime's fused BERT backbone with int8 compute, packed weights in
the file, and the side network as the ``ort-cpu`` target writes it.

Built from two graphs joined at the backbone's hidden states:

* the backbone (:mod:`.backbone_graph`: TorchScript export + ORT's BERT optimizer;
  :mod:`.int8`: ``QAttention`` / ``DynamicQuantizeMatMul`` with weights folded from the packed
  codes at session load), outputs ``backbone_hidden_0..L``;
* the side network (ladder, ISMoE with every expert, head), exported with torch.onnx (dynamo)
  from those hidden states and the attention mask, then fused as for ``ort-cpu``
  (:func:`.fuse.fuse`: packed experts as ``MatMulNBits``, exact GELUs as ``Gelu``).
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from . import functions as F
from .backbone_graph import BACKBONE_INPUTS, fused_backbone, hidden_name, supports
from .fuse import fuse
from .int8 import FOLDABLE_BITS, packed_layers, quantize_backbone
from .lower import OUTPUT_NAME, _translation_table, finalize


def unsupported(model: nn.Module) -> str | None:
    """None if ``model`` can take the ``ort-int8`` path, else why not (one line): a BERT backbone
    whose layers are packed at 2, 4 or 8 bits."""
    why = supports(model)
    if why:
        return why
    widths = {int(m.bits) for m in packed_layers(model).values()}
    if not widths:
        return "the int8 path needs a quantized backbone (this one is float)"
    if not widths <= set(FOLDABLE_BITS):
        foldable = "/".join(map(str, FOLDABLE_BITS))
        return f"the int8 path unpacks {foldable}-bit backbone layers, this one has {sorted(widths)}"
    return None


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


def int8_model(
    model: nn.Module, opset: int = F.MIN_OPSET, zero_points: str = "auto"
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The ``ort-int8`` graph of ``model`` and counts of what each step fused (``zero_points``
    is :func:`.fuse.fuse`'s, for side layers it lowers). ValueError if :func:`unsupported`."""
    why = unsupported(model)
    if why:
        raise ValueError(f"{why}; export with --target portable or ort-cpu")
    backbone, stats = fused_backbone(model, opset)
    backbone, qstats = quantize_backbone(backbone, model)
    # packed side layers stay portable functions: ORT folds them to float at load (the side is
    # narrow: 3.5 MB of float experts on MiniLM-L6), and float GEMMs of K or N = 48 ran faster
    # than MatMulNBits; only the exact GELUs are fused.
    side, sstats = fuse(side_graph(model, opset), "portable", zero_points=zero_points)
    joined = join(backbone, side)
    return joined, {
        **{f"backbone_{k}": v for k, v in stats.items()},
        **qstats,
        **{f"side_{k}": v for k, v in sstats.items()},
    }
