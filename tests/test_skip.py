"""SideConfig.skip: a linear map from the frozen backbone's pooled states to the outputs."""

import pytest
import torch
from conftest import TINY_TRAIN_FLAGS, tiny_model
from conftest import random_batch as _batch

from mpismoe_edge.config import SideConfig
from mpismoe_edge.export import pipeline


def test_skip_is_off_by_default_and_round_trips_through_json():
    assert SideConfig().skip is False
    assert SideConfig.from_json(SideConfig(skip=True).to_json()).skip is True


def test_skip_starts_at_zero_so_the_first_logits_are_the_side_network_alone():
    model = tiny_model(skip=True).eval()
    ids, mask = _batch()
    with_skip = model(ids, mask)
    model.side.skip = None
    torch.testing.assert_close(with_skip, model(ids, mask))


def test_skip_reads_the_embeddings_and_every_tapped_layer():
    model = tiny_model(skip=True, layers=[2])
    assert model.side.skip.in_features == 2 * model.backbone.config.hidden_size


def test_skip_is_trained_while_the_backbone_gets_no_gradient():
    model = tiny_model(skip=True).train()
    ids, mask = _batch()
    model(ids, mask).sum().backward()
    assert model.side.skip.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_skip_output_does_not_depend_on_padding():
    model = tiny_model(skip=True).eval()
    with torch.no_grad():
        model.side.skip.weight.normal_()
    ids = torch.randint(5, 40, (1, 5))
    alone = model(ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, mask), alone, atol=1e-5, rtol=1e-5)


def test_token_level_skip_gives_logits_per_token():
    model = tiny_model(skip=True, task="token-classification", labels=("O", "B-X", "I-X")).eval()
    ids, mask = _batch()
    assert model(ids, mask).shape == (3, 7, 3)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["portable", "ort-int8"])
def test_a_model_with_the_skip_exports_within_the_parity_bar(target, tmp_path):
    model = tiny_model(skip=True)
    with torch.no_grad():
        model.side.skip.weight.normal_(std=0.1)
    model.pack_experts()
    manifest = pipeline.export_model(model.eval(), tmp_path / "out", target=target, log=None)
    assert manifest["parity"]["passed"]


@pytest.mark.slow
def test_mpismoe_train_skip_flag_saves_a_model_with_the_skip(tmp_path, tiny_jsonl, backbone_dir):
    from mpismoe_edge.cli import train_main
    from mpismoe_edge.model import load_checkpoint

    code = train_main(
        [
            "--backbone",
            str(backbone_dir),
            "--data",
            str(tiny_jsonl),
            "--eval-data",
            str(tiny_jsonl),
            "-o",
            str(tmp_path / "o"),
            *TINY_TRAIN_FLAGS,
            "--skip",
            "--quiet",
        ]
    )
    assert code == 0
    model = load_checkpoint(tmp_path / "o" / "model.pt")
    assert model.config.side.skip and model.side.skip is not None


def _tiny_data():
    from conftest import LABELS, TEXTS

    from mpismoe_edge.data import Dataset

    return Dataset(list(TEXTS), list(LABELS), ["neg", "neu", "pos"])


def test_ridge_init_makes_the_untrained_model_the_probe_and_freezes_the_skip():
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.skip_fit import fit_skip

    model = tiny_model(skip=True)
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    data = _tiny_data()
    probe = fit_skip(model, tok, data, data, batch_size=4, device=torch.device("cpu"), progress=False)
    assert not model.side.skip.weight.requires_grad
    model.eval()
    inputs = encode(tok, data.texts, model.input_names)
    with torch.no_grad():
        feats = model.side.skip_features(model.backbone_states(**inputs), inputs["attention_mask"])
        torch.testing.assert_close(model(**inputs), feats @ probe.weight.T + probe.bias)


def test_fit_skip_needs_a_model_with_the_skip():
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.skip_fit import fit_skip

    model = tiny_model()
    with pytest.raises(ValueError, match="SideConfig.skip"):
        fit_skip(
            model,
            make_tokenizer(model.tokenizer_json, 16),
            _tiny_data(),
            _tiny_data(),
            4,
            torch.device("cpu"),
            progress=False,
        )


def test_training_with_ridge_init_scores_the_probe_as_epoch_0_and_keeps_the_skip_fixed(tmp_path):
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.skip_fit import fit_skip
    from mpismoe_edge.train import TrainConfig, train

    model = tiny_model(skip=True, expert_bits=None)
    data = _tiny_data()
    result = train(model, data, data, TrainConfig(epochs=2, min_steps=0, batch_size=4), tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert not model.side.skip.weight.requires_grad
    trained = model.side.skip.weight.detach().clone()
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    fit_skip(
        model, tok, data, data, batch_size=4, device=torch.device("cpu"), progress=False
    )  # the same frozen features
    torch.testing.assert_close(trained, model.side.skip.weight)
    assert result.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero_skip_init_trains_the_skip_from_zero_without_an_epoch_0(tmp_path):
    from mpismoe_edge.train import TrainConfig, train

    model = tiny_model(skip=True, expert_bits=None)
    data = _tiny_data()
    result = train(
        model, data, data, TrainConfig(epochs=1, min_steps=0, batch_size=4, skip_init="zero"), tmp_path, progress=False
    )
    assert [h["epoch"] for h in result.history] == [1]
    assert model.side.skip.weight.requires_grad and model.side.skip.weight.abs().sum() > 0


def test_unknown_skip_init_is_rejected():
    from mpismoe_edge.train import TrainConfig

    with pytest.raises(ValueError, match="skip_init"):
        TrainConfig(skip_init="lstsq")


def test_a_resumed_ridge_run_keeps_its_fitted_skip_and_history(tmp_path):
    from mpismoe_edge.train import TrainConfig, train

    data = _tiny_data()
    first = tiny_model(skip=True, expert_bits=None)
    train(first, data, data, TrainConfig(epochs=1, min_steps=0, batch_size=4), tmp_path, progress=False)
    resumed = tiny_model(skip=True, expert_bits=None)
    result = train(
        resumed, data, data, TrainConfig(epochs=2, min_steps=0, batch_size=4), tmp_path, resume=True, progress=False
    )
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    torch.testing.assert_close(resumed.side.skip.weight, first.side.skip.weight)
    assert not resumed.side.skip.weight.requires_grad
