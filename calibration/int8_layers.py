"""Which backbone layers keep float compute in an ``ort-int8`` export: the "mixed precision" of
the method applied to inference, chosen from measured sensitivity.

ONNX Runtime's int8 path rounds each layer's input to uint8 per tensor on every call and its
weight to int8 per output channel. Some layers' inputs have outlier features that per-tensor
rounding crushes; on the quickstart's model that moved 3% of the test labels. Here the int8
path is simulated in PyTorch (the same rounding rules) on calibration texts:

1. all candidate layers int8: the logit error against the model itself;
2. each candidate alone back in float: how much of that error it removes (its sensitivity);
3. layers go back to float, most sensitive first, until the simulated model agrees with the
   model on every calibration text's decision and its logits are within ``atol``.

The q/k/v projections stay int8 (ONNX Runtime's ``QAttention`` takes them as one int8 weight).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Int8Plan:
    """The layers to keep in float and what the simulation measured on the calibration texts."""

    float_layers: tuple[str, ...]
    agreement: float  # decisions of the simulated export that match the model's
    max_abs_diff: float  # its largest logit difference
    all_int8_agreement: float
    all_int8_max_abs_diff: float
    sensitivity: dict[str, float] = field(default_factory=dict)  # mean |logit error| removed by each layer alone


def _fake_int8(x: torch.Tensor) -> torch.Tensor:
    """``DynamicQuantizeLinear`` and back: uint8 per tensor, the range widened to include 0."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = float(np.clip(round(-lo / scale), 0, 255))
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _int8_weight(w: torch.Tensor) -> torch.Tensor:
    """``quantize_dynamic``'s symmetric per-channel QInt8 weight, dequantized (rows = output channels)."""
    scale = (w.abs().amax(dim=1, keepdim=True) * 2 / 255).clamp(min=1e-12)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


@contextmanager
def _simulated(backbone: nn.Module, int8: Collection[str]):
    """``backbone`` with the layers named in ``int8`` computing as ONNX Runtime's int8 path does."""
    handles = []
    for name, module in backbone.named_modules():
        if name not in int8:
            continue
        weight = _int8_weight(module.dequantized_weight().float())
        bias = module.bias

        def forward(mod, args, _out, weight=weight, bias=bias):
            y = _fake_int8(args[0]) @ weight.t()
            return y if bias is None else y + bias

        handles.append(module.register_forward_hook(forward))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def choose_float_layers(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    candidates: Sequence[str],
    atol: float,
) -> Int8Plan:
    """The fewest ``candidates`` (backbone MatMul layers) to keep in float, most sensitive first,
    for the simulated int8 model to agree with ``model`` on ``batches`` (decisions, and logits
    within ``atol``); all of them when even that does not reach it."""
    from mpismoe_edge.quant.linear import QuantLinear
    from mpismoe_edge.runtime.tasks import kind

    task = kind(getattr(model.config, "task", "classification"))
    model.eval()
    backbone = model.backbone
    int8_all = {n for n, m in backbone.named_modules() if isinstance(m, QuantLinear) and n.startswith("encoder.")}
    masks = [b["attention_mask"].bool().numpy() for b in batches]
    ref = [model(**b).float().numpy() for b in batches]

    def measure(float_layers: Collection[str]) -> tuple[float, float, float]:
        with _simulated(backbone, int8_all - set(float_layers)):
            got = [model(**b).float().numpy() for b in batches]
        diffs, agree, total = [], 0, 0
        for r, g, m in zip(ref, got, masks):
            if r.ndim == 3:  # per-token logits: real tokens only
                r, g = r[m], g[m]
            diffs.append(np.abs(r - g))
            a, b = task.decisions(r), task.decisions(g)
            if a is not None:
                agree += int((a == b).sum())
                total += a.size
        d = np.concatenate([x.reshape(-1) for x in diffs])
        return (agree / total if total else 1.0), float(d.max()), float(d.mean())

    base_agree, base_max, base_mean = measure(())
    sensitivity = {name: base_mean - measure([name])[2] for name in candidates}
    order = sorted(candidates, key=lambda n: -sensitivity[n])
    chosen: list[str] = []
    agree, worst = base_agree, base_max
    while (agree < 1.0 or worst > atol) and len(chosen) < len(order):
        chosen.append(order[len(chosen)])
        agree, worst, _ = measure(chosen)
    return Int8Plan(tuple(chosen), agree, worst, base_agree, base_max, sensitivity)
