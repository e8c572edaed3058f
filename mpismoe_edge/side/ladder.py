"""The ladder side network (after Ladder Side-Tuning) with ISMoE feed-forward layers.

A narrow transformer (width = backbone hidden / r) runs beside the frozen backbone. Before
side block i, a learned gate mixes the side stream with a down-projection of backbone layer
i: ``h = mu_i * h + (1 - mu_i) * down_i(backbone_i)``, ``mu_i = sigmoid(alpha_i)``. Gradients
flow only through the side network; the backbone states arrive detached.

With ``SideConfig.skip`` the head's output also gets a linear map of the frozen states
themselves (embeddings and every tapped layer, each layer-normalized; mean-pooled for sequence
tasks): the linear probe of the frozen features inside the model, still with no backward
through the backbone. Zero here; training fits it in closed form first (``skip_fit.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import SideConfig
from .moe import DenseFFN, ISMoE


class SideAttention(nn.Module):
    """Multi-head self-attention with a key padding mask: plain ops in eager mode, one
    ``mpismoe::masked_attention`` op (the same math) under export."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"side width {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None and torch.compiler.is_exporting():
            # one ai.mpismoe.MaskedAttention node in the exported graph (the same math, no dropout at export)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.out(ops.masked_attention(q, k, v, mask, self.heads))
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attn = self.drop(scores.softmax(-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, d))


class SideBlock(nn.Module):
    """Gated ladder input, self-attention, then the (IS)MoE feed-forward layer."""

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig):
        super().__init__()
        self.down = nn.Linear(backbone_dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SideAttention(dim, cfg.num_heads, cfg.dropout)
        self.ffn = (DenseFFN if cfg.dense_ffn else ISMoE)(dim, backbone_dim, cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, bb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bb_token = self.down(bb)
        mu = torch.sigmoid(self.gate)
        h = mu * h + (1 - mu) * bb_token
        h = h + self.drop(self.attn(self.ln1(h), mask))
        return h + self.drop(self.ffn(self.ln2(h), bb_token, bb, mask))


class LadderSideNetwork(nn.Module):
    """Side blocks over the chosen backbone layers, upsampled and fed to a task head: mean-pooled
    for sequence tasks (logits ``[batch, outputs]``), per token when ``token_level`` (logits
    ``[batch, seq, outputs]``)."""

    def __init__(
        self, backbone_dim: int, num_layers: int, num_outputs: int, cfg: SideConfig, token_level: bool = False
    ):
        super().__init__()
        self.token_level = token_level
        dim = backbone_dim // cfg.reduction
        self.layers = list(cfg.layers) if cfg.layers else list(range(1, num_layers + 1))
        bad = [i for i in self.layers if not 1 <= i <= num_layers]
        if bad:
            raise ValueError(f"side layers {bad} out of range: the backbone has layers 1..{num_layers}")
        self.embed_down = nn.Linear(backbone_dim, dim)
        self.blocks = nn.ModuleList(SideBlock(dim, backbone_dim, cfg) for _ in self.layers)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, backbone_dim)
        self.head = nn.Linear(backbone_dim, num_outputs)
        self.drop = nn.Dropout(cfg.dropout)
        self.skip = nn.Linear(backbone_dim * (len(self.layers) + 1), num_outputs) if cfg.skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def forward(self, hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
        h = self.embed_down(hidden_states[0])
        for i, block in zip(self.layers, self.blocks):
            h = block(h, hidden_states[i], mask)
        out = self.head(self.drop(nn.functional.gelu(self.up(self._pool(self.norm(h), mask)))))
        if self.skip is None:
            return out
        return out + self.skip(self.drop(self.skip_features(hidden_states, mask)))

    def skip_features(self, hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
        """The skip's input: the embeddings and every tapped layer, each pooled and layer-normalized, concatenated."""
        taps = [hidden_states[0], *(hidden_states[i] for i in self.layers)]
        return torch.cat([nn.functional.layer_norm(self._pool(s, mask), s.shape[-1:]) for s in taps], -1)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Masked mean over tokens for sequence tasks; per-token states pass through."""
        if self.token_level:
            return h
        if mask is None:
            return h.mean(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def moe_layers(self) -> list[ISMoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, ISMoE)]
