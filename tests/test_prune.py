"""Pruned init: the side network starts as slices of the backbone it rides on (side/prune.py)."""

import pytest
import torch
from conftest import tiny_backbone, tiny_model

from mpismoe_edge.config import ModelConfig, SideConfig
from mpismoe_edge.model import build_model
from mpismoe_edge.quant import QuantLinear
from mpismoe_edge.side.prune import backbone_ffns, init_from_backbone


def _side(**cfg):
    """A float-backbone model with the given side config (4 experts of 32 units = the FFN's 128)."""
    side = SideConfig(
        **{"reduction": 4, "num_heads": 2, "num_experts": 4, "expert_ratio": 2, "expert_bits": None, **cfg}
    )
    config = ModelConfig(backbone="tiny-bert", labels=["a", "b", "c"], side=side, quant=None)
    backbone = tiny_backbone()
    return build_model(backbone, config, progress=False), backbone


def _keep(model) -> torch.Tensor:
    return model.side.embed_down.weight.argmax(1)


def test_down_projections_select_backbone_dimensions():
    model, _ = _side()
    x = torch.randn(3, 64)
    keep = _keep(model)
    assert len(set(keep.tolist())) == 16
    for down in (model.side.embed_down, *(b.down for b in model.side.blocks)):
        torch.testing.assert_close(down(x), x[:, keep])


def test_experts_split_the_backbone_ffn_units_between_them():
    model, backbone = _side()
    keep = _keep(model)
    layer = backbone.encoder.layer[0]
    w1, b1 = layer.intermediate.dense.weight[:, keep], layer.intermediate.dense.bias
    experts = model.side.blocks[0].ffn.experts
    rows = torch.cat([e.fc1.weight for e in experts])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, w1.tolist()))  # every unit once, none twice
    for e, units in zip(experts, torch.arange(128).split(32)):  # each expert from its own contiguous group
        assert set(map(tuple, e.fc1.weight.tolist())) == set(map(tuple, w1[units].tolist()))
        assert set(e.fc1.bias.tolist()) == set(b1[units].tolist())
        torch.testing.assert_close(e.fc2.bias, layer.output.dense.bias[keep])


def test_expert_output_equals_the_backbone_ffn_slice_it_came_from():
    model, backbone = _side()
    keep, layer = _keep(model), backbone.encoder.layer[1]
    units = torch.arange(32, 64)  # expert 1's group
    x = torch.randn(5, 16)
    w1, w2 = layer.intermediate.dense.weight[units][:, keep], layer.output.dense.weight[keep][:, units]
    want = (
        torch.nn.functional.gelu(x @ w1.t() + layer.intermediate.dense.bias[units]) @ w2.t()
        + layer.output.dense.bias[keep]
    )
    torch.testing.assert_close(model.side.blocks[1].ffn.experts[1](x), want)


def test_dense_ffn_takes_the_heaviest_units():
    model, backbone = _side(dense_ffn=True)
    keep, layer = _keep(model), backbone.encoder.layer[0]
    w1, w2 = layer.intermediate.dense.weight[:, keep], layer.output.dense.weight[keep]
    heaviest = (w1.norm(dim=1) * w2.norm(dim=0)).topk(32).indices
    fc1 = model.side.blocks[0].ffn.ffn.fc1
    assert set(map(tuple, fc1.weight.tolist())) == set(map(tuple, w1[heaviest].tolist()))


def test_random_init_takes_nothing_from_the_backbone():
    model, backbone = _side(init="random")
    keep = _keep(_side()[0])  # the dimensions the pruned init would take from this backbone
    w1 = backbone.encoder.layer[0].intermediate.dense.weight[:, keep]
    fc1 = model.side.blocks[0].ffn.experts[0].fc1.weight
    assert not any(torch.allclose(fc1[0], w1[u]) for u in range(128))
    assert (model.side.embed_down.weight != 0).float().mean() > 0.9


def test_pruned_init_reads_the_float_weights_before_quantization():
    model = tiny_model(bits=4)  # build_model quantizes the backbone after the side is initialised
    float_bb = tiny_backbone()
    keep = _keep(model)
    w1 = float_bb.encoder.layer[0].intermediate.dense.weight[:, keep]
    first = model.side.blocks[0].ffn.experts[0].fc1.weight[0]
    assert any(torch.allclose(first, w1[u]) for u in range(w1.shape[0]))


def test_quantized_backbone_lends_its_dequantized_weights():
    from mpismoe_edge.config import QuantConfig
    from mpismoe_edge.quant import quantize_model

    backbone = tiny_backbone()
    quantize_model(backbone, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    ups = [up for up, _ in backbone_ffns(backbone, 2, 64)]
    assert all(isinstance(up, QuantLinear) for up in ups)
    model, _ = _side()
    init_from_backbone(model.side, backbone)
    keep = _keep(model)
    w1 = ups[0].dequantized_weight()[:, keep]
    assert any(torch.allclose(model.side.blocks[0].ffn.experts[0].fc1.weight[0], w1[u]) for u in range(128))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "vit"])
def test_ffns_are_found_in_every_supported_family(kind):
    backbone = tiny_backbone(kind)
    pairs = backbone_ffns(backbone, 2, 64)
    assert [(up.in_features, up.out_features, down.out_features) for up, down in pairs] == [(64, 128, 64)] * 2


def test_backbone_without_ffn_pairs_is_a_clear_error():
    backbone = torch.nn.Module()
    backbone.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
    with pytest.raises(ValueError, match="no feed-forward Linear pair.*init='random'"):
        backbone_ffns(backbone, 2, 64)


def test_unknown_init_is_rejected_when_the_config_is_built():
    with pytest.raises(ValueError, match="SideConfig.init must be one of 'pruned', 'random', got 'zeros'"):
        SideConfig(init="zeros")
