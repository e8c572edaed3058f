"""The backbone as ONNX Runtime's own BERT optimizer fuses it: one ``EmbedLayerNormalization``,
an ``Attention`` per layer, two ``SkipLayerNormalization`` and a ``BiasGelu`` per layer.

ORT's optimizer matches the graph that the TorchScript exporter (``dynamo=False``) writes for a
Hugging Face model with eager attention (the graph a CPU user gets from Hugging Face's
exporter); it does not match the dynamo graph. So the frozen backbone goes that way: a float
copy whose weights are the packed layers' dequantized weights (bit for bit what the PyTorch
model multiplies by), exported with every hidden state as a graph output (the ladder reads
them all), then fused. :mod:`.int8` swaps the float weights back for packed codes.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections import Counter

import onnx
import torch
from torch import nn

from .lower import input_names

BACKBONE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu")


def hidden_name(i: int) -> str:
    """Graph name of backbone hidden state ``i`` (0: the embeddings' output)."""
    return f"backbone_hidden_{i}"


@torch.no_grad()
def float_backbone(model: nn.Module) -> nn.Module:
    """A copy of ``model.backbone`` with every packed layer replaced by a float one holding its
    dequantized weight, and eager attention (the form ORT's optimizer matches)."""
    from mpismoe_edge.quant.embedding import QuantEmbedding
    from mpismoe_edge.quant.linear import QuantLinear

    bb = copy.deepcopy(model.backbone).eval()
    swaps = {}
    for name, mod in bb.named_modules():
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.copy_(mod.dequantized_weight())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            swaps[name] = lin
        elif isinstance(mod, QuantEmbedding):
            emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx)
            emb.weight.copy_(mod.dequantized_weight())
            swaps[name] = emb
    for name, new in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(bb.get_submodule(parent) if parent else bb, child, new)
    bb.set_attn_implementation("eager")
    return bb.eval().requires_grad_(False)


class _States(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
            return_dict=True,
        )
        return tuple(out.hidden_states)


def supports(model: nn.Module) -> str | None:
    """None if ``model``'s backbone can take this path, else why not (one line)."""
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert":
        return f"the int8 path fuses BERT backbones only (this one is {getattr(cfg, 'model_type', None)!r})"
    if tuple(input_names(model)) != BACKBONE_INPUTS:
        return f"the int8 path needs inputs {BACKBONE_INPUTS}, the model takes {tuple(input_names(model))}"
    return None


def fused_backbone(model: nn.Module, opset: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The backbone of ``model`` exported the TorchScript way and fused by ORT's BERT optimizer;
    outputs :func:`hidden_name` ``(0..L)``. Raises ValueError when a fusion did not happen."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    why = supports(model)
    if why:
        raise ValueError(why)
    cfg = model.backbone.config
    layers = int(cfg.num_hidden_layers)
    wrapper = _States(float_backbone(model)).eval()
    ids = torch.ones(1, 8, dtype=torch.long)
    names = [hidden_name(i) for i in range(layers + 1)]
    axes = {n: {0: "batch", 1: "sequence"} for n in (*BACKBONE_INPUTS, *names)}
    buf = io.BytesIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, ids.clone(), torch.zeros_like(ids)),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=list(BACKBONE_INPUTS),
                output_names=names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    finally:
        quiet.setLevel(level)
    proto = onnx.load_from_string(buf.getvalue())
    options = FusionOptions("bert")
    ort_log = logging.getLogger("onnxruntime.transformers")  # fusion chatter at INFO/WARNING
    old = ort_log.level
    ort_log.setLevel(logging.ERROR)
    try:
        bert = BertOnnxModel(proto, int(cfg.num_attention_heads), int(cfg.hidden_size))
        bert.optimize(options)
    finally:
        ort_log.setLevel(old)
    proto = bert.model
    if not any(i.domain == "com.microsoft" for i in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    counts = Counter(n.op_type for n in proto.graph.node)
    want = {"EmbedLayerNormalization": 1, "Attention": layers, "SkipLayerNormalization": 2 * layers, "BiasGelu": layers}
    missing = {op: (counts.get(op, 0), n) for op, n in want.items() if counts.get(op, 0) != n}
    if missing:
        raise ValueError(
            "ORT's BERT optimizer did not fuse the backbone as expected: "
            + ", ".join(f"{op} {got} (want {n})" for op, (got, n) in missing.items())
        )
    return proto, {op: counts[op] for op in FUSED_OPS}
