"""The ``ai.mpismoe`` custom operators as ONNX model-local functions (onnxscript).

Each function's body uses only standard ONNX ops (opset 18), so any ONNX Runtime build runs
an exported model with no custom-op library: the runtime inlines the function. The semantics
equal the torch reference ops in :mod:`mpismoe_edge.ops` and the packed layout in
:mod:`mpismoe_edge.quant.pack`:

* ``QMatMul(x, qweight, scales, zeros; bits, group_size) = x @ W.T`` with
  ``W[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G]``.
  A row of codes is a little-endian bitstream, code ``i`` of a group at bit offset ``i*bits``.
  Because ``bits <= 8`` and the offset ``s`` within a byte is ``< 8``, every code lies in the
  16-bit little-endian word of bytes ``j = (i*bits) // 8`` and ``j + 1``; the body gathers
  those two bytes per code, joins them into the uint32 word ``lo | hi << 8`` and takes
  ``(word >> s) & mask`` (BitShift wants unsigned ints). The word is uint32, not uint8 with
  ``hi << (8 - s)``: that shift overflows a byte, and runtimes disagree on uint8 shifts (ONNX and
  ONNX Runtime wrap, OpenVINO saturates left shifts and, inside this body, rounded right
  shifts); the bodies use only op behaviour they agree on (tests/test_portable_ops.py).
  One body serves 2, 3, 4 and 8 bits (3-bit codes cross bytes). Everything is laid out
  ``[K/G, G, N]`` from the bytes on, so the dequantized weight comes out ``[K, N]`` with no
  float transpose: ONNX Runtime constant-folds this body at session load, and its peak memory
  there is set by the bytes per weight of these steps.
* ``QGather(ids, qweight, scales, zeros; bits, group_size)``: rows ``ids`` of that ``W``
  (a packed embedding table), ``[*ids.shape, K]``. It gathers the packed rows first and
  unpacks only those, so the table stays packed in memory at run time too. This body runs on
  every call, so it unpacks elementwise, without the per-code byte Gather (slow in ORT on
  uint8 along an inner axis): whole-byte units of the bitstream (1 byte for 2/4/8 bits,
  3 bytes = 8 codes for 3 bits) become an int32 word, shifted and masked per code.
* ``TopKRoute(logits; k)``: softmax over each row's top-k logits scattered into zeros
  (dense routing weights ``[..., E]``).
* ``MaskedAttention(q, k, v, mask; num_heads)``: multi-head attention of ``[B, T, D]`` queries,
  keys and values over the keys ``mask`` ``[B, T]`` keeps (masked scores set to the float
  minimum, as PyTorch's ``masked_fill``): ``[B, T, D]``. The ONNX Runtime targets run it as
  ``com.microsoft.MultiHeadAttention`` (``export/rules/masked_attention.py``).
"""

from __future__ import annotations

from typing import TypeVar, Union

import onnxscript
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT64, UINT8
from onnxscript import opset18 as op
from onnxscript.values import Opset

from mpismoe_edge.runtime.spec import MIN_OPSET  # noqa: F401  (BitwiseAnd needs 18; re-exported)

DOMAIN = "ai.mpismoe"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
DOMAIN_VERSION = 1

mpismoe = Opset(DOMAIN, DOMAIN_VERSION)
TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007  (onnxscript reads typing.Union, not X | Y)


@onnxscript.script(opset=mpismoe, default_opset=op)
def QMatMul(x: TFloat, qweight: UINT8, scales: FLOAT, zeros: FLOAT, bits: int, group_size: int) -> TFloat:
    """``x [..., K] @ dequant(qweight [N, K/G, G*bits/8], scales [N, K/G], zeros [N, K/G]).T``."""
    nbits = op.Constant(value_int=bits)
    gsize = op.Constant(value_int=group_size)
    zero64 = op.Constant(value_int=0)
    one64 = op.Constant(value_int=1)
    eight64 = op.Constant(value_int=8)
    col = op.Constant(value_ints=[-1, 1])
    offsets = op.Mul(op.Range(zero64, gsize, one64), nbits)  # bit offset of each code in its group
    lo_idx = op.Div(offsets, eight64)  # byte holding the code's low bits
    hi_idx = op.Add(lo_idx, one64)  # the next byte (maybe the pad byte)
    in_byte = op.Mod(offsets, eight64)  # s in [0, 7]
    shift = op.Reshape(op.Cast(in_byte, to=12), col)  # uint32 [G, 1]
    one32 = op.Cast(one64, to=12)
    eight32 = op.Cast(eight64, to=12)
    mask = op.Sub(op.BitShift(one32, op.Cast(nbits, to=12), direction="LEFT"), one32)
    # Bytes first: pad each group with a zero byte and put N last, so every later tensor is
    # [K/G, G, N] (the MatMul's [K, N] layout).
    padded = op.Transpose(op.Pad(qweight, op.Constant(value_ints=[0, 0, 0, 0, 0, 1])), perm=[1, 2, 0])
    lo = op.Gather(padded, lo_idx, axis=1)
    hi = op.Gather(padded, hi_idx, axis=1)
    # the code at bit s of the 16-bit little-endian word lo | hi << 8 (in uint32: nothing overflows)
    word = op.BitwiseOr(op.Cast(lo, to=12), op.BitShift(op.Cast(hi, to=12), eight32, direction="LEFT"))
    codes = op.BitwiseAnd(op.BitShift(word, shift, direction="RIGHT"), mask)  # uint32 [K/G, G, N]
    z = op.Unsqueeze(op.Transpose(zeros, perm=[1, 0]), one64)  # [K/G, 1, N]
    s = op.Unsqueeze(op.Transpose(scales, perm=[1, 0]), one64)
    w = op.Mul(op.Sub(op.CastLike(codes, scales), z), s)
    n = op.Shape(qweight, start=0, end=1)
    w_t = op.Reshape(w, op.Concat(op.Constant(value_ints=[-1]), n, axis=0))  # [K, N]
    return op.MatMul(x, op.CastLike(w_t, x))


