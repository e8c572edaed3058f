"""``ai.mpismoe.QMatMul`` (and a following constant bias ``Add``) -> ``com.microsoft.MatMulNBits``.

Our packed layout *is* MatMulNBits' for 2, 4 and 8 bits (``B``: uint8 ``[N, K/G, G*bits/8]``,
little-endian codes), so the weight bytes are reused as they are:

* scales ``[N, K/G]`` float: MatMulNBits' 2-D scales;
* zero points: integer-valued ones (experts packed on their training grid, RTN, and always at
  8 bits) become MatMulNBits' packed uint8 ``[N, ceil(K/G * bits / 8)]`` form. Fractional ones
  (GNP-IQ below 8 bits) go in as floats with ``zero_points="float"`` ("same type as A"; ORT's CPU
  kernel computes ``(q - zp) * scale`` with them, 2-3x slower than the uint8 path), else by the
  identity ``(q - z) s = (q - m) s + (m - z) s`` with the kernel's default zero point
  ``m = 2^(bits-1)``: ``y = MatMulNBits(x) + g(x) @ C`` where ``g(x)`` ``[..., K/G]`` sums each
  group of ``x`` (Reshape + ReduceSum; the copies for q/k/v of one input are merged afterwards by
  common-subexpression elimination) and ``C = ((m - z) * s).T`` ``[K/G, N]``;
* an ``Add`` of a constant ``[N]`` bias after the node becomes the node's bias input.

A node whose width has no kernel on the target (3 bits) or whose weights are not initializers
is left alone: it keeps the portable function. Each rewrite counts itself in ``stats``
(``matmulnbits_<bits>bit``, ``zero_points_<plan>``, ``bias_folded``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import pattern

from mpismoe_edge.quant.pack import pack_bits

from ..functions import DOMAIN, MS_DOMAIN

ZERO_POINT_MODES = ("auto", "float")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (input type), 1 fp32, 2 fp16, 3 bf16, 4 int8


def zero_point_plan(z: np.ndarray, bits: int, mode: str) -> str:
    """How zero points ``z`` reach MatMulNBits: ``uint8`` (integers), ``float`` or ``shift``
    (``mode``: one of :data:`ZERO_POINT_MODES`, checked by :func:`qmatmul_nbits_rules`)."""
    if np.array_equal(z, np.round(z)) and z.min() >= 0 and z.max() <= (1 << bits) - 1:
        return "uint8"  # exact in every mode, and ORT's fast path
    return "float" if mode == "float" and bits != 8 else "shift"


class QMatMulToNBits(pattern.RewriteRuleClassBase):
    """``QMatMul(x, qw, sc, zp)`` -> ``MatMulNBits`` (+ the zero-point shift term where needed)."""

    def __init__(self, name: str, *, widths: tuple[int, ...], zero_points: str, level: int, stats: Counter):
        super().__init__(name)
        self.widths, self.zero_points, self.level, self.stats = widths, zero_points, level, stats

    def pattern(self, op, x, qw, sc, zp):
        return op.QMatMul(x, qw, sc, zp, _domain=DOMAIN, _outputs=["y"])

    def check(self, context, qw, sc, zp, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if y.producer().attributes.get_int("bits") not in self.widths:
            return result.fail("no MatMulNBits kernel for this width on the target")
        if any(v.const_value is None for v in (qw, sc, zp)):
            return result.fail("packed weights are not initializers")
        return result

    def rewrite(self, op, x, qw, sc, zp, y, b=None, **_):
        node = y.producer()
        bits, group = node.attributes.get_int("bits"), node.attributes.get_int("group_size")
        n_out, k_blocks, _ = qw.shape
        z = zp.const_value.numpy().astype(np.float32)
        plan = zero_point_plan(z, bits, self.zero_points)
        self.stats[f"zero_points_{plan}"] += 1
        self.stats[f"matmulnbits_{bits}bit"] += 1
        if plan == "uint8":
            packed = pack_bits(torch.from_numpy(np.round(z).astype(np.uint8)), bits).numpy()
            zp_in = op.initializer(ir.tensor(packed), name=f"{y.name}_zero_points")  # value names are unique
        else:
            zp_in = zp if plan == "float" else None
        attrs = {"K": k_blocks * group, "N": n_out, "bits": bits, "block_size": group}
        if self.level:
            attrs["accuracy_level"] = self.level
        out = op.MatMulNBits(x, qw, sc, zp_in, None, b, _domain=MS_DOMAIN, **attrs)
        out.producer().name = node.name or y.name
        if plan != "shift":
            return out
        m = float(1 << (bits - 1))
        corr = ((m - z) * sc.const_value.numpy().astype(np.float32)).T.copy()  # [K/G, N]
        shift = op.initializer(ir.tensor(corr), name=f"{y.name}_zero_point_shift")
        groups = op.Reshape(x, op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[k_blocks, group]), axis=0))
        sums = op.ReduceSum(groups, op.Constant(value_ints=[-1]), keepdims=0)
        return op.Add(out, op.MatMul(sums, shift))


class QMatMulBiasToNBits(QMatMulToNBits):
    """``QMatMul(x, qw, sc, zp) + b`` with a constant ``[N]`` ``b`` -> ``MatMulNBits`` with ``b`` as its bias."""

    def pattern(self, op, x, qw, sc, zp, b):
        return op.Add(super().pattern(op, x, qw, sc, zp), b)

    def check(self, context, qw, sc, zp, y, b, **_) -> pattern.MatchResult:
        result = super().check(context, qw=qw, sc=sc, zp=zp, y=y)
        if result and (b.const_value is None or list(b.shape or ()) != [qw.shape[0]] or b.dtype != sc.dtype):
            return result.fail("not a constant [N] bias of the scales' type")
        return result

    def rewrite(self, op, x, qw, sc, zp, y, b, **_):
        self.stats["bias_folded"] += 1
        return super().rewrite(op, x, qw, sc, zp, y, b)


def qmatmul_nbits_rules(
    widths: tuple[int, ...], stats: Counter, zero_points: str = "auto", accuracy_level: int = 0
) -> list[pattern.RewriteRuleSet]:
    """The rule sets for a target whose MatMulNBits kernels take ``widths``, to apply in order (the
    bias form first: it must claim its ``Add`` before the plain form takes the ``QMatMul`` alone);
    rewrites are counted in ``stats``."""
    if zero_points not in ZERO_POINT_MODES:
        raise ValueError(f"unknown zero point mode {zero_points!r}; expected one of {ZERO_POINT_MODES}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"unknown accuracy level {accuracy_level!r}; expected one of {ACCURACY_LEVELS}")
    kw = {"widths": widths, "zero_points": zero_points, "level": accuracy_level, "stats": stats}
    return [
        pattern.RewriteRuleSet(QMatMulBiasToNBits.rule("qmatmul_bias", **kw).commute()),
        pattern.RewriteRuleSet([QMatMulToNBits.rule("qmatmul", **kw)]),
    ]
