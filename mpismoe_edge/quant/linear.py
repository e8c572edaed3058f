"""QuantLinear: a Linear layer whose weight lives packed in low bits and is dequantized on use."""

from __future__ import annotations

import threading

import torch
from torch import nn

from .. import ops
from .pack import dequantize, pack_codes
from .rtn import GroupQuant


class _Scratch(threading.local):
    """Per-thread buffers that frozen (no-grad) forwards dequantize into: grown to the largest
    layer and reused by every layer, instead of a fresh weight-sized allocation per layer per
    forward (on CPU each one is an mmap and its page faults)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf


_SCRATCH = _Scratch()


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding ``qweight``/``scales``/``zeros`` (shared layout) as buffers."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        k_blocks = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, k_blocks, group_size * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, k_blocks))
        self.register_buffer("zeros", torch.zeros(out_features, k_blocks))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, q: GroupQuant, bias: torch.Tensor | None) -> QuantLinear:
        n, k = q.codes.shape
        m = cls(k, n, q.bits, q.group_size, bias=bias is not None)
        m.qweight.copy_(pack_codes(q.codes, q.bits, q.group_size))
        m.scales.copy_(q.scales)
        m.zeros.copy_(q.zeros)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def _frozen_weight(self) -> torch.Tensor:
        """:meth:`dequantized_weight` in this thread's scratch buffers: valid until the next call,
        for a forward that keeps nothing (3-bit layers, and graphs being compiled, get a fresh tensor)."""
        if self.bits == 3 or torch.compiler.is_compiling():
            return self.dequantized_weight()
        numel, device = self.out_features * self.in_features, self.qweight.device
        scratch = (_SCRATCH.get(numel, torch.uint8, device), _SCRATCH.get(numel, self.scales.dtype, device))
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(
            x.device.type
        ):  # compute in autocast's dtype: the weight is dequantized straight to it
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if not (torch.is_grad_enabled() or torch.compiler.is_exporting()):
            # the frozen backbone's path: nothing is kept for a backward, so the bias goes into the
            # GEMM (one addmm, as nn.Linear) instead of a pass of its own over the output
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return torch.nn.functional.linear(x, self._frozen_weight().to(x.dtype), bias)
        y = ops.qmatmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )
