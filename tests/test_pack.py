"""The shared packed layout: bitstream round trips, the exact byte layout, and ORT's MatMulNBits reading it."""

from __future__ import annotations

import pytest
import torch

from mpismoe_edge.quant import gnpiq_quantize, rtn_quantize
from mpismoe_edge.quant.pack import (
    SUPPORTED_BITS,
    dequantize,
    pack_bits,
    pack_codes,
    packed_len,
    unpack_bits,
    unpack_codes,
)

UNIT = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}  # codes, bytes per whole-byte unit


def random_codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64)
    codes.view(-1)[0] = (1 << bits) - 1  # the largest code always appears
    return codes.to(torch.uint8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1,), (5,), (7,), (13,), (17,), (64,), (1, 9), (3, 11), (2, 3, 5), (2, 1, 4, 19)])
def test_pack_unpack_round_trip(bits, shape):
    codes = random_codes(shape, bits)
    packed = pack_bits(codes, bits)
    n_vals, n_bytes = UNIT[bits]
    length = shape[-1]
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], -(-length // n_vals) * n_bytes) == (*shape[:-1], packed_len(length, bits))
    back = unpack_bits(packed, bits, length)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_is_little_endian_bitstream(bits):
    """Code i occupies bits [i*bits, (i+1)*bits) of the row: first code in the lowest bits of byte 0."""
    codes = random_codes((2, 16), bits, seed=1)
    packed = pack_bits(codes, bits)
    for row in range(2):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[row].tolist()))
        expected = [(stream >> (8 * j)) & 0xFF for j in range(packed.shape[-1])]
        assert packed[row].tolist() == expected


def test_known_bytes():
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3 bits: 0..7 -> 24-bit word 0o76543210 -> bytes little-endian
    word = int("76543210", 8)
    assert pack_bits(torch.arange(8, dtype=torch.uint8), 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_bits(torch.tensor([0, 200, 255], dtype=torch.uint8), 8).tolist() == [0, 200, 255]
    # padding: a lone 2-bit code fills one byte, the rest zero
    assert pack_bits(torch.tensor([3], dtype=torch.uint8), 2).tolist() == [3]


@pytest.mark.parametrize("bits", [1, 5, 6, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bit width"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n,k,group", [(1, 16, 16), (3, 64, 32), (5, 96, 16), (2, 128, 64)])
def test_pack_codes_layout(bits, n, k, group):
    codes = random_codes((n, k), bits, seed=n + k)
    qweight = pack_codes(codes, bits, group)
    assert qweight.shape == (n, k // group, group * bits // 8)
    assert torch.equal(unpack_codes(qweight, bits, group), codes)
    # each block packs its own group of K
    for blk in range(k // group):
        assert torch.equal(qweight[:, blk], pack_bits(codes[:, blk * group : (blk + 1) * group], bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_dequantize_formula(bits):
    n, k, group = 3, 64, 16
    codes = random_codes((n, k), bits, seed=7)
    g = torch.Generator().manual_seed(3)
    scales = torch.rand(n, k // group, generator=g) + 0.1
    zeros = torch.rand(n, k // group, generator=g) * ((1 << bits) - 1)
    w = dequantize(pack_codes(codes, bits, group), scales, zeros, bits, group)
    assert w.shape == (n, k) and w.dtype == torch.float32
    for i in range(n):
        for j in range(k):
            expected = (codes[i, j].item() - zeros[i, j // group].item()) * scales[i, j // group].item()
            assert w[i, j].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_dequantize_matches_group_quant(bits):
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for q in (rtn_quantize(w, bits, 32), gnpiq_quantize(w, bits, 32, iters=2, restarts=1)):
        packed = dequantize(pack_codes(q.codes, q.bits, q.group_size), q.scales, q.zeros, q.bits, q.group_size)
        assert torch.equal(packed, q.dequantize())


# ---------------------------------------------------------------- ONNX Runtime's MatMulNBits


def _matmul_nbits_session(qweight, scales, zeros, k, n, bits, group, m):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales", "zero_points"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=group,
    )
    graph = helper.make_graph(
        [node],
        "mnb",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[
            numpy_helper.from_array(qweight, "B"),
            numpy_helper.from_array(scales, "scales"),
            numpy_helper.from_array(zeros, "zero_points"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,n,group", [(64, 3, 16), (96, 5, 32), (128, 1, 64)])
def test_matmul_nbits_reads_our_layout(bits, k, n, group):
    """Our packed qweight/scales/zeros run as-is in ORT's MatMulNBits: float zero points at 2/4 bits
    (GNP-IQ's fractional ones), uint8 zero points at 8 bits."""
    g = torch.Generator().manual_seed(bits * 100 + k + n)
    w = torch.randn(n, k, generator=g)
    q = gnpiq_quantize(w, bits, group, iters=2, restarts=1)
    qweight = pack_codes(q.codes, bits, group)
    if bits == 8:
        assert torch.equal(q.zeros, q.zeros.round())
        zeros = q.zeros.to(torch.uint8).numpy()  # [N, K/G]: one zero point a byte
    else:
        assert not torch.equal(q.zeros, q.zeros.round())  # really fractional
        zeros = q.zeros.numpy()
    m = 7
    sess = _matmul_nbits_session(qweight.numpy(), q.scales.numpy(), zeros, k, n, bits, group, m)
    x = torch.randn(m, k, generator=g)
    y = torch.from_numpy(sess.run(None, {"A": x.numpy()})[0]).double()
    ref = x.double() @ dequantize(qweight, q.scales, q.zeros, bits, group).double().T
    assert y.shape == (m, n)
    assert (y - ref).norm() / ref.norm() < 1e-5
