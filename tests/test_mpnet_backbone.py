"""An MPNet backbone (all-mpnet-base-v2's family) through the whole path, on a tiny random one:
pruned init, quantization, a training step, checkpoint, export with parity."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, tiny_tokenizer
from torch import nn

pytestmark = pytest.mark.slow  # trains and exports an MPNet backbone


def _tiny_mpnet():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MPNetConfig(
        vocab_size=tiny_tokenizer().get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        pad_token_id=0,
        relative_attention_num_buckets=32,
    )
    return tf.AutoModel.from_config(cfg).eval()


@pytest.fixture(scope="module")
def model():
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model

    config = ModelConfig(
        backbone="tiny-mpnet",
        labels=["neg", "pos"],
        max_length=16,
        side=SideConfig(reduction=4, num_heads=2, num_experts=2, top_k=1, expert_bits=4),
        quant=QuantConfig(bits=4, group_size=32, method="rtn"),
    )
    return build_model(_tiny_mpnet(), config, tiny_tokenizer().to_str(), progress=False)


def test_mpnet_takes_no_token_type_ids(model):
    assert model.input_names == ["input_ids", "attention_mask"]


def test_relative_attention_bias_narrower_than_a_group_stays_float(model):
    from mpismoe_edge.quant.embedding import QuantEmbedding

    assert type(model.backbone.encoder.relative_attention_bias) is nn.Embedding  # 32 x 2 heads: under one group of 32
    assert isinstance(model.backbone.embeddings.word_embeddings, QuantEmbedding)


def test_pruned_init_gives_each_expert_its_slice_of_the_backbone_ffn():
    from mpismoe_edge.config import ModelConfig, SideConfig
    from mpismoe_edge.model import build_model

    backbone = _tiny_mpnet()
    up = backbone.encoder.layer[0].intermediate.dense.weight.detach().clone()
    m = build_model(
        backbone,
        ModelConfig(labels=["a", "b"], side=SideConfig(reduction=4, num_heads=2, num_experts=2), quant=None),
        tiny_tokenizer().to_str(),
        progress=False,
    )
    keep = m.side.embed_down.weight.argmax(1)  # the down-projection selects the kept dimensions
    fc1 = m.side.blocks[0].ffn.experts[0].fc1.weight
    first_group = up[:64][:, keep]  # expert 0 inherits units 0..63 of the 128 (its group), on the kept dimensions
    assert fc1.shape == first_group.shape
    assert (fc1[:, None] - first_group[None]).abs().amax(-1).min(
        1
    ).values.max() == 0  # every row is one of the group's units


def test_a_training_step_moves_only_the_side_network(model, tmp_path):
    from mpismoe_edge.data import Dataset
    from mpismoe_edge.train import TrainConfig, train

    data = Dataset(list(TEXTS), [0, 1] * 4, ["neg", "pos"])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {k: v.clone() for k, v in model.side.state_dict().items()}
    train(model, data, data, TrainConfig(epochs=1, batch_size=4, min_steps=0), tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert any(
        not torch.equal(side_before[k], v)
        for k, v in model.side.state_dict().items()
        if k in side_before and v.is_floating_point()
    )


def test_export_of_the_trained_mpnet_model_passes_parity(model, tmp_path):
    from mpismoe_edge.export import export_model
    from mpismoe_edge.model import load_checkpoint, save_checkpoint

    model.eval()
    if model.config.side.expert_bits is not None and not any("qweight" in k for k in model.side.state_dict()):
        model.pack_experts()
    save_checkpoint(model, tmp_path / "model.pt")
    manifest = export_model(
        load_checkpoint(tmp_path / "model.pt"), tmp_path / "onnx", log=None
    )  # raises ParityError on a mismatch
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
