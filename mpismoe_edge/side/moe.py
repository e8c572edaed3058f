"""ISMoE feed-forward layer: E experts, interactive top-k router, optional shared expert."""
from __future__ import annotations

import torch
from torch import nn

from ..config import SideConfig
from .experts import Expert
from .router import InteractiveRouter, load_balance_loss, z_loss


class ISMoE(nn.Module):
    """Mixture of side experts routed by :class:`InteractiveRouter`.

    All experts run on all tokens and are mixed by the dense routing weights (zero for the
    experts a token does not pick). The side experts are tiny, so this costs little, keeps
    the graph static for ONNX export and puts every expert in the exported model.
    """

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig, packed: bool = False):
        super().__init__()
        hidden = cfg.expert_ratio * dim
        make = lambda: Expert(dim, hidden, cfg.expert_bits, cfg.expert_group_size, packed)  # noqa: E731
        self.router = InteractiveRouter(dim, backbone_dim, cfg.num_experts, cfg.top_k, cfg.salient_tau, cfg.interactive)
        self.experts = nn.ModuleList(make() for _ in range(cfg.num_experts))
        self.shared = make() if cfg.shared_expert else None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.last_load = torch.zeros(cfg.num_experts)
        self.track_load = False  # count tokens per expert in eval too (training always does)

    def forward(self, x: torch.Tensor, bb_token: torch.Tensor, bb_hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        weights, logits = self.router(x, bb_token, bb_hidden, mask)
        out = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            self.aux_loss = load_balance_loss(logits, weights, mask)
            self.z_loss = z_loss(logits, mask)
        if self.training or self.track_load:
            with torch.no_grad():
                keep = (weights > 0).float() if mask is None else (weights > 0).float() * mask.unsqueeze(-1)
                self.last_load = keep.reshape(-1, weights.shape[-1]).sum(0)
        return out


class DenseFFN(nn.Module):
    """One dense FFN in place of the experts: the Ladder Side-Tuning baseline."""

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig, packed: bool = False):
        super().__init__()
        self.ffn = Expert(dim, cfg.expert_ratio * dim, cfg.expert_bits, cfg.expert_group_size, packed)

    def forward(self, x, bb_token, bb_hidden, mask):
        return self.ffn(x)
