"""QuantEmbedding: an embedding table stored packed in low bits; only the looked-up rows are dequantized."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .pack import dequantize, pack_codes
from .rtn import GroupQuant


class QuantEmbedding(nn.Module):
    """Drop-in for a frozen ``nn.Embedding``: rows in the shared packed layout (groups along the
    embedding dimension), so the table costs ``bits/8`` bytes per value instead of 4."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, padding_idx: int | None = None
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        k_blocks = embedding_dim // group_size
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings, k_blocks, group_size * bits // 8, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(num_embeddings, k_blocks))
        self.register_buffer("zeros", torch.zeros(num_embeddings, k_blocks))

    @classmethod
    def from_quantized(cls, q: GroupQuant, padding_idx: int | None = None) -> QuantEmbedding:
        n, d = q.codes.shape
        m = cls(n, d, q.bits, q.group_size, padding_idx)
        m.qweight.copy_(pack_codes(q.codes, q.bits, q.group_size))
        m.scales.copy_(q.scales)
        m.zeros.copy_(q.zeros)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.qgather(ids, self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
