"""ISMoE feed-forward layer: E experts, interactive top-k router, optional shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import SideConfig
from ..quant.linear import QuantLinear
from .experts import Expert, FakeQuantLinear, straight_through
from .router import InteractiveRouter, load_balance_loss, z_loss


class ISMoE(nn.Module):
    """Mixture of side experts routed by :class:`InteractiveRouter`.

    Eager PyTorch runs each expert only on the tokens routed to it. Under export (torch.export /
    ONNX) every expert runs on every token and is mixed by the dense routing weights (zero for
    the experts a token does not pick): the same sum, a static graph, and every expert in the
    exported model. The side experts are tiny, so the dense form costs little at inference;
    after :meth:`prepare_export` it is two wide matmuls instead of ``2E`` small ones.
    """

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig):
        super().__init__()
        hidden = cfg.expert_ratio * dim
        make = lambda: Expert(dim, hidden, cfg.expert_bits, cfg.expert_group_size)  # noqa: E731
        self.router = InteractiveRouter(dim, backbone_dim, cfg.num_experts, cfg.top_k, cfg.salient_tau, cfg.interactive)
        self.experts = nn.ModuleList(make() for _ in range(cfg.num_experts))
        self.shared = make() if cfg.shared_expert else None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.last_load = torch.zeros(cfg.num_experts)
        self._stack: _Stack | None = None

    def prepare_export(self) -> None:
        """Stack the experts into one wide FFN (non-persistent ``stacked_*`` buffers) for the
        exported graph: ``fc1`` of all experts as one layer with ``E*H`` outputs, ``fc2`` as one
        layer over the ``E*H`` routing-weighted hidden units. Rebuilt on every call from the
        current experts; eager mode never reads it. Experts still in quantization-aware
        training (not packed) keep the per-expert form."""
        for name in [n for n in self._buffers if n.startswith("stacked_")]:
            del self._buffers[name]
        self._stack = None
        stacked = _stack_experts(self.experts)
        if stacked is not None:
            self._stack, tensors = stacked
            for name, tensor in tensors.items():
                self.register_buffer(f"stacked_{name}", tensor, persistent=False)

    def _stacked_mixture(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e * expert_e(x)`` as ``fc2([w_1 h_1, ..., w_E h_E]) + w @ b2``, ``h_e = gelu(fc1_e(x))``."""
        st = self._stack

        def linear(inp: torch.Tensor, tag: str, bits: int | None, group: int) -> torch.Tensor:
            if bits is None:
                return inp @ getattr(self, f"stacked_{tag}_weight").t()
            return ops.qmatmul(
                inp,
                getattr(self, f"stacked_{tag}_qweight"),
                getattr(self, f"stacked_{tag}_scales"),
                getattr(self, f"stacked_{tag}_zeros"),
                bits,
                group,
            )

        h = nn.functional.gelu(linear(x, "fc1", st.bits1, st.group1) + self.stacked_fc1_bias)
        h = (h.unflatten(-1, (st.experts, st.hidden)) * weights.unsqueeze(-1)).flatten(-2)
        return linear(h, "fc2", st.bits2, st.group2) + weights @ self.stacked_fc2_bias

    def forward(
        self, x: torch.Tensor, bb_token: torch.Tensor, bb_hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        weights, logits = self.router(x, bb_token, bb_hidden, mask)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            if self._stack is not None:
                out = self._stacked_mixture(x, weights)
            else:
                out = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        else:
            out = _dispatch(x, weights if mask is None else weights * mask.unsqueeze(-1), self.experts)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            self.aux_loss = load_balance_loss(logits, weights, mask)
            self.z_loss = z_loss(logits, mask)
        if self.training:
            with torch.no_grad():
                keep = (weights > 0).float() if mask is None else (weights > 0).float() * mask.unsqueeze(-1)
                self.last_load = keep.reshape(-1, weights.shape[-1]).sum(0)
        return out


@dataclass(frozen=True)
class _Stack:
    """Shape of the experts stacked as one wide FFN (bits ``None``: float weights)."""

    experts: int
    hidden: int
    bits1: int | None
    group1: int
    bits2: int | None
    group2: int


def _stack_experts(experts: nn.ModuleList) -> tuple[_Stack, dict[str, torch.Tensor]] | None:
    """The experts' ``fc1`` rows and ``fc2`` input columns concatenated (``fc2`` biases ``[E, D]``);
    None unless each layer kind is all packed (one width) or all plain ``nn.Linear``, with biases."""
    fc1s, fc2s = [e.fc1 for e in experts], [e.fc2 for e in experts]
    tensors: dict[str, torch.Tensor] = {}
    meta: list = []
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
        if any(m.bias is None for m in layers):
            return None
        biases = [m.bias.detach() for m in layers]
        tensors[f"{tag}_bias"] = torch.cat(biases) if tag == "fc1" else torch.stack(biases)
    return _Stack(len(experts), fc1s[0].out_features, *meta), tensors


def _dispatch(x: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Sparse mixture: each expert sees only its routed tokens, ``sum_e w_e * expert_e(x)``.

    The (expert, token) pairs are sorted by expert once: one ``index_select`` gathers the routed
    tokens, each expert runs on its contiguous slice, one ``index_add_`` adds the weighted
    outputs back (per token in expert order, as a loop over the experts adds them). Experts in
    training have their weights fake-quantized together (:func:`_expert_weights`). Padding
    tokens (weight 0 after masking) go to no expert; nothing downstream reads them.
    """
    flat, w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1])
    expert, token = torch.nonzero(w.t() > 0, as_tuple=True)
    sizes = torch.bincount(expert, minlength=len(experts)).tolist()
    used = [e for e, n in enumerate(sizes) if n]
    out = torch.zeros_like(flat)
    if not used:
        return out.reshape(x.shape)
    routed = flat.index_select(0, token).split([sizes[e] for e in used])
    gate = w.reshape(-1).index_select(0, token * w.shape[1] + expert).unsqueeze(-1)
    params = _expert_weights([experts[e] for e in used])
    if params is None:
        ys = [experts[e](chunk) for e, chunk in zip(used, routed)]
    else:
        ys = [
            nn.functional.linear(nn.functional.gelu(nn.functional.linear(chunk, w1, b1)), w2, b2)
            for chunk, (w1, b1, w2, b2) in zip(routed, params)
        ]
    return out.index_add_(0, token, (torch.cat(ys) * gate).to(out.dtype)).reshape(
        x.shape
    )  # autocast: experts may run in bf16


def _expert_weights(experts: list[nn.Module]) -> list[tuple[torch.Tensor, ...]] | None:
    """``(fc1 weight, fc1 bias, fc2 weight, fc2 bias)`` per expert as its forward uses them:
    plain ``nn.Linear`` weights, or ``FakeQuantLinear`` weights fake-quantized in one call for
    all of them (the same per-group values as one call each); None for other layers (packed)."""
    parts = []
    for layers in ([e.fc1 for e in experts], [e.fc2 for e in experts]):
        if all(type(m) is nn.Linear for m in layers):
            parts.append([m.weight for m in layers])
        elif all(type(m) is FakeQuantLinear for m in layers) and len({(m.bits, m.group_size) for m in layers}) == 1:
            stacked = torch.stack([m.weight for m in layers])
            parts.append(straight_through(stacked, layers[0].bits, layers[0].group_size).unbind(0))
        else:
            return None
        parts.append([m.bias for m in layers])
    return list(zip(*parts))


class DenseFFN(nn.Module):
    """One dense FFN in place of the experts: the Ladder Side-Tuning baseline."""

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig):
        super().__init__()
        self.ffn = Expert(dim, cfg.expert_ratio * dim, cfg.expert_bits, cfg.expert_group_size)

    def forward(self, x, bb_token, bb_hidden, mask):
        return self.ffn(x)
