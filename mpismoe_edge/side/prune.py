"""Initialise the side network from the backbone it rides on (LST's pruned init, MoEfied).

The side width ``D`` keeps the ``D`` backbone hidden dimensions that weigh most in the
backbone's feed-forward layers; every down-projection starts as the selection of those
dimensions, so side tokens begin in the backbone's own coordinates. Each side FFN then starts
as a slice of its backbone layer's FFN restricted to them: the ``I`` intermediate units are
split into ``E`` contiguous groups, one per expert, and each expert takes the heaviest units of
its group (all of them when ``E * hidden == I``, the default for MiniLM: the 8 experts inherit
the whole FFN). A dense FFN (``E = 1``, the LST baseline) can take only its ``hidden`` heaviest
units. Hidden units beyond a group's size keep their random init. Attention stays random.
A backbone already quantized (``QuantLinear``) lends its dequantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import QuantLinear
from .ladder import LadderSideNetwork
from .moe import ISMoE

_Linear = nn.Linear | QuantLinear


def backbone_ffns(backbone: nn.Module, num_layers: int, hidden: int) -> list[tuple[_Linear, _Linear]]:
    """``(up, down)`` Linears of each backbone layer's FFN: ``hidden -> I`` and ``I -> hidden``, widest ``I``."""
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    for stack in stacks:
        pairs = [_ffn_pair(layer, hidden) for layer in stack]
        if all(p is not None for p in pairs):
            return pairs  # type: ignore[return-value]
    raise ValueError(
        f"backbone {type(backbone).__name__}: found no feed-forward Linear pair ({hidden} -> I -> {hidden}) "
        f"in each of its {num_layers} layers; use SideConfig(init='random')"
    )


def _ffn_pair(layer: nn.Module, hidden: int) -> tuple[_Linear, _Linear] | None:
    linears = [m for m in layer.modules() if type(m) in (nn.Linear, QuantLinear)]
    ups = sorted(
        (m for m in linears if m.in_features == hidden and m.out_features > hidden), key=lambda m: -m.out_features
    )
    for up in ups:
        downs = [m for m in linears if m.in_features == up.out_features and m.out_features == hidden]
        if downs:
            return up, downs[0]
    return None


@torch.no_grad()
def init_from_backbone(side: LadderSideNetwork, backbone: nn.Module) -> None:
    """Overwrite ``side``'s down-projections and FFN weights with slices of ``backbone`` (float or quantized)."""
    hidden, dim = side.embed_down.in_features, side.embed_down.out_features
    ffns = backbone_ffns(backbone, int(backbone.config.num_hidden_layers), hidden)
    weights = [(_weight(up), _weight(down)) for up, down in ffns]
    mass = sum(w_up.pow(2).sum(0) + w_down.pow(2).sum(1) for w_up, w_down in weights)
    keep = mass.topk(dim).indices.sort().values
    for down in (side.embed_down, *(b.down for b in side.blocks)):
        down.weight.zero_()
        down.weight[torch.arange(dim), keep] = 1.0
        down.bias.zero_()
    for i, block in zip(side.layers, side.blocks):
        (up, down), (w_up, w_down) = ffns[i - 1], weights[i - 1]
        w1, b1 = w_up[:, keep], _bias(up)
        w2, b2 = w_down[keep], _bias(down)[keep]
        experts = list(block.ffn.experts) if isinstance(block.ffn, ISMoE) else [block.ffn.ffn]
        importance = w1.norm(dim=1) * w2.norm(dim=0)
        for expert, group in zip(experts, torch.arange(w1.shape[0]).tensor_split(len(experts))):
            units = group[importance[group].topk(min(len(group), expert.fc1.out_features)).indices]
            n = len(units)
            expert.fc1.weight[:n] = w1[units]
            expert.fc1.bias[:n] = b1[units]
            expert.fc2.weight[:, :n] = w2[:, units]
            expert.fc2.bias.copy_(b2)


def _weight(linear: _Linear) -> torch.Tensor:
    return linear.dequantized_weight() if isinstance(linear, QuantLinear) else linear.weight.float()


def _bias(linear: _Linear) -> torch.Tensor:
    return linear.bias.float() if linear.bias is not None else torch.zeros(linear.out_features)
