"""QuantLinear, quantize_model (mixed precision, atomic failure) and the two custom ops."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mpismoe_edge import ops
from mpismoe_edge.config import QuantConfig
from mpismoe_edge.quant import QuantEmbedding, QuantLinear, bits_for, gnpiq_quantize, quantize_model, rtn_quantize
from mpismoe_edge.quant.api import load_quantized_state
from mpismoe_edge.quant.pack import dequantize


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        x = x + torch.tanh(self.query(x)) * torch.sigmoid(self.key(x))
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def config(**kw):
    kw.setdefault("group_size", 32)
    kw.setdefault("iters", 2)
    kw.setdefault("restarts", 1)
    return QuantConfig(**kw)


# ---------------------------------------------------------------- quantize_model


def test_quantize_model_default_bits_and_output():
    model = Net()
    x = torch.randn(5, 64)
    ref = model(x)
    applied = quantize_model(model, config(bits=8), progress=False)
    names = [n for n, m in Net().named_modules() if isinstance(m, nn.Linear)]
    assert applied == {n: 8 for n in names}
    for name, m in linears(model).items():
        assert isinstance(m, QuantLinear) and m.bits == 8 and m.group_size == 32, name
    out = model(x)
    assert (out - ref).norm() / ref.norm() < 0.01


@pytest.mark.parametrize("method", ["rtn", "gnpiq"])
def test_quantize_model_4_bit_close_to_float(method):
    model = Net()
    x = torch.randn(5, 64)
    ref = model(x)
    quantize_model(model, config(bits=4, method=method), progress=False)
    assert (model(x) - ref).norm() / ref.norm() < 0.15


def test_bits_map_exact_name_and_patterns():
    cfg = config(bits=4, bits_map={"layers.1.up": 8, "*.up": 2, "*.down": 3, "layers.*": 8, "head": 8})
    # the exact name wins over patterns; else the first matching pattern; else the default
    assert bits_for("layers.1.up", cfg) == 8
    assert bits_for("layers.0.up", cfg) == 2
    assert bits_for("layers.0.down", cfg) == 3
    assert bits_for("layers.0.query", cfg) == 8
    assert bits_for("head", cfg) == 8
    assert bits_for("other", cfg) == 4
    model = Net()
    applied = quantize_model(model, cfg, progress=False)
    assert applied == {
        "layers.0.query": 8,
        "layers.0.key": 8,
        "layers.0.up": 2,
        "layers.0.down": 3,
        "layers.1.query": 8,
        "layers.1.key": 8,
        "layers.1.up": 8,
        "layers.1.down": 3,
        "head": 8,
    }
    for name, bits in applied.items():
        assert model.get_submodule(name).bits == bits


def test_include_exclude():
    model = Net()
    applied = quantize_model(
        model, config(bits=4, include=["layers.*"], exclude=["*.key", "layers.1.*"]), progress=False
    )
    assert set(applied) == {"layers.0.query", "layers.0.up", "layers.0.down"}
    for name, m in linears(model).items():
        assert isinstance(m, QuantLinear) == (name in applied), name


def test_bits_map_naming_no_selected_layer_raises():
    with pytest.raises(ValueError, match="nope"):
        quantize_model(Net(), config(bits_map={"nope": 2}), progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["rtn", "gnpiq"])
@pytest.mark.parametrize("breakage,what", [("nan", "NaN"), ("inf", "Inf"), ("shape", "does not divide")])
def test_one_bad_layer_raises_naming_it_and_leaves_model_untouched(method, breakage, what):
    model = Net()
    if breakage == "shape":  # K = 48 is not a multiple of the group size 32
        model.layers[1].key = nn.Linear(48, 64)
        bad = "layers.1.key"
    else:
        with torch.no_grad():
            model.head.weight[1, 7] = float("nan") if breakage == "nan" else float("inf")
        bad = "head"
    before = _state(model)
    with pytest.raises(ValueError, match=what) as info:
        quantize_model(model, config(bits=4, method=method), progress=False)
    assert bad in str(info.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # no layer swapped
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan())), k


def test_bad_bits_in_map_raises_naming_layer_when_the_config_is_built():
    with pytest.raises(ValueError, match="unsupported bit width for {'layers.0.down': 5}"):
        config(bits=4, bits_map={"layers.0.down": 5})


# ---------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_forward_and_state_dict_round_trip(bits, bias):
    lin = nn.Linear(64, 10, bias=bias)
    q = gnpiq_quantize(lin.weight, bits, 16, iters=2, restarts=1)
    ql = QuantLinear.from_quantized(q, lin.bias)
    assert torch.equal(ql.dequantized_weight(), q.dequantize())
    x = torch.randn(2, 3, 64)
    expected = x @ q.dequantize().T + (lin.bias if bias else 0)
    assert torch.allclose(ql(x), expected, atol=1e-5)

    buf = io.BytesIO()
    torch.save(ql.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"qweight", "scales", "zeros"} | ({"bias"} if bias else set())
    assert state["qweight"].dtype == torch.uint8 and state["qweight"].shape == (10, 4, 16 * bits // 8)
    fresh = QuantLinear(64, 10, bits, 16, bias=bias)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), ql(x))
    for k, v in ql.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_frozen_forwards_of_layers_that_share_scratch_equal_their_own_dequantized_weights(bits):
    torch.manual_seed(0)
    layers = [QuantLinear.from_quantized(rtn_quantize(torch.randn(n, 64), bits, 16), torch.randn(n)) for n in (40, 8)]
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layers[0](x)
        second = layers[1](x)  # dequantized into the same buffers as the first
        again = layers[0](x)
    for layer, y in ((layers[0], first), (layers[1], second), (layers[0], again)):
        torch.testing.assert_close(y, x @ layer.dequantized_weight().T + layer.bias)


def test_quantized_model_state_dict_round_trip():
    model = Net()
    quantize_model(model, config(bits=3, bits_map={"head": 8}), progress=False)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = Net()
    quantize_model(fresh, config(bits=3, bits_map={"head": 8}, method="rtn"), progress=False)  # same shapes
    fresh.load_state_dict(state)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------- QuantEmbedding


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 64, padding_idx=0)
        self.proj = nn.Linear(64, 8)

    def forward(self, ids):
        return self.proj(self.tokens(ids))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_embedding_looks_up_rows_of_the_dequantized_table(bits):
    table = torch.randn(50, 64)
    q = rtn_quantize(table, bits, 16)
    emb = QuantEmbedding.from_quantized(q)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), nn.functional.embedding(ids, q.dequantize()))


@pytest.mark.parametrize("embeddings", [True, False])
def test_quantize_model_packs_embeddings_unless_disabled(embeddings):
    model = Embedder()
    applied = quantize_model(model, config(bits=4, method="rtn", embeddings=embeddings), progress=False)
    assert isinstance(model.tokens, QuantEmbedding) == embeddings
    assert ("tokens" in applied) == embeddings and isinstance(model.proj, QuantLinear)


def test_load_quantized_state_rebuilds_packed_embeddings():
    model = Embedder()
    quantize_model(model, config(bits=3, method="rtn"), progress=False)
    fresh = Embedder()
    load_quantized_state(fresh, model.state_dict())
    assert isinstance(fresh.tokens, QuantEmbedding) and fresh.tokens.bits == 3 and fresh.tokens.padding_idx == 0
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(ids), model(ids))


# ---------------------------------------------------------------- custom ops


def _packed(bits=4, n=6, k=64, group=16, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q = rtn_quantize(w, bits, group)
    ql = QuantLinear.from_quantized(q, None)
    return ql.qweight, ql.scales, ql.zeros, bits, group


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qmatmul_forward_and_grad_wrt_x_equal_float(bits):
    qweight, scales, zeros, _, group = _packed(bits)
    w = dequantize(qweight, scales, zeros, bits, group)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = ops.qmatmul(x, qweight, scales, zeros, bits, group)
    y_ref = x_ref @ w.T
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    assert torch.allclose(gx, gx_ref, atol=1e-5)


def test_qmatmul_double_gradcheck():
    qweight, scales, zeros, bits, group = _packed(4, n=3, k=32, group=16)
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.qmatmul(t, qweight, scales.double(), zeros.double(), bits, group), (x,)
    )


def test_qmatmul_opcheck():
    qweight, scales, zeros, bits, group = _packed(4)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(
        ops.qmatmul,
        (x, qweight, scales, zeros, bits, group),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_route_forward_equals_reference(k):
    logits = torch.randn(4, 7, 8, generator=torch.Generator().manual_seed(k))
    out = ops.topk_route(logits, k)
    ref = ops.topk_route_reference(logits, k)
    assert torch.allclose(out, ref, atol=1e-7)
    assert ((out > 0).sum(-1) == k).all()
    assert torch.allclose(out.sum(-1), torch.ones(4, 7))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_route_gradient_matches_reference_autograd(k):
    g = torch.Generator().manual_seed(10 + k)
    logits = (torch.randn(3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.topk_route(t, k), (logits,))
    upstream = torch.randn(3, 6, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(ops.topk_route(logits, k), logits, upstream)
    (ref,) = torch.autograd.grad(ops.topk_route_reference(logits, k), logits, upstream)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_topk_route_opcheck():
    logits = torch.randn(5, 8, requires_grad=True)
    torch.library.opcheck(
        ops.topk_route, (logits, 2), test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
