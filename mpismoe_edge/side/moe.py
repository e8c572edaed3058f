"""ISMoE feed-forward layer: E experts, interactive top-k router, optional shared expert."""

from __future__ import annotations

from collections.abc import Callable
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

    Eager PyTorch runs each expert only on the tokens routed to it, all experts of the layer in
    one grouped matmul per expert layer (:func:`routed_mixture`), with their weights stacked and
    fake-quantized in one call (:func:`expert_stack`). Under export (torch.export / ONNX) every
    expert runs on every token as one wide FFN whose hidden units are scaled by the dense
    routing weights, zero for the experts a token does not pick (:func:`wide_mixture`): the
    same sum, a static graph, and every expert in the exported model. For training on CPU the
    routed form was 3-8x faster than the wide one and held 1/4.6 of its activations at the
    quickstart's shapes (``benchmarks/moe_train_ops.py``): the wide form does ``E/k`` times the work.
    """

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig):
        super().__init__()
        hidden = cfg.expert_ratio * dim
        make = lambda: Expert(dim, hidden, cfg.expert_bits, cfg.expert_group_size)  # noqa: E731
        self.router = InteractiveRouter(
            dim, backbone_dim, cfg.num_experts, cfg.top_k, cfg.salient_tau, cfg.interactive, cfg.router_noise
        )
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
        """:func:`wide_mixture` over the packed (or float) ``stacked_*`` buffers of :meth:`prepare_export`."""
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

        return wide_mixture(
            x,
            weights,
            lambda inp: linear(inp, "fc1", st.bits1, st.group1) + self.stacked_fc1_bias,
            lambda inp: linear(inp, "fc2", st.bits2, st.group2),
            self.stacked_fc2_bias,
        )

    def forward(
        self, x: torch.Tensor, bb_token: torch.Tensor, bb_hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        weights, logits = self.router(x, bb_token, bb_hidden, mask)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            if self._stack is not None:
                out = self._stacked_mixture(x, weights)
            else:
                out = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        else:  # padding tokens (weight 0 after masking) go to no expert
            out = routed_mixture(
                x, weights if mask is None else weights * mask.unsqueeze(-1), *expert_stack(self.experts)
            )
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            self.aux_loss = load_balance_loss(logits, weights, mask)
            self.z_loss = z_loss(logits, mask)
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


def wide_mixture(
    x: torch.Tensor,
    weights: torch.Tensor,
    fc1: Callable[[torch.Tensor], torch.Tensor],
    fc2: Callable[[torch.Tensor], torch.Tensor],
    bias2: torch.Tensor,
) -> torch.Tensor:
    """``sum_e w_e * expert_e(x)`` as ``fc2([w_1 h_1, ..., w_E h_E]) + w @ bias2``, ``h_e = gelu(fc1_e(x))``.

    ``fc1`` maps ``[..., D]`` to all experts' hidden units ``[..., E*H]`` (expert-major, with
    their biases), ``fc2`` maps ``[..., E*H]`` back to ``[..., D]`` without bias (the experts'
    ``fc2`` biases are ``bias2`` ``[E, D]``), ``weights`` ``[..., E]``. An expert with weight 0
    adds nothing and its units get zero gradient: with top-k weights this is exactly top-k routing.
    """
    h = nn.functional.gelu(fc1(x))
    h = (h.unflatten(-1, (weights.shape[-1], -1)) * weights.unsqueeze(-1)).flatten(-2)
    return fc2(h) + weights @ bias2


def routed_mixture(
    x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """``sum_e w_e * expert_e(x)`` over the (token, expert) pairs with ``w > 0`` only (``x`` ``[..., D]``,
    ``weights`` ``[..., E]``, the experts as :func:`expert_stack` gives them).

    The pairs are sorted by expert once: one ``index_select`` gathers the routed tokens, each
    expert layer of all experts is one grouped matmul over the contiguous slices, one
    ``index_add`` adds the gated outputs back (per token in expert order, as a loop over the
    experts adds them). Unpicked experts get no gradient from a token.
    """
    flat, w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1])
    experts = w.shape[-1]
    expert, token = torch.nonzero(w.t() > 0, as_tuple=True)
    sizes = torch.bincount(expert, minlength=experts)
    gate = w.reshape(-1).index_select(0, token * experts + expert).unsqueeze(-1)
    routed = flat.index_select(0, token).to(w1.dtype)  # autocast: the layer's input may be in bf16
    counts = sizes.tolist()
    h = nn.functional.gelu(_AddPerExpert.apply(grouped_mm(routed, w1.transpose(1, 2), sizes), b1, counts, expert))
    y = _AddPerExpert.apply(grouped_mm(h, w2.transpose(1, 2), sizes), b2, counts, expert)
    return flat.new_zeros(flat.shape).index_add_(0, token, (y * gate).to(flat.dtype)).reshape(x.shape)


class _AddPerExpert(torch.autograd.Function):
    """Rows sorted by expert (``counts`` rows each) plus their expert's bias, in place: the bias
    rows are never gathered into a tensor of the output's size (on CPU each such temporary is a
    fresh allocation, every layer, every step)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor, counts: list[int], expert: torch.Tensor) -> torch.Tensor:
        for part, b in zip(y.split(counts), bias):
            part.add_(b)
        ctx.mark_dirty(y)
        ctx.save_for_backward(expert)
        ctx.bias_shape = bias.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (expert,) = ctx.saved_tensors
        return grad, grad.new_zeros(ctx.bias_shape).index_add_(0, expert, grad), None, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``cat_e(a_e @ b[e])`` for ``a`` ``[N, K]`` cut into consecutive row blocks of ``sizes`` ``[E]``,
    ``b`` ``[E, K, M]``: ``torch.nn.functional.grouped_mm`` on the CPU where torch has it (one
    kernel; it wants rows and strides in multiples of 16 bytes; on CUDA bf16 on SM80+), else
    :func:`grouped_mm_loop`."""
    size = a.element_size()
    aligned = all(n == 1 or n * size % 16 == 0 for n in (*a.stride(), *b.stride(), a.shape[1], *b.shape[1:]))
    if a.device.type == "cpu" and aligned and hasattr(nn.functional, "grouped_mm"):
        return nn.functional.grouped_mm(a, b, offs=sizes.cumsum(0).to(torch.int32))
    return grouped_mm_loop(a, b, sizes)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` as one matmul per block."""
    return torch.cat([part @ b[e] for e, part in enumerate(a.split(sizes.tolist()))])


