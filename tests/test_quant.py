"""RTN and GNP-IQ group quantizers: input checks, error, determinism and the format's invariants."""

from __future__ import annotations

import pytest
import torch

from mpismoe_edge.config import QuantConfig
from mpismoe_edge.quant import gnpiq_quantize, quantize_weight, rtn_quantize

QUANTIZERS = {
    "rtn": lambda w, bits, group, name="weight": rtn_quantize(w, bits, group, name=name),
    "gnpiq": lambda w, bits, group, name="weight": gnpiq_quantize(w, bits, group, iters=3, restarts=2, name=name),
}
ALL_BITS = (2, 3, 4, 8)
LAYER = "encoder.layer.3.output.dense"


def normal(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def heavy_tailed(n, k, seed=0):
    """Student-t with 2 degrees of freedom: groups with a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(n, k, 2, generator=g).pow(2).sum(-1)
    return 0.02 * z / (chi2 / 2).sqrt()


def group_sse(w, q):
    group = q.group_size
    return ((w - q.dequantize()) ** 2).reshape(w.shape[0], -1, group).sum(-1)


# ---------------------------------------------------------------- input checks

BAD_INPUTS = [
    (normal(4, 64), 5, 32, "bit width"),
    (normal(4, 64), 1, 32, "bit width"),
    (normal(4, 64), 16, 32, "bit width"),
    (normal(4, 96), 4, 64, "does not divide"),
    (normal(4, 48), 4, 48, "power of two"),
    (normal(4, 64), 4, 8, "power of two"),
    (normal(4, 64), 4, 0, "power of two"),
    (normal(4, 64).index_put((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan"))), 4, 32, "NaN"),
    (normal(4, 64).index_put((torch.tensor([2]), torch.tensor([0])), torch.tensor(float("inf"))), 4, 32, "Inf"),
    (normal(4, 64).index_put((torch.tensor([0]), torch.tensor([9])), torch.tensor(float("-inf"))), 8, 32, "Inf"),
    (torch.empty(0, 64), 4, 32, "empty"),
    (torch.empty(4, 0), 4, 32, "empty"),
    (torch.randn(64), 4, 32, "2-D"),
    (torch.randn(2, 4, 64), 4, 32, "2-D"),
]


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("weight,bits,group,what", BAD_INPUTS)
def test_bad_input_raises_naming_layer(method, weight, bits, group, what):
    with pytest.raises(ValueError, match=what) as info:
        QUANTIZERS[method](weight, bits, group, name=LAYER)
    assert LAYER in str(info.value)


@pytest.mark.parametrize("method", ["rtn", "gnpiq"])
def test_quantize_weight_dispatch(method):
    w = normal(4, 64)
    q = quantize_weight(w, 3, QuantConfig(method=method, group_size=32, iters=2, restarts=1), name="x")
    assert q.bits == 3 and q.group_size == 32
    with pytest.raises(ValueError, match="x: group size"):
        quantize_weight(w, 3, QuantConfig(method=method, group_size=24), name="x")


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_result_invariants(method, bits):
    w = heavy_tailed(6, 128, seed=bits)
    q = QUANTIZERS[method](w, bits, 32)
    assert q.bits == bits and q.group_size == 32
    assert q.codes.shape == (6, 128) and q.codes.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (6, 4)
    assert q.scales.dtype == q.zeros.dtype == torch.float32
    assert int(q.codes.max()) < (1 << bits)  # codes within [0, 2^bits)
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all() and torch.isfinite(q.zeros).all()
    if bits == 8:  # ORT's kernel wants uint8 zero points at 8 bits
        assert torch.equal(q.zeros, q.zeros.round())
        assert q.zeros.min() >= 0 and q.zeros.max() <= 255


def test_rtn_is_min_max_with_integer_zero_point():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25] * 4, [0.1 * i for i in range(16)]])
    q = rtn_quantize(w, 2, 16)
    lo, hi = w.amin(1), w.amax(1)
    scale = (hi - lo) / 3
    assert torch.allclose(q.scales[:, 0], scale)
    assert torch.equal(q.zeros[:, 0], torch.round(-lo / scale).clamp(0, 3))
    assert torch.equal(q.codes.float(), torch.clamp(torch.round(w / scale[:, None] + q.zeros), 0, 3))


@pytest.mark.parametrize("method", QUANTIZERS)
def test_8_bit_is_nearly_lossless(method):
    w = normal(8, 128)
    q = QUANTIZERS[method](w, 8, 32)
    assert ((w - q.dequantize()).norm() / w.norm()) < 0.01


def test_gnpiq_represents_constant_and_zero_groups_exactly():
    w = torch.cat([torch.full((1, 32), 0.37), torch.zeros(1, 32), torch.full((1, 32), -2.5)], 0)
    for bits in ALL_BITS:
        q = gnpiq_quantize(w, bits, 32, iters=2, restarts=1)
        assert torch.allclose(q.dequantize(), w, atol=1e-6), bits


# ---------------------------------------------------------------- GNP-IQ vs RTN


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("weights", [normal, heavy_tailed])
def test_gnpiq_error_at_most_rtn(bits, weights):
    w = weights(16, 256, seed=bits)
    rtn, gnp = rtn_quantize(w, bits, 64), gnpiq_quantize(w, bits, 64)
    e_rtn, e_gnp = group_sse(w, rtn), group_sse(w, gnp)
    # never worse in any group (it starts from RTN and keeps each group's best grid) ...
    assert (e_gnp <= e_rtn * (1 + 1e-5) + 1e-12).all()
    # ... and clearly better overall
    ratio = (e_gnp.sum() / e_rtn.sum()).sqrt()
    limits = {normal: {2: 0.75, 3: 0.88, 4: 0.92, 8: 0.95}, heavy_tailed: {2: 0.92, 3: 0.96, 4: 0.96, 8: 0.97}}
    assert ratio < limits[weights][bits]


def test_gnpiq_2_bit_beats_every_min_max_shrink():
    """The searched grid beats RTN on any clipped min-max range (a simple grid search)."""
    w = heavy_tailed(8, 128, seed=3)
    q = gnpiq_quantize(w, 2, 32)
    err = ((w - q.dequantize()) ** 2).sum()
    g = w.reshape(-1, 32)
    for shrink in torch.linspace(0.3, 1.0, 15).tolist():
        lo, hi = g.amin(1) * shrink, g.amax(1) * shrink
        s = (hi - lo) / 3
        deq = torch.clamp(torch.round((g - lo[:, None]) / s[:, None]), 0, 3) * s[:, None] + lo[:, None]
        assert err <= ((g - deq) ** 2).sum() * (1 + 1e-5)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("bits", ALL_BITS)
def test_gnpiq_deterministic_for_a_seed(bits):
    w = heavy_tailed(8, 128, seed=11)
    a = gnpiq_quantize(w, bits, 32, seed=5)
    b = gnpiq_quantize(w.clone(), bits, 32, seed=5)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)


def test_gnpiq_accepts_half_precision_and_leaves_input_alone():
    w = normal(4, 64).half()
    before = w.clone()
    q = gnpiq_quantize(w, 4, 32, iters=2, restarts=1)
    assert torch.equal(w, before)
    assert q.scales.dtype == torch.float32
    assert ((w.float() - q.dequantize()).norm() / w.float().norm()) < 0.2


def test_gnpiq_result_does_not_depend_on_chunking(monkeypatch):
    """Large layers go in chunks of groups (bounded memory); the noise is drawn group by group,
    so any chunk size gives the same codes, scales and zero points."""
    import mpismoe_edge.quant.gnpiq as gnpiq

    w = heavy_tailed(8, 128, seed=4)
    whole = gnpiq_quantize(w, 3, 32, seed=1)
    monkeypatch.setattr(gnpiq, "_CHUNK_ROWS", 5)
    chunked = gnpiq_quantize(w, 3, 32, seed=1)
    assert torch.equal(chunked.codes, whole.codes)
    assert torch.equal(chunked.scales, whole.scales) and torch.equal(chunked.zeros, whole.zeros)