@onnxscript.script(opset=mpismoe, default_opset=op)
def QGather(ids: INT64, qweight: UINT8, scales: FLOAT, zeros: FLOAT, bits: int, group_size: int) -> FLOAT:
    """Rows ``ids`` of ``dequant(qweight [V, K/G, G*bits/8], scales [V, K/G], zeros [V, K/G])``."""
    nbits = op.Constant(value_int=bits)
    zero64 = op.Constant(value_int=0)
    one64 = op.Constant(value_int=1)
    two64 = op.Constant(value_int=2)
    eight64 = op.Constant(value_int=8)
    flat = op.Reshape(ids, op.Constant(value_ints=[-1]))
    # whole-byte units of the bitstream: 1 byte (2, 4, 8 bits) or 3 bytes = 8 codes (3 bits)
    unit_bytes = op.Add(op.Mul(op.Mod(nbits, two64), two64), one64)
    unit_codes = op.Div(op.Mul(unit_bytes, eight64), nbits)
    byte_weight = op.Cast(
        op.BitShift(
            op.Cast(one64, to=12),
            op.Cast(op.Mul(op.Range(zero64, unit_bytes, one64), eight64), to=12),
            direction="LEFT",
        ),
        to=6,
    )  # int32 [1, 256, 65536][:unit_bytes]
    code_shift = op.Cast(op.Mul(op.Range(zero64, unit_codes, one64), nbits), to=12)  # uint32 [0, b, 2b, ...]
    mask = op.Sub(op.BitShift(op.Cast(one64, to=12), op.Cast(nbits, to=12), direction="LEFT"), op.Cast(one64, to=12))
    rows = op.Gather(qweight, flat, axis=0)  # [T, K/G, G*bits/8]
    units = op.Reshape(
        rows, op.Concat(op.Constant(value_ints=[-1]), op.Reshape(unit_bytes, op.Constant(value_ints=[1])), axis=0)
    )
    word = op.Cast(
        op.ReduceSum(op.Mul(op.Cast(units, to=6), byte_weight), op.Constant(value_ints=[-1]), keepdims=1), to=12
    )
    codes = op.BitwiseAnd(op.BitShift(word, code_shift, direction="RIGHT"), mask)  # uint32 [units, unit_codes]
    z = op.Unsqueeze(op.Gather(zeros, flat, axis=0), op.Constant(value_ints=[-1]))  # [T, K/G, 1]
    s = op.Unsqueeze(op.Gather(scales, flat, axis=0), op.Constant(value_ints=[-1]))
    grouped = op.Reshape(
        op.CastLike(codes, scales), op.Concat(op.Shape(z, start=0, end=2), op.Constant(value_ints=[-1]), axis=0)
    )
    w = op.Mul(op.Sub(grouped, z), s)  # [T, K/G, G]
    return op.Reshape(w, op.Concat(op.Shape(ids), op.Constant(value_ints=[-1]), axis=0))


@onnxscript.script(opset=mpismoe, default_opset=op)
def TopKRoute(logits: TFloat, k: int) -> TFloat:
    """Softmax over each row's top-``k`` logits, scattered into zeros: ``[..., E]``."""
    kk = op.Reshape(op.Constant(value_int=k), op.Constant(value_ints=[1]))
    vals, idx = op.TopK(logits, kk, axis=-1, largest=1, sorted=1)
    weights = op.Softmax(vals, axis=-1)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), logits), op.Shape(logits))
    return op.ScatterElements(zeros, idx, weights, axis=-1)


