"""ISMoE feed-forward layer: E experts, interactive top-k router, optional shared expert."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import SideConfig
from ..quant.linear import QuantLinear
from .experts import Expert
from .router import InteractiveRouter, load_balance_loss, z_loss


class ISMoE(nn.Module):
    """Mixture of side experts routed by :class:`InteractiveRouter`.

    Eager PyTorch runs each expert only on the tokens routed to it. Under export (torch.export /
    ONNX) every expert runs on every token and is mixed by the dense routing weights (zero for
    the experts a token does not pick): the same sum, a static graph, and every expert in the
    exported model. The side experts are tiny, so the dense form costs little at inference;
    after :meth:`prepare_export` it is two wide matmuls instead of ``2E`` small ones.
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
        self._stack: _Stack | None = None

    def prepare_export(self) -> None:
        """Stack the experts into one wide FFN (non-persistent ``stacked_*`` buffers) for the
        exported graph: ``fc1`` of all experts as one layer with ``E*H`` outputs, ``fc2`` as one
        layer over the ``E*H`` routing-weighted hidden units. Rebuilt on every call from the
        current experts; eager mode never reads it. Experts still in quantization-aware
        training (not packed) keep the per-expert form."""
        for name in [n for n in self._buffers if n.startswith("stacked_")]:
            del self._buffers[name]
        self._stack = _stack_experts(self.experts)
        if self._stack is not None:
            for name, tensor in self._stack.tensors.items():
                self.register_buffer(f"stacked_{name}", tensor, persistent=False)
            self._stack.owner = self

    def forward(self, x: torch.Tensor, bb_token: torch.Tensor, bb_hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        weights, logits = self.router(x, bb_token, bb_hidden, mask)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            if self._stack is not None:
                out = _stacked_mixture(x, weights, self._stack)
            else:
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


@dataclass
class _Stack:
    """The experts as one wide FFN; ``tensors`` become the ``stacked_*`` buffers."""

    experts: int
    hidden: int
    bits1: int | None          # None: float weights
    group1: int
    bits2: int | None
    group2: int
    tensors: dict[str, torch.Tensor]
    owner: nn.Module | None = None

    def get(self, name: str) -> torch.Tensor:
        return getattr(self.owner, f"stacked_{name}")


def _stack_experts(experts: nn.ModuleList) -> _Stack | None:
    fc1s, fc2s = [e.fc1 for e in experts], [e.fc2 for e in experts]
    hidden = fc1s[0].out_features
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for tag, layers, dim in (("fc1", fc1s, 0), ("fc2", fc2s, 1)):
        if all(isinstance(m, QuantLinear) for m in layers) and len({(m.bits, m.group_size) for m in layers}) == 1:
            for part in ("qweight", "scales", "zeros"):  # fc1: outputs (rows) stacked; fc2: inputs (K blocks)
                tensors[f"{tag}_{part}"] = torch.cat([getattr(m, part) for m in layers], dim)
            meta += [layers[0].bits, layers[0].group_size]
        elif all(type(m) is nn.Linear for m in layers):
            tensors[f"{tag}_weight"] = torch.cat([m.weight.detach() for m in layers], dim)
            meta += [None, 0]
        else:
            return None
        biases = [m.bias for m in layers]
        if any(b is None for b in biases):
            return None
        tensors[f"{tag}_bias"] = torch.cat(biases) if tag == "fc1" else torch.stack(biases)  # fc2: [E, D]
    return _Stack(len(experts), hidden, meta[0], meta[1], meta[2], meta[3], {k: v.detach() for k, v in tensors.items()})


def _stacked_linear(x: torch.Tensor, st: _Stack, tag: str, bits: int | None, group: int) -> torch.Tensor:
    if bits is None:
        return x @ st.get(f"{tag}_weight").t()
    return ops.qmatmul(x, st.get(f"{tag}_qweight"), st.get(f"{tag}_scales"), st.get(f"{tag}_zeros"), bits, group)


def _stacked_mixture(x: torch.Tensor, weights: torch.Tensor, st: _Stack) -> torch.Tensor:
    """``sum_e w_e * expert_e(x)`` as ``fc2([w_1 h_1, ..., w_E h_E]) + w @ b2``, ``h_e = gelu(fc1_e(x))``."""
    h = nn.functional.gelu(_stacked_linear(x, st, "fc1", st.bits1, st.group1) + st.get("fc1_bias"))
    h = (h.unflatten(-1, (st.experts, st.hidden)) * weights.unsqueeze(-1)).flatten(-2)
    return _stacked_linear(h, st, "fc2", st.bits2, st.group2) + weights @ st.get("fc2_bias")


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
