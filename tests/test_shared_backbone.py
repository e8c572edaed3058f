"""One quantized backbone for several tasks: its fingerprint, and training on a checkpoint's backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from mpismoe_edge.cli import train_main
from mpismoe_edge.model import load_checkpoint, read_checkpoint, save_checkpoint
from mpismoe_edge.quant.fingerprint import check_same, fingerprint

TINY_ARGS = ["--epochs", "1", "--min-steps", "0", "--reduction", "4", "--quiet"]


def _train(tmp_path, backbone_dir, tiny_jsonl, name, *extra):
    out = tmp_path / name
    code = train_main(
        ["--backbone", str(backbone_dir), "--data", str(tiny_jsonl), "--eval-data", str(tiny_jsonl), "-o", str(out)]
        + TINY_ARGS
        + list(extra)
    )
    assert code == 0
    return out / "model.pt"


def test_two_models_quantized_alike_have_the_same_fingerprint():
    assert tiny_model().backbone_fingerprint == tiny_model(labels=("a", "b")).backbone_fingerprint


def test_the_bit_width_changes_the_fingerprint():
    assert tiny_model(bits=4).backbone_fingerprint != tiny_model(bits=8).backbone_fingerprint


def test_one_changed_scale_changes_the_fingerprint():
    model = tiny_model()
    before = model.backbone_fingerprint
    with torch.no_grad():
        model.backbone.encoder.layer[0].attention.self.query.scales[0, 0] += 1e-6
    assert model.backbone_fingerprint != before


def test_the_side_network_does_not_change_the_fingerprint():
    model = tiny_model()
    before = model.backbone_fingerprint
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(1.0)
    assert model.backbone_fingerprint == before


def test_a_checkpoint_records_its_backbone_fingerprint(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "model.pt")
    assert read_checkpoint(tmp_path / "model.pt")["backbone_fingerprint"] == fingerprint(model.backbone)


def test_a_loaded_checkpoint_has_the_fingerprint_it_was_saved_with(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "model.pt")
    assert load_checkpoint(tmp_path / "model.pt").backbone_fingerprint == model.backbone_fingerprint


def test_differing_fingerprints_are_one_error_naming_both():
    with pytest.raises(ValueError, match=r"a\.pt and b\.pt .*sha256:1.*sha256:2"):
        check_same({"a.pt": "sha256:1", "b.pt": "sha256:2"})


def test_training_with_backbone_from_keeps_the_backbone_bit_for_bit_without_quantizing(
    tmp_path, backbone_dir, tiny_jsonl, monkeypatch
):
    first = _train(tmp_path, backbone_dir, tiny_jsonl, "a", "--group-size", "32", "--quant-method", "rtn")

    def refuse(*_a, **_k):
        raise AssertionError("quantized again")

    monkeypatch.setattr("mpismoe_edge.model.quantize_model", refuse)
    second = _train(tmp_path, backbone_dir, tiny_jsonl, "b", "--backbone-from", str(first), "--seed", "7")
    a, b = read_checkpoint(first), read_checkpoint(second)
    assert b["backbone_fingerprint"] == a["backbone_fingerprint"]
    backbone = [k for k in a["state_dict"] if k.startswith("backbone.")]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in backbone)


def test_a_backbone_from_run_records_the_checkpoints_quantization(tmp_path, backbone_dir, tiny_jsonl):
    first = _train(tmp_path, backbone_dir, tiny_jsonl, "a", "--group-size", "32", "--quant-method", "rtn")
    second = _train(tmp_path, backbone_dir, tiny_jsonl, "b", "--backbone-from", str(first), "--seed", "7")
    assert load_checkpoint(second).config.quant == load_checkpoint(first).config.quant


@pytest.mark.parametrize(
    "option",
    [["--bits", "8"], ["--group-size", "16"], ["--quant-method", "rtn"], ["--bits-map", "{}"], ["--float-embeddings"]],
)
def test_backbone_from_refuses_a_quantization_option(tmp_path, tiny_jsonl, tiny_checkpoint, option, capsys):
    code = train_main(
        ["--data", str(tiny_jsonl), "--eval-data", str(tiny_jsonl), "-o", str(tmp_path / "o")]
        + ["--backbone-from", str(tiny_checkpoint)]
        + option
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --backbone-from") and option[0] in err


def test_backbone_from_a_missing_checkpoint_is_bad_input(tmp_path, tiny_jsonl, capsys):
    code = train_main(
        ["--data", str(tiny_jsonl), "--eval-data", str(tiny_jsonl), "-o", str(tmp_path / "o")]
        + ["--backbone-from", str(tmp_path / "nope.pt")]
    )
    assert code == 2
    assert "nope.pt" in capsys.readouterr().err
