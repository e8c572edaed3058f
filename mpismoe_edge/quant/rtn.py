"""Round-to-nearest (min-max, asymmetric) group quantization: the baseline every method beats.

Also home of the pieces every quantizer shares: input checks, grouping and the result type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pack import SUPPORTED_BITS


@dataclass
class GroupQuant:
    """Unpacked result of a group quantizer for a weight ``[N, K]`` with groups of G along K."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K // G]
    zeros: torch.Tensor  # float32 [N, K // G]; integer-valued at 8 bits
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        c = self.codes.reshape(n, -1, self.group_size).float()
        w = (c - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.reshape(n, k)


def check_weight(weight: torch.Tensor, bits: int, group_size: int, name: str = "weight") -> None:
    """Raise ValueError naming ``name`` and the problem if the weight cannot be group-quantized."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"{name}: group size {group_size} must be a power of two >= 16")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: empty weight of shape {tuple(weight.shape)}")
    if weight.shape[1] % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide in_features {weight.shape[1]}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")


def as_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` float weight as ``[N * K/G, G]`` float32 rows."""
    return weight.detach().float().reshape(-1, group_size)


def from_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: torch.Size, bits: int, group_size: int
) -> GroupQuant:
    n, k = shape
    return GroupQuant(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scales.reshape(n, k // group_size).float().contiguous(),
        zeros=zeros.reshape(n, k // group_size).float().contiguous(),
        bits=bits,
        group_size=group_size,
    )


def minmax_params(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero point per row of ``w`` ``[M, G]``."""
    lo, hi = torch.aminmax(w, dim=1)
    scale = ((hi - lo) / qmax).clamp_(min=1e-12)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round-to-nearest codes of rows ``w`` ``[M, G]`` for per-row scale and zero point (one
    temporary: quantization-aware training runs this on every step)."""
    return (w / scale[:, None]).add_(zero[:, None]).round_().clamp_(0, qmax)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, name: str = "weight") -> GroupQuant:
    """Min-max asymmetric round-to-nearest quantization in groups along the input dimension."""
    check_weight(weight, bits, group_size, name)
    qmax = (1 << bits) - 1
    w = as_groups(weight, group_size)
    scale, zero = minmax_params(w, qmax)
    return from_groups(encode(w, scale, zero, qmax), scale, zero, weight.shape, bits, group_size)
