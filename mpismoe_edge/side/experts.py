"""Experts of the side MoE: small FFNs, optionally trained quantization-aware and then packed."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import QuantLinear
from ..quant.rtn import check_weight, encode, minmax_params, rtn_quantize


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` trained with its weight fake-quantized (RTN, straight-through estimator)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__(in_features, out_features)
        self.bits, self.group_size = bits, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, straight_through(self.weight, self.bits, self.group_size), self.bias)


def straight_through(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` fake-quantized in the forward pass, the identity in the backward pass (STE); any
    leading dimensions (e.g. several experts' weights stacked) are independent groups."""
    return _StraightThrough.apply(w, bits, group_size)


class _StraightThrough(torch.autograd.Function):
    """``w + (fake_quantize(w) - w).detach()`` in one node: no ``w``-sized temporaries of its own."""

    @staticmethod
    def forward(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        return fake_quantize(w.detach(), bits, group_size)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN quantize-dequantize of ``w`` in groups along the input dimension (same grid as rtn_quantize)."""
    qmax = (1 << bits) - 1
    g = w.reshape(-1, group_size)
    scale, zero = minmax_params(g, qmax)
    return encode(g, scale, zero, qmax).sub_(zero[:, None]).mul_(scale[:, None]).reshape(w.shape)


def _linear(i: int, o: int, bits: int | None, group_size: int) -> nn.Module:
    if bits is None:
        return nn.Linear(i, o)
    check_weight(torch.zeros(o, i), bits, group_size, name=f"expert Linear({i}->{o})")
    return FakeQuantLinear(i, o, bits, group_size)


class Expert(nn.Module):
    """Two-layer GELU FFN."""

    def __init__(self, dim: int, hidden: int, bits: int | None = None, group_size: int = 16):
        super().__init__()
        self.fc1 = _linear(dim, hidden, bits, group_size)
        self.fc2 = _linear(hidden, dim, bits, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


@torch.no_grad()
def pack_expert_linears(module: nn.Module) -> None:
    """Replace every FakeQuantLinear under ``module`` with a packed QuantLinear on the grid it
    was trained on (:func:`fake_quantize`'s: min-max RTN, integer zero points), so the packed
    layer computes what training and validation saw. Its integer zero points are also what ONNX
    Runtime's fast ``MatMulNBits`` path takes. (Re-quantizing with GNP-IQ, as before, fitted the
    float latent weights, which no forward pass ever used, and gave fractional zero points.)"""
    for name, child in list(module.named_modules()):
        if isinstance(child, FakeQuantLinear):
            q = rtn_quantize(child.weight, child.bits, child.group_size, name)
            module.set_submodule(name, QuantLinear.from_quantized(q, child.bias))
