"""The interactive router of ISMoE: picks experts from the side token AND the frozen backbone.

For each token the router sees three things: the side token itself, the backbone's hidden
state at that position (through the ladder's down-projection), and a summary of the
backbone's most salient tokens in the sequence.

Saliency is distinctiveness: a token's distance from the sequence's mean backbone state
(``||h_t - mean(h)|| / sqrt(H)``). (Plain hidden-state norms are useless here: after
LayerNorm every token has nearly the same norm.) The summary pools tokens with a sharp
softmax over saliency (temperature ``tau``), a continuous stand-in for "the top few tokens":
a hard top-m would flip on numerical noise and break PyTorch/ONNX parity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


def salient_summary(hidden: torch.Tensor, mask: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Saliency-weighted pool of ``hidden`` ``[B, T, H]`` over unmasked tokens -> ``[B, H]``.

    In float32 every pass over ``hidden`` is a reduction or a batched matmul (``||h - m||^2`` as
    ``||h||^2 - 2 h.m + ||m||^2``): no ``[B, T, H]`` temporary, which on CPU costs a fresh
    allocation per tapped layer on every training step. Under autocast the matmuls would run in
    bf16/fp16, where that sum cancels, so the distances are taken directly."""
    keep = (
        torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if mask is None
        else mask.to(hidden.dtype)
    )
    share = keep / keep.sum(1, keepdim=True).clamp(min=1.0)
    if torch.is_autocast_enabled(hidden.device.type):
        dist = (hidden - (hidden * share.unsqueeze(-1)).sum(1, keepdim=True)).norm(dim=-1)
    else:
        mean = torch.bmm(share.unsqueeze(1), hidden)  # [B, 1, H]
        cross = torch.bmm(hidden, mean.transpose(1, 2)).squeeze(-1)  # [B, T]
        norms = torch.linalg.vector_norm(hidden, dim=-1).square()
        dist = (norms - 2 * cross + mean.squeeze(1).square().sum(-1, keepdim=True)).clamp(min=0).sqrt()
    score = dist / (math.sqrt(hidden.shape[-1]) * tau)
    score = score.masked_fill(keep == 0, torch.finfo(score.dtype).min)
    w = score.softmax(-1) * keep
    return torch.bmm(w.unsqueeze(1), hidden).squeeze(1)


class InteractiveRouter(nn.Module):
    """Router logits ``[B, T, E]`` from side tokens and backbone features; dense top-k weights."""

    def __init__(
        self,
        side_dim: int,
        backbone_dim: int,
        num_experts: int,
        top_k: int,
        salient_tau: float,
        interactive: bool = True,
        noise: float = 0.0,
    ):
        super().__init__()
        self.top_k, self.salient_tau, self.interactive, self.noise = top_k, salient_tau, interactive, noise
        self.salient_proj = nn.Linear(backbone_dim, side_dim) if interactive else None
        self.gate = nn.Linear(side_dim * (3 if interactive else 1), num_experts)

    def logits(
        self, x: torch.Tensor, bb_token: torch.Tensor | None, bb_hidden: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.interactive:
            return self.gate(x)
        summary = self.salient_proj(salient_summary(bb_hidden, mask, self.salient_tau))
        # the gate over [x, bb_token, summary] concatenated, as three products summed: the
        # features are never materialized (the summary's product is one row per sequence)
        wx, wb, ws = self.gate.weight.split(x.shape[-1], dim=1)
        return (
            nn.functional.linear(x, wx)
            + nn.functional.linear(bb_token, wb)
            + nn.functional.linear(summary, ws, self.gate.bias).unsqueeze(1)
        )

    def forward(self, x, bb_token, bb_hidden, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense routing weights ``[B, T, E]``, raw logits ``[B, T, E]``). In training with
        ``noise`` > 0 the experts are picked and weighted from the logits plus Gaussian noise of
        that standard deviation (noisy top-k gating), a regularizer: a token's second choice
        gets trained too. The balance losses read the raw logits."""
        logits = self.logits(x, bb_token, bb_hidden, mask)
        picked = logits + self.noise * torch.randn_like(logits) if self.training and self.noise > 0 else logits
        return ops.topk_route(picked, self.top_k), logits


def load_balance_loss(logits: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e`` over real tokens (1.0 when balanced)."""
    e = logits.shape[-1]
    probs = logits.softmax(-1).reshape(-1, e)
    picked = (weights > 0).to(probs.dtype).reshape(-1, e)
    keep = (
        torch.ones(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
        if mask is None
        else mask.reshape(-1, 1).to(probs.dtype)
    )
    n = keep.sum().clamp(min=1.0)
    f = (picked * keep).sum(0) / (n * picked.sum(-1).max().clamp(min=1.0))
    p = (probs * keep).sum(0) / n
    return e * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-sum-exp of the logits over real tokens."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    if mask is None:
        return z.mean()
    m = mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp(min=1.0)
