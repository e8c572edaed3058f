"""ISMoE feed-forward layer: E experts, interactive top-k router, optional shared expert."""
from __future__ import annotations

import torch
from torch import nn

from ..config import SideConfig
from .experts import Expert
from .router import InteractiveRouter, load_balance_loss, z_loss


class ISMoE(nn.Module):
    """Mixture of side experts routed by :class:`InteractiveRouter`.

    Eager PyTorch runs each expert only on the tokens routed to it. Under export (torch.export /
    ONNX) every expert runs on every token and is mixed by the dense routing weights (zero for
    the experts a token does not pick): the same sum, a static graph, and every expert in the
    exported model. The side experts are tiny, so the dense form costs little at inference.
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
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            out = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        else:
            out = _dispatch(x, weights if mask is None else weights * mask.unsqueeze(-1), self.experts)
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


def _dispatch(x: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Sparse mixture: each expert sees only its routed tokens, ``sum_e w_e * expert_e(x)``.

    Padding tokens (weight 0 after masking) go to no expert; nothing downstream reads them.
    """
    flat, w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1])
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        idx = torch.nonzero(w[:, e] > 0).squeeze(-1)
        if idx.numel():
            out = out.index_add(0, idx, expert(flat[idx]) * w[idx, e : e + 1])
    return out.reshape(x.shape)


class DenseFFN(nn.Module):
    """One dense FFN in place of the experts: the Ladder Side-Tuning baseline."""

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig, packed: bool = False):
        super().__init__()
        self.ffn = Expert(dim, cfg.expert_ratio * dim, cfg.expert_bits, cfg.expert_group_size, packed)

    def forward(self, x, bb_token, bb_hidden, mask):
        return self.ffn(x)