@onnxscript.script(opset=mpismoe, default_opset=op)
def MaskedAttention(q: TFloat, k: TFloat, v: TFloat, mask: INT64, num_heads: int) -> TFloat:
    """Softmax(q k^T / sqrt(d)) v per head, keys where ``mask`` is 0 left out: ``[B, T, D]``."""
    heads = op.Reshape(op.Constant(value_int=num_heads), op.Constant(value_ints=[1]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    qh = op.Transpose(op.Reshape(q, split), perm=[0, 2, 1, 3])  # [B, H, T, d]
    kh = op.Transpose(op.Reshape(k, split), perm=[0, 2, 3, 1])  # [B, H, d, T]
    vh = op.Transpose(op.Reshape(v, split), perm=[0, 2, 1, 3])
    width = op.Cast(op.Shape(qh, start=3, end=4), to=1)
    scores = op.Div(op.MatMul(qh, kh), op.CastLike(op.Sqrt(width), q))
    masked = op.Equal(op.Unsqueeze(mask, op.Constant(value_ints=[1, 2])), op.Constant(value_int=0))
    lowest = op.CastLike(op.Constant(value_float=-3.4028234663852886e38), q)
    attn = op.Softmax(op.Where(masked, lowest, scores), axis=-1)
    out = op.Transpose(op.MatMul(attn, vh), perm=[0, 2, 1, 3])
    return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))


FUNCTIONS = (QMatMul, QGather, TopKRoute, MaskedAttention)


def function_protos(opset: int = MIN_OPSET) -> list:
    """FunctionProtos of the custom ops, their body importing the standard domain at ``opset``.

    The bodies use only ops whose semantics did not change between opset 18 and newer ones,
    so re-stamping the import keeps them valid and consistent with the model's import.
    """
    protos = []
    for fn in FUNCTIONS:
        proto = fn.to_function_proto()
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = opset
        protos.append(proto)
    return protos


def register_schemas() -> None:
    """Register ONNX OpSchemas for the custom ops (idempotent).

    torch.onnx's translator and onnxscript build a node only for an op with a schema; with
    them registered, the exporter emits plain ``ai.mpismoe`` nodes that survive its inliner,
    and the model-local functions are attached afterwards.
    """
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MaskedAttention", DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    param = OpSchema.FormalParameter
    qmatmul = OpSchema(
        "QMatMul",
        DOMAIN,
        DOMAIN_VERSION,
        doc="x @ dequant(qweight, scales, zeros).T for the packed little-endian low-bit layout.",
        inputs=[
            param("x", "T"),
            param("qweight", "tensor(uint8)"),
            param("scales", "tensor(float)"),
            param("zeros", "tensor(float)"),
        ],
        outputs=[param("y", "T")],
        type_constraints=[("T", floats, "float types")],
        attributes=[
            OpSchema.Attribute("bits", OpSchema.AttrType.INT, "code width: 2, 3, 4 or 8"),
            OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "codes per (scale, zero) group"),
        ],
    )
    qgather = OpSchema(
        "QGather",
        DOMAIN,
        DOMAIN_VERSION,
        doc="Rows ids of dequant(qweight, scales, zeros): a packed low-bit embedding lookup.",
        inputs=[
            param("ids", "tensor(int64)"),
            param("qweight", "tensor(uint8)"),
            param("scales", "tensor(float)"),
            param("zeros", "tensor(float)"),
        ],
        outputs=[param("y", "tensor(float)")],
        attributes=[
            OpSchema.Attribute("bits", OpSchema.AttrType.INT, "code width: 2, 3, 4 or 8"),
            OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "codes per (scale, zero) group"),
        ],
    )
    route = OpSchema(
        "TopKRoute",
        DOMAIN,
        DOMAIN_VERSION,
        doc="Softmax over the top-k logits of the last axis, scattered into zeros.",
        inputs=[param("logits", "T")],
        outputs=[param("weights", "T")],
        type_constraints=[("T", floats, "float types")],
        attributes=[OpSchema.Attribute("k", OpSchema.AttrType.INT, "experts per token")],
    )
    attention = OpSchema(
        "MaskedAttention",
        DOMAIN,
        DOMAIN_VERSION,
        doc="Multi-head attention of [B, T, D] q, k, v over the keys a [B, T] mask keeps.",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("mask", "tensor(int64)")],
        outputs=[param("y", "T")],
        type_constraints=[("T", floats, "float types")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads side by side along D")],
    )
    for schema in (qmatmul, qgather, route, attention):
        if not onnx.defs.has(schema.name, DOMAIN):
            onnx.defs.register_schema(schema)
