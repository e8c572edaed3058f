"""The custom operators of MP-ISMoE, as torch.library ops.

They are the seam between PyTorch and ONNX: the model calls them in eager mode (reference
implementations below), and the exporter maps each one to an ONNX function in the
``ai.mpismoe`` domain (or to an ONNX Runtime contrib op).

* ``mpismoe::qmatmul(x, qweight, scales, zeros, bits, group_size)``: ``x @ dequant(W).T``.
* ``mpismoe::qgather(ids, qweight, scales, zeros, bits, group_size)``: rows ``ids`` of
  ``dequant(W)``, ``[*ids.shape, K]`` (a packed embedding lookup; only those rows are unpacked).
* ``mpismoe::topk_route(logits, k)``: dense routing weights ``[..., E]``: softmax over each
  token's top-k logits, zero for the experts it does not pick. Differentiable.
* ``mpismoe::masked_attention(q, k, v, mask, heads)``: multi-head attention of ``[B, T, D]``
  queries, keys and values (heads side by side along ``D``) over the keys ``mask`` ``[B, T]``
  keeps; ``[B, T, D]``. Only the exporter calls it (the side network's attention, so that an
  ONNX Runtime target can run it as one ``MultiHeadAttention`` node); training runs plain ops.
"""

from __future__ import annotations

import math

import torch

from .quant.pack import dequantize


@torch.library.custom_op("mpismoe::qmatmul", mutates_args=())
def qmatmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    w = dequantize(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return x @ w.t()


@qmatmul.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _qmatmul_backward(ctx, grad):
    w = dequantize(*ctx.saved_tensors, ctx.bits, ctx.group_size).to(grad.dtype)
    return grad @ w, None, None, None, None, None


def _qmatmul_setup(ctx, inputs, output):
    _, qweight, scales, zeros, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size


qmatmul.register_autograd(_qmatmul_backward, setup_context=_qmatmul_setup)


@torch.library.custom_op("mpismoe::qgather", mutates_args=())
def qgather(
    ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    flat = ids.reshape(-1)
    rows = dequantize(
        qweight.index_select(0, flat), scales.index_select(0, flat), zeros.index_select(0, flat), bits, group_size
    )
    return rows.reshape(*ids.shape, rows.shape[-1])


@qgather.register_fake
def _(ids, qweight, scales, zeros, bits, group_size):
    return scales.new_empty((*ids.shape, qweight.shape[1] * group_size))


def topk_route_reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))


@torch.library.custom_op("mpismoe::topk_route", mutates_args=())
def topk_route(logits: torch.Tensor, k: int) -> torch.Tensor:
    return topk_route_reference(logits, k)


@topk_route.register_fake
def _(logits, k):
    return torch.empty_like(logits)


def _route_backward(ctx, grad):
    (w,) = ctx.saved_tensors
    # softmax Jacobian restricted to the picked experts; unpicked ones have w == 0.
    return w * (grad - (grad * w).sum(-1, keepdim=True)), None


def _route_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


topk_route.register_autograd(_route_backward, setup_context=_route_setup)


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    b, t, d = q.shape
    q, k, v = (x.reshape(b, t, heads, d // heads).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)


@torch.library.custom_op("mpismoe::masked_attention", mutates_args=())
def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    return masked_attention_reference(q, k, v, mask, heads)


@masked_attention.register_fake
def _(q, k, v, mask, heads):
    return torch.empty_like(q)