def expert_stack(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' weights as their forward uses them, stacked: ``fc1`` weights ``[E, H, D]``
    and biases ``[E, H]``, ``fc2`` weights ``[E, D, H]`` and biases ``[E, D]``.

    When every expert layer is a ``FakeQuantLinear`` of one width, all ``2E`` weights are
    fake-quantized in one call on their groups concatenated (each weight a whole number of
    groups along its rows): the values of one call per layer, in a tenth of the operators.
    Packed layers are dequantized.
    """
    fc1s, fc2s = [e.fc1 for e in experts], [e.fc2 for e in experts]
    layers = fc1s + fc2s
    if all(type(m) is FakeQuantLinear for m in layers) and len({(m.bits, m.group_size) for m in layers}) == 1:
        group = layers[0].group_size
        flat = straight_through(torch.cat([m.weight.reshape(-1, group) for m in layers]), layers[0].bits, group)
        w1, w2 = flat.flatten().split([fc1s[0].weight.numel() * len(experts), fc2s[0].weight.numel() * len(experts)])
        w1, w2 = w1.view(len(experts), *fc1s[0].weight.shape), w2.view(len(experts), *fc2s[0].weight.shape)
    else:
        w1, w2 = torch.stack([_weight(m) for m in fc1s]), torch.stack([_weight(m) for m in fc2s])
    return w1, torch.stack([_bias(m, w1) for m in fc1s]), w2, torch.stack([_bias(m, w2) for m in fc2s])


def _weight(m: nn.Module) -> torch.Tensor:
    """One expert layer's weight as its forward uses it."""
    if isinstance(m, FakeQuantLinear):
        return straight_through(m.weight, m.bits, m.group_size)
    if isinstance(m, QuantLinear):
        return m.dequantized_weight()
    if isinstance(m, nn.Linear):
        return m.weight
    raise TypeError(f"an expert layer must be nn.Linear, FakeQuantLinear or QuantLinear, got {type(m).__name__}")


def _bias(m: nn.Module, like: torch.Tensor) -> torch.Tensor:
    return m.bias if m.bias is not None else like.new_zeros(m.out_features)


class DenseFFN(nn.Module):
    """One dense FFN in place of the experts: the Ladder Side-Tuning baseline."""

    def __init__(self, dim: int, backbone_dim: int, cfg: SideConfig):
        super().__init__()
        self.ffn = Expert(dim, cfg.expert_ratio * dim, cfg.expert_bits, cfg.expert_group_size)

    def forward(self, x, bb_token, bb_hidden, mask):
        return self.ffn(x)
